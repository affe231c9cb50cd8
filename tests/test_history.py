"""The history survives a kill at any byte and never records a child twice."""

import json
import os

import pytest

from mnasnet_jax import errors
from mnasnet_jax import history


def _record(trial, step=0, **kw):
  r = {
    'trial': trial,
    'step': step,
    'tokens': [trial, 1],
    'blocks': ['r1_k3_s11_e1_i32_o16'],
    'accuracy': 0.5 + trial / 100,
    'latency_ms': 1.0 + trial,
    'reward': 0.4,
    'params': 10,
    'macs': 20,
    'status': 'ok',
    'reason': None,
    'eval_seconds': 1.5,
  }
  r.update(kw)
  return r


def test_round_trip_and_order(tmp_path):
  path = str(tmp_path / 'history.jsonl')
  h = history.History(path)
  h.extend(
    [
      _record(0),
      _record(1, status='failed', reason='TrainingDiverged: loss nan', accuracy=float('nan')),
    ]
  )
  lines = open(path).read().splitlines()
  assert len(lines) == 2
  assert list(json.loads(lines[0]))[:3] == ['trial', 'step', 'tokens']
  again = history.History(path)
  assert [r['trial'] for r in again.records] == [0, 1]
  assert again.get(1)['accuracy'] is None  # NaN is not JSON: written as null
  assert again.get(1)['reason'] == 'TrainingDiverged: loss nan'
  assert 1 in again and 2 not in again


@pytest.mark.parametrize('cut', [1, 7, 30, -1])
def test_truncated_last_line_is_dropped_and_file_repaired(tmp_path, cut):
  path = str(tmp_path / 'history.jsonl')
  h = history.History(path)
  h.extend([_record(0), _record(1)])
  size_two = os.path.getsize(path)
  h.append(_record(2))
  full = open(path, 'rb').read()
  # A kill -9 in the middle of the third write: any prefix of its line is on disk.
  cut_at = size_two + (cut if cut > 0 else len(full) - size_two - 1)
  open(path, 'wb').write(full[:cut_at])
  assert [r['trial'] for r in history.read(path)] == [0, 1]
  assert os.path.getsize(path) == cut_at  # reading alone does not modify the file
  resumed = history.History(path)
  assert [r['trial'] for r in resumed.records] == [0, 1]
  assert os.path.getsize(path) == size_two
  resumed.append(_record(2))
  assert open(path, 'rb').read() == full


def test_no_child_recorded_twice(tmp_path):
  path = str(tmp_path / 'history.jsonl')
  h = history.History(path)
  h.append(_record(0))
  with pytest.raises(ValueError, match='trial 0 is already'):
    h.append(_record(0))
  with open(path, 'a') as f:  # a file that says otherwise is not this search's history
    f.write(json.dumps(_record(0)) + '\n')
  with pytest.raises(history.HistoryError, match='line 2: trial 0 is recorded twice'):
    history.History(path)


def test_corrupt_middle_line_and_bad_records(tmp_path):
  path = str(tmp_path / 'history.jsonl')
  open(path, 'w').write('{"trial": 0, "step": 0, "status": "ok"}\nnot json\n')
  with pytest.raises(history.HistoryError, match='line 2: not a JSON record'):
    history.History(path)
  assert issubclass(history.HistoryError, errors.UserError)  # the launcher prints it in a line
  h = history.History(str(tmp_path / 'other.jsonl'))
  with pytest.raises(ValueError, match="status 'done'"):
    h.append(_record(0, status='done'))
  with pytest.raises(ValueError, match=r"\['step'\]"):
    h.append({'trial': 3, 'status': 'ok'})


def test_read_only_history_keeps_records_in_memory(tmp_path):
  path = str(tmp_path / 'history.jsonl')
  h = history.History(path, writable=False)
  h.append(_record(0))
  assert not os.path.exists(path) and len(h) == 1 and h.step_records(0)[0]['trial'] == 0
