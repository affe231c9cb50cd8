"""Search-quality reporting: the mean reward per controller step in best.md."""

import numpy as np

from mnasnet_jax import pareto


def _record(trial, step, reward, status='ok'):
  return {
    'trial': trial,
    'step': step,
    'tokens': [trial],
    'blocks': ['r1_k3_s11_e6_i16_o16'],
    'accuracy': None if status != 'ok' else 0.5,
    'latency_ms': 1.0,
    'reward': reward,
    'params': 1,
    'macs': 1,
    'status': status,
  }


def test_mean_reward_per_step_in_best_md(tmp_path):
  # Step 0: 0.2 and 0.4; step 1: 0.6 and a failure at reward 0 (told); step 2: 0.9 and an oom child
  # (no reward, not told): means 0.3, 0.3, 0.9.
  records = [
    _record(0, 0, 0.2),
    _record(1, 0, 0.4),
    _record(2, 1, 0.6),
    _record(3, 1, 0.0, 'failed'),
    _record(4, 2, 0.9),
    _record(5, 2, None, 'oom'),
  ]
  means = pareto.mean_reward_per_step(records)
  assert [s for s, _ in means] == [0, 1, 2]
  np.testing.assert_allclose([m for _, m in means], [0.3, 0.3, 0.9])
  path = tmp_path / 'best.md'
  pareto.write_best(
    records, str(path), target_ms=1.0, top_k=2, train_config='configs/train.py', description='t'
  )
  assert (
    'Mean reward per controller step: 0.3000, 0.3000, 0.9000 (first 1 steps 0.3000, last 2 0.6000).'
    in path.read_text()
  )
