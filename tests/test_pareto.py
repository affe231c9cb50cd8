"""The Pareto front against a brute-force definition, and the report's files."""

import json

import numpy as np
import pytest

from mnasnet_jax import pareto


def _dominated(i, acc, lat):
  return any(
    (acc[j] >= acc[i] and lat[j] <= lat[i]) and (acc[j] > acc[i] or lat[j] < lat[i])
    for j in range(len(acc))
  )


def test_front_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(1, 60))
    acc = rng.integers(0, 10, n) / 10  # many ties on purpose
    lat = rng.integers(0, 10, n).astype(float)
    front = pareto.pareto_front(acc, lat)
    expected = {(acc[i], lat[i]) for i in range(n) if not _dominated(i, acc, lat)}
    assert {(acc[i], lat[i]) for i in front} == expected
    assert len(front) == len(expected)  # exact duplicates appear once
    assert np.all(np.diff(lat[front]) > 0) and np.all(np.diff(acc[front]) > 0)


def test_front_by_hand():
  acc = [0.90, 0.80, 0.85, 0.70, 0.95, 0.85]
  lat = [10.0, 5.0, 12.0, 4.0, 20.0, 5.0]
  # (4, .70), (5, .85) beats (5, .80), (10, .90), (20, .95); (12, .85) is beaten by (10, .90).
  assert pareto.pareto_front(acc, lat).tolist() == [3, 5, 0, 4]


def _records():
  rng = np.random.default_rng(1)
  out = []
  for t in range(30):
    lat = float(rng.uniform(1, 3))
    acc = float(0.6 + 0.1 * np.log(lat) + rng.normal(0, 0.01))
    out.append(
      {
        'trial': t,
        'step': t // 4,
        'tokens': [t],
        'blocks': [f'r1_k3_s11_e6_i16_o{8 * t + 8}'],
        'accuracy': acc,
        'latency_ms': lat,
        'reward': acc * (lat / 2) ** -0.07,
        'params': 1000 + t,
        'macs': 10**6 * t,
        'status': 'ok',
      }
    )
  out.append(
    {
      'trial': 30,
      'step': 7,
      'tokens': [0],
      'blocks': ['r1_k3_s11_e1_i32_o16'],
      'accuracy': None,
      'latency_ms': 1.5,
      'reward': 0.0,
      'params': 1,
      'macs': 1,
      'status': 'failed',
      'reason': 'TrainingDiverged',
    }
  )
  return out


def _report(records, tmp_path, **kwargs):
  return pareto.write_report(
    records,
    str(tmp_path),
    target_ms=2.0,
    top_k=3,
    train_config='configs/train.py:local',
    description='test search',
    **kwargs,
  )


def test_report_files(tmp_path):
  records = _records()
  paths = _report(records, tmp_path)
  summary = json.load(open(paths['pareto.json']))
  assert summary['children'] == 31 and summary['evaluated'] == 30
  ok = records[:30]
  expected = pareto.pareto_front([r['accuracy'] for r in ok], [r['latency_ms'] for r in ok])
  assert [f['trial'] for f in summary['front']] == [ok[i]['trial'] for i in expected]
  by_reward = sorted(ok, key=lambda r: -r['reward'])[:3]
  assert summary['best'] == [r['trial'] for r in by_reward]
  best = open(paths['best.md']).read()
  top = by_reward[0]
  assert (
    f'python launch/main.py --config=configs/train.py:local --config.arch={top["blocks"][0]} '
    in best
  )
  assert f'| 1 | {top["trial"]} |' in best
  for name in ('pareto.png', 'latency_histogram.png'):
    assert open(paths[name], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('sampled', [True, False])
def test_report_leads_with_the_policys_answer(tmp_path, sampled):
  records = _records()
  tokens = [7] if sampled else [99]
  answer = {
    'tokens': tokens,
    'blocks': ['r1_k5_s11_e3_i16_o24', 'r2_k3_s22_e6_i24_o40'],
    'latency_ms': 1.234,
    'params': 4321,
    'macs': 2_500_000,
  }
  paths = _report(records, tmp_path, policy_answer=answer)
  assert json.load(open(paths['pareto.json']))['policy_answer'] == answer
  best = open(paths['best.md']).read()
  command = '--config.arch=r1_k5_s11_e3_i16_o24,r2_k3_s22_e6_i24_o40 '
  assert best.index("## The policy's answer") < best.index(command) < best.index('| rank |')
  assert 'Latency 1.234 ms, 4,321 parameters, 2.50 M mult-adds.' in best
  if sampled:
    assert f'sampled as trial 7 (reward {records[7]["reward"]:.4f})' in best
  else:
    assert 'not sampled as such' in best
