"""The search loop end to end at toy scale: real proxy training of real (tiny) children.

The space here is a one-block network at 16x16 (32 token sequences), and the
latency table is written by the test for exactly that space, so every child trains in a few seconds.
The kill -9 and two-process tests run this file as a worker (`python tests/test_search.py worker ...`).
"""

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config


def tiny_table(path: str) -> str:
  """A latency table covering the tiny space: each layer's entry grows with its multiply-adds."""
  from mnasnet_jax import blocks
  from mnasnet_jax import models
  from mnasnet_jax import search_space
  from mnasnet_jax.latency import table as table_lib

  space = search_space.SearchSpace(_space_config())
  entries = {}
  for tokens in itertools.product(*[range(c) for c in space.choices]):
    arch = models.Architecture(tuple(space.decode(tokens)), stem_filters=space.stem_filters)
    layers = blocks.layers(arch.blocks, arch.stem_filters, blocks.same_output_size(16, 2))
    for layer in layers:
      entries[table_lib.layer_key(layer)] = {'ms': 0.02 + models.layer_cost(layer)[1] / 1e5}
    for key in table_lib.network_units(arch, 16, 4)[:: len(layers) + 1]:  # stem and head
      entries[key] = {'ms': 0.05}
  table = table_lib.LatencyTable(
    entries, resolution=16, num_classes=4, backend='test', device={'name': 'tests/test_search.py'}
  )
  return table.save(path)


def _space_config():
  space = search_config.get_config('local').search_space
  space.stem_filters = 8
  space.base_blocks = ('r1_k3_s11_e1_i8_o8',)
  space.searched_blocks = (0,)
  space.conv_ops = ('sepconv', 'mbconv3')
  space.kernels = (3, 5)
  space.se_ratios = (0.0, 0.25)
  space.skip_ops = ('identity', 'none')
  space.filter_multipliers = (1.0,)
  space.layer_deltas = (0, 1)
  return space


def tiny_config(table_path: str, num_children=4, children_per_step=2, cache_dir=None):
  config = search_config.get_config('local')
  config.search_space = _space_config()
  data = train_config.data_config('synthetic', 16)
  data.num_train, data.num_eval, data.num_classes, data.holdout = 192, 32, 4, 64
  config.data = data
  proxy = config.proxy if 'proxy' in config else train_config.get_config('local')
  proxy.batch_size, proxy.eval_batch_size, proxy.num_steps = 16, 32, 3
  proxy.ema_decay, proxy.dtype, proxy.eval_examples = 0.0, 'float32', None
  config.proxy = proxy
  config.latency.table = table_path
  config.reward.target_ms = 0.5
  config.search.num_children = num_children
  config.search.children_per_step = children_per_step
  config.search.report_top_k = 3
  config.search.cache_min_compile_seconds = 0.0
  config.search.compilation_cache_dir = cache_dir
  return config


def _history(workdir):
  from mnasnet_jax import history

  return history.read(os.path.join(workdir, 'history.jsonl'))


# --- in-process -----------------------------------------------------------------------------------


def test_failed_child_is_recorded_and_search_goes_on(tmp_path, monkeypatch):
  from mnasnet_jax import search
  from mnasnet_jax import train

  config = tiny_config(
    tiny_table(str(tmp_path / 'table.json')), num_children=3, children_per_step=3
  )
  config.search.failure_reward = -0.5
  real = train.proxy_train
  calls = []

  def flaky(proxy, arch, data, seed=0, devices=None):
    calls.append(seed)
    if len(calls) == 2:
      raise train.TrainingDiverged('loss is nan at step 3')
    if len(calls) == 3:
      raise RuntimeError('out of memory')
    return real(proxy, arch, data, seed=seed, devices=devices)

  monkeypatch.setattr(train, 'proxy_train', flaky)
  workdir = str(tmp_path / 'work')
  search.run(config, workdir)
  records = _history(workdir)
  assert [r['trial'] for r in records] == [0, 1, 2]
  assert calls == [0, 1, 2]  # seed = train_seed + trial
  assert [r['status'] for r in records] == ['ok', 'failed', 'failed']
  assert records[1]['reason'] == 'TrainingDiverged: loss is nan at step 3'
  assert records[2]['reason'] == 'RuntimeError: out of memory'
  assert records[1]['reward'] == records[2]['reward'] == -0.5
  from mnasnet_jax import reward

  for r in records[:1]:
    assert 0.0 <= r['accuracy'] <= 1.0
    expected = r['accuracy'] * (r['latency_ms'] / 0.5) ** -0.07  # the soft reward by hand
    assert r['reward'] == pytest.approx(expected, rel=1e-6)
    assert r['reward'] == pytest.approx(
      float(reward.compute(config.reward, r['accuracy'], r['latency_ms'], 0.5)), rel=1e-6
    )
  # Latency, params and multiply-adds are the table's and models.summary's for the decoded blocks.
  from mnasnet_jax import latency
  from mnasnet_jax import models
  from mnasnet_jax import search_space

  space = search_space.SearchSpace(config.search_space)
  table = latency.LatencyTable.load(config.latency.table)
  for r in records:
    assert r['blocks'] == space.decode(r['tokens'])
    arch = models.Architecture(tuple(r['blocks']), stem_filters=8)
    assert r['latency_ms'] == pytest.approx(table.predict(arch))
    assert r['params'] == models.summary(arch, resolution=16, num_classes=4)['params']
  summary = json.load(open(os.path.join(workdir, 'pareto.json')))
  assert summary['children'] == 3 and summary['evaluated'] == 1
  assert (
    'python launch/main.py --config=configs/train.py:local --config.arch='
    in open(os.path.join(workdir, 'best.md')).read()
  )
  assert os.listdir(os.path.join(workdir, 'jax_cache'))  # the persistent compilation cache
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_target_latency_defaults_to_mobilenet_v2():
  from mnasnet_jax import latency
  from mnasnet_jax import search

  config = search_config.get_config('local')
  table = latency.LatencyTable.load(config.latency.table)
  config.reward.target_ms = None
  assert search.target_latency(config.reward, table) == table.predict('mobilenet_v2')
  config.reward.target_ms = 12.5
  assert search.target_latency(config.reward, table) == 12.5
  config.reward.target_ms = -1.0
  with pytest.raises(ValueError, match='target_ms = -1.0'):
    search.target_latency(config.reward, table)


def test_default_config_without_imagenet_fails_at_once(tmp_path):
  from mnasnet_jax import input_pipeline
  from mnasnet_jax import search

  config = search_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(input_pipeline.DatasetMissingError, match='imagenet2012'):
    search.run(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work')


@pytest.mark.parametrize(
  'key, value, message',
  [
    ('search.num_children', -3, 'config.search.num_children = -3: expected at least 1'),
    ('search.children_per_step', 0, 'config.search.children_per_step = 0: expected at least 1'),
    ('reward.kind', 'bogus', "unknown reward kind 'bogus'"),
    ('controller.strategy', 'bogus', "unknown strategy 'bogus'"),
    ('latency.table', '/nonexistent/table.json', "'/nonexistent/table.json': no such file"),
    ('reward.target_ms', -1.0, 'target_ms = -1.0'),
  ],
)
def test_config_mistakes_fail_before_the_data_loads(tmp_path, monkeypatch, key, value, message):
  from mnasnet_jax import errors
  from mnasnet_jax import input_pipeline
  from mnasnet_jax import search

  config = search_config.get_config('local')
  section, field = key.split('.')
  config[section][field] = value
  monkeypatch.setattr(input_pipeline, 'create_proxy_data', None)  # a call would be a TypeError
  with pytest.raises(errors.UserError, match=message):
    search.run(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work')


def _fake_training(monkeypatch, outcomes=None):
  """Replaces proxy training: trial t scores 0.5 + t / 100, or raises `outcomes[t]`; returns the
  trials trained, in order."""
  from mnasnet_jax import train

  trained = []

  def proxy_train(proxy, arch, data, seed=0, devices=None):
    trial = seed  # train_seed + trial, train_seed 0
    trained.append(trial)
    if trial in (outcomes or {}):
      raise outcomes[trial]
    return {'accuracy': 0.5 + trial / 100, 'compile_seconds': 0.0, 'train_seconds': 0.0}

  monkeypatch.setattr(train, 'proxy_train', proxy_train)
  return trained


def _spy_tell(monkeypatch):
  """The (tokens, rewards) each call of PPO.tell receives."""
  from mnasnet_jax import controller

  told, tell = [], controller.PPO.tell

  def spy(self, state, tokens, rewards):
    told.append((np.asarray(tokens).tolist(), np.asarray(rewards).tolist()))
    return tell(self, state, tokens, rewards)

  monkeypatch.setattr(controller.PPO, 'tell', spy)
  return told


def test_child_that_does_not_fit_is_oom_and_left_out_of_the_update(tmp_path, monkeypatch):
  """num_children = 6 at 4 a step: exactly 6 children, the last step samples the remaining 2."""
  from mnasnet_jax import search
  from mnasnet_jax import train

  config = tiny_config(
    tiny_table(str(tmp_path / 'table.json')), num_children=6, children_per_step=4
  )
  config.search.compilation_cache = False
  config.search.max_consecutive_failures = 1  # an oom child is not a failure of the setup
  trained = _fake_training(monkeypatch, {1: train.DoesNotFit('fits no micro-batch in 16 GiB')})
  told = _spy_tell(monkeypatch)
  workdir = str(tmp_path / 'work')
  search.run(config, workdir)
  records = _history(workdir)
  assert [r['trial'] for r in records] == trained == list(range(6))
  assert [r['step'] for r in records] == [0, 0, 0, 0, 1, 1]
  assert [r['status'] for r in records] == ['ok', 'oom', 'ok', 'ok', 'ok', 'ok']
  assert records[1]['reward'] is None and records[1]['accuracy'] is None
  assert records[1]['reason'] == 'DoesNotFit: fits no micro-batch in 16 GiB'
  expected = [
    (
      [r['tokens'] for r in records if r['step'] == step and r['status'] == 'ok'],
      [pytest.approx(r['reward']) for r in records if r['step'] == step and r['status'] == 'ok'],
    )
    for step in (0, 1)
  ]
  assert told == expected  # step 0 tells 3 children, not 4 with a reward of 0
  # Resumed from the start, the history's children are told again, the oom one still left out.
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  search.run(config, workdir)
  assert trained == list(range(6)) and told == expected * 2
  summary = json.load(open(os.path.join(workdir, 'pareto.json')))
  assert summary['children'] == 6 and summary['evaluated'] == 5
  assert '0 failed, 1 did not fit the device' in open(os.path.join(workdir, 'best.md')).read()


def test_failure_limit_counts_failed_children_in_trial_order(tmp_path, monkeypatch):
  from mnasnet_jax import search
  from mnasnet_jax import train

  config = tiny_config(
    tiny_table(str(tmp_path / 'table.json')), num_children=6, children_per_step=3
  )
  config.search.compilation_cache = False
  config.search.max_consecutive_failures = 2
  broken = RuntimeError('no such file: /data/shard-3')
  _fake_training(monkeypatch, {1: broken, 2: train.DoesNotFit('too wide'), 3: broken})
  workdir = str(tmp_path / 'work')
  # Trial 2 does not fit: it neither counts nor resets, so trial 3 is the second failure in a row.
  with pytest.raises(
    search.TooManyFailures,
    match=r'^2 children failed in a row \(last: trial 3, RuntimeError: no such '
    r'file: /data/shard-3\); this looks like a broken setup',
  ):
    search.run(config, workdir)
  assert len(_history(workdir)) == 6  # the step's children are all trained and kept first
  # Fixed and resumed: the recorded failures are not counted again, nothing is trained again.
  trained = _fake_training(monkeypatch)
  search.run(config, workdir)
  assert trained == [] and [r['trial'] for r in _history(workdir)] == list(range(6))


@pytest.mark.parametrize('damaged, only_arrays', [([2], True), ([2], False), ([2, 1], False)])
def test_unreadable_checkpoint_resumes_from_the_newest_readable(
  tmp_path, monkeypatch, caplog, damaged, only_arrays
):
  import jax

  from mnasnet_jax import search

  config = tiny_config(tiny_table(str(tmp_path / 'table.json')))
  config.search.compilation_cache = False
  _fake_training(monkeypatch)
  workdir = str(tmp_path / 'work')
  straight = search.run(config, workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  rng = np.random.default_rng(0)
  for step in damaged:  # random bytes, as a failing disk or a cut copy leaves them
    for root, _, files in os.walk(os.path.join(checkpoints, str(step))):
      for name in files if os.path.basename(root) == 'd' or not only_arrays else ():
        path = os.path.join(root, name)
        size = max(os.path.getsize(path), 16)
        open(path, 'wb').write(rng.integers(0, 256, size, np.uint8).tobytes())
  trained = _fake_training(monkeypatch)
  with caplog.at_level('WARNING'):
    resumed = search.run(config, workdir)
  assert trained == []  # every child came from the history
  assert [r['trial'] for r in _history(workdir)] == list(range(4))
  lines = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  older = ['checkpoint 1', 'the start']
  assert len(lines) == len(damaged)
  for line, step, then in zip(lines, damaged, older):
    assert line.startswith(f'checkpoint {step} in {os.path.abspath(checkpoints)} cannot be read (')
    assert line.endswith(f'); removed it, resuming from {then}') and '\n' not in line
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)


# --- subprocesses: kill -9 and two processes -------------------------------------------------------


def _worker(workdir, table_path, num_processes, process_id, port, cache_dir):
  import jax

  jax.config.update('jax_num_cpu_devices', 1)  # no cross-device sums: bit-for-bit repeatable
  if num_processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  from mnasnet_jax import search

  config = tiny_config(table_path, cache_dir=cache_dir)
  state = search.run(config, workdir)
  leaves = jax.tree_util.tree_leaves(state)
  np.savez(os.path.join(workdir, f'state_{process_id}.npz'), *leaves)


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """One compilation cache for the workers: a resumed run finds the programs its first run built."""
  return str(tmp_path_factory.mktemp('jax_cache'))


def _spawn(workdir, table_path, cache_dir, num_processes=1, process_id=0, port=0):
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, f'worker_{process_id}.log'), 'a')  # a pipe left unread blocks
  proc = subprocess.Popen(
    [
      sys.executable,
      __file__,
      'worker',
      workdir,
      table_path,
      str(num_processes),
      str(process_id),
      str(port),
      cache_dir,
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  proc.log_path = log.name
  return proc


def _finish(proc, timeout=600):
  proc.wait(timeout=timeout)
  assert proc.returncode == 0, open(proc.log_path).read()[-3000:]


def _states(workdir, n):
  return [
    [f[k] for k in sorted(f.files, key=lambda s: int(s.split('_')[1]))]
    for f in (np.load(os.path.join(workdir, f'state_{i}.npz')) for i in range(n))
  ]


@pytest.mark.slow
def test_kill_9_and_resume_samples_the_same_sequence(tmp_path, cache_dir):
  table_path = tiny_table(str(tmp_path / 'table.json'))
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  _finish(_spawn(straight, table_path, cache_dir))
  # Kill the second run once step 0's children are recorded (checkpointed or not yet).
  proc = _spawn(killed, table_path, cache_dir)
  history_path = os.path.join(killed, 'history.jsonl')
  deadline = time.time() + 600
  while time.time() < deadline and len(_history(killed)) < 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  recorded = _history(killed)
  assert 2 <= len(recorded) < 4
  with open(history_path, 'a') as f:  # as if the kill had landed in the middle of a write
    f.write('{"trial": 9, "step": 4, "tok')
  _finish(_spawn(killed, table_path, cache_dir))
  a, b = _history(straight), _history(killed)
  assert [r['trial'] for r in b] == list(range(4))  # each child once, none lost
  assert [r['tokens'] for r in a] == [r['tokens'] for r in b]  # the same sequence of children
  assert b[: len(recorded)] == recorded  # recorded children were kept as they were
  for x, y in zip(a, b):
    assert x['accuracy'] == pytest.approx(y['accuracy'], abs=1e-6)
  for x, y in zip(*[_states(w, 1)[0] for w in (straight, killed)]):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_processes_share_the_children_and_agree(tmp_path, cache_dir):
  table_path = tiny_table(str(tmp_path / 'table.json'))
  workdir = str(tmp_path / 'work')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [_spawn(workdir, table_path, cache_dir, 2, i, port) for i in range(2)]
  for proc in procs:
    _finish(proc)
  records = _history(workdir)
  assert [r['trial'] for r in sorted(records, key=lambda r: r['trial'])] == list(range(4))
  # Round-robin: in each step of 2 children, process 0 trains the first, process 1 the second.
  assert [r['process'] for r in sorted(records, key=lambda r: r['trial'])] == [0, 1] * 2
  assert all(r['status'] == 'ok' for r in records)
  s0, s1 = _states(workdir, 2)
  for x, y in zip(s0, s1):
    np.testing.assert_array_equal(x, y)
  assert int(s0[-1]) == 2  # the PPO state's step: two updates, both applied on both processes


if __name__ == '__main__' and sys.argv[1] == 'worker':
  _worker(
    sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
  )
