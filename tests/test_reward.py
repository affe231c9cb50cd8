import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import errors
from mnasnet_jax import reward
from mnasnet_jax.configs.search import get_config

# 2 ** -0.07 = exp(-0.07 * ln 2) = exp(-0.0485203) = 0.9526380; 0.5 ** -0.07 = 1.0497166.
TWO_TO_MINUS_007 = 0.9526380
HALF_TO_MINUS_007 = 1.0497166


def config(kind, **overrides):
  c = get_config().reward
  c.kind = kind
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.parametrize(
  'kind, latency, expected',
  [
    ('soft', 150.0, 0.75 * TWO_TO_MINUS_007),  # twice the target: about 5% less
    ('soft', 37.5, 0.75 * HALF_TO_MINUS_007),  # half the target: about 5% more
    ('soft', 75.0, 0.75),
    ('hard', 37.5, 0.75),  # alpha = 0: nothing gained below T
    ('hard', 150.0, 0.375),  # beta = -1: ACC * T / LAT above T
    ('capped', 37.5, 0.75),
    ('capped', 150.0, 0.75 * TWO_TO_MINUS_007),
    ('absolute', 150.0, 0.75 - 0.1),  # TuNAS: 0.75 - 0.1 * |2 - 1|
    ('absolute', 37.5, 0.75 - 0.05),
  ],
)
def test_scalar_rewards_by_hand(kind, latency, expected):
  got = reward.compute(config(kind), 0.75, latency, 75.0)
  assert got.shape == ()
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_batches_and_jit_agree_with_scalars():
  acc = np.array([0.5, 0.7, 0.9, 0.6], np.float32)
  lat = np.array([10.0, 75.0, 80.0, 300.0], np.float32)
  for kind in reward.KINDS:
    c = config(kind)
    batch = reward.compute(c, acc, lat, 75.0)
    jitted = jax.jit(lambda a, l: reward.compute(c, a, l, 75.0))(jnp.asarray(acc), jnp.asarray(lat))
    one_by_one = [float(reward.compute(c, a, l, 75.0)) for a, l in zip(acc, lat)]
    assert batch.shape == (4,)
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-6)
    np.testing.assert_allclose(jitted, one_by_one, rtol=1e-6)
  # hard by hand: 0.5, 0.7 (at T), 0.9 * 75/80, 0.6 / 4.
  np.testing.assert_allclose(
    reward.compute(config('hard'), acc, lat, 75.0), [0.5, 0.7, 0.84375, 0.15], rtol=1e-6
  )


def test_config_exponents_override_presets():
  assert reward.exponents(config('soft')) == (-0.07, -0.07)
  assert reward.exponents(config('hard')) == (0.0, -1.0)
  c = config('soft', alpha=-0.1, beta=-0.2)
  np.testing.assert_allclose(float(reward.compute(c, 1.0, 150.0, 75.0)), 2**-0.2, rtol=1e-6)
  np.testing.assert_allclose(float(reward.compute(c, 1.0, 37.5, 75.0)), 0.5**-0.1, rtol=1e-6)
  np.testing.assert_allclose(
    float(reward.compute(config('absolute', beta=-0.2), 0.8, 150.0, 75.0)), 0.6, rtol=1e-6
  )
  np.testing.assert_allclose(float(reward.mnas_reward(0.8, 150.0, 75.0, 0.0, -1.0)), 0.4, rtol=1e-6)


def test_bad_inputs():
  with pytest.raises(errors.UserError, match="unknown reward kind 'latency'"):
    reward.compute(config('latency'), 0.7, 70.0, 75.0)
  with pytest.raises(ValueError, match='target_ms is None'):
    reward.compute(config('soft'), 0.7, 70.0, None)
  with pytest.raises(ValueError, match='latency_ms must be positive'):
    reward.compute(config('soft'), np.array([0.7, 0.7]), np.array([70.0, 0.0]), 75.0)
  with pytest.raises(ValueError, match='target_ms must be positive'):
    reward.compute(config('hard'), 0.7, 70.0, -75.0)
