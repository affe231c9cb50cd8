"""benchmarks/train_parity.py's reference (PyTorch + timm) against this project's training step."""

import ml_collections
import numpy as np
import pytest

from mnasnet_jax import input_pipeline
from mnasnet_jax import optim
from mnasnet_jax.configs import train as train_config

pytest.importorskip('timm')


def _config(arch, **overrides):
  config = train_config.get_config('local')
  config.arch = arch
  config.data = ml_collections.ConfigDict(
    dict(
      dataset='synthetic',
      split='full',
      image_size=16,
      num_classes=4,
      num_train=256,
      num_eval=64,
      holdout=32,
      split_seed=0,
    )
  )
  config.batch_size = 32
  config.update(overrides)
  return config


@pytest.mark.parametrize(
  'arch',
  [
    pytest.param('mnasnet_a1', marks=pytest.mark.slow),
    'mnasnet_small',  # its first layer: no skip officially, where timm's rule would add one
    'r1_k3_s11_e1_i32_o16,r2_k5_s22_e3_i16_o24_se0.25_noskip',
  ],
)
def test_reference_is_the_same_function(arch, benchmark_module):
  parity = benchmark_module('train_parity')
  config = _config(arch)
  data = input_pipeline.create(config.data, 'full')
  reference = parity.reference_model(config, data.num_classes, data.image_size)
  assert parity.check_same_function(config, data, reference) < 1e-5


def test_reference_schedule_is_the_official_one(benchmark_module):
  parity = benchmark_module('train_parity')
  config = _config('mnasnet_a1', warmup_epochs=1.0, lr_decay_epochs=0.5)
  data = input_pipeline.create(config.data, 'full')
  per_epoch = parity.steps_per_epoch(config, data)
  schedule = optim.learning_rate_schedule(
    config.base_learning_rate,
    config.batch_size,
    per_epoch,
    config.warmup_epochs,
    config.lr_decay_rate,
    config.lr_decay_epochs,
  )
  steps = np.arange(40)
  np.testing.assert_allclose(
    schedule(steps), [parity.official_learning_rate(config, per_epoch, s) for s in steps], 1e-6
  )


@pytest.mark.slow
def test_project_step_tracks_the_reference_step(benchmark_module):
  """Same weights, same batches: RMSProp-TF, schedule, L2, label smoothing, BN's running averages
  and the EMA of both sides agree."""
  parity = benchmark_module('train_parity')
  config = _config(
    'r1_k3_s11_e1_i32_o16_noskip,r2_k3_s22_e3_i16_o24_se0.25', warmup_epochs=0.25, ema_decay=0.99
  )
  data = input_pipeline.create(config.data, 'full')
  history = parity.lockstep(config, data, 3)
  for record in history:
    np.testing.assert_allclose(record['jax'], record['torch'], rtol=1e-4)
  # Update 1 has the schedule's rate 0, update 2 is the first to move the weights; later, float32's
  # rounding alone parts two runs (the reference against itself in float64 does as fast).
  for record in history[:2]:
    assert max(record['gaps'].values()) < 1e-4, record['gaps']
  assert any(k.startswith('ema/') for k in history[-1]['gaps'])


def test_parity_holds_medians_to_the_reference_spread(benchmark_module):
  parity = benchmark_module('train_parity')
  curve = lambda *values: {str(s): parity.spread(list(v)) for s, v in zip((500, 1000), values)}
  reference = curve((0.40, 0.20, 0.70), (0.80, 0.76, 0.83))  # medians 0.40, 0.80; spreads 0.5, 0.07
  assert parity.parity(curve((0.22, 0.10, 0.65), (0.81, 0.39, 0.82)), reference) == {
    'median_gap': {'500': -0.18, '1000': 0.01},
    'within_reference_spread': True,
    'final_at_least_reference': True,
  }
  behind = parity.parity(curve((0.40, 0.40, 0.40), (0.70, 0.72, 0.71)), reference)
  assert behind['median_gap']['1000'] == -0.09
  assert not behind['within_reference_spread'] and not behind['final_at_least_reference']
