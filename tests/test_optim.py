import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnasnet_jax import train


def test_schedule_closed_form():
  # Paper: 0.016 per 256 images at batch 4096 -> 0.256; 5 warmup epochs; x0.97 every 2.4 epochs.
  spe = 1000
  schedule = train.learning_rate_schedule(0.016, 4096, spe)
  expected = {
    0: 0.0,
    1: 0.256 / 5000,
    2500: 0.256 * 0.5,
    4999: 0.256 * 4999 / 5000,
    5000: 0.256 * 0.97**2,
    7199: 0.256 * 0.97**2,
    7200: 0.256 * 0.97**3,
    240_000: 0.256 * 0.97**100,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-9)


def test_schedule_without_warmup_is_staircase_from_step_zero():
  schedule = train.learning_rate_schedule(0.016, 256, 10, warmup_epochs=0, decay_epochs=2.4)
  assert [round(float(schedule(s)), 8) for s in (0, 23, 24, 47, 48)] == [
    0.016,
    0.016,
    round(0.016 * 0.97, 8),
    round(0.016 * 0.97, 8),
    round(0.016 * 0.97**2, 8),
  ]


def test_schedule_at_the_official_float_steps_per_epoch():
  # mnasnet_main.py: steps_per_epoch = 1,281,167 / 4096 = 312.785. The warmup's length is truncated
  # (int(5 * 312.785) = 1563), the decay period 2.4 * 312.785 = 750.68 is not: the third decay
  # comes at step 2253, not at 2250 as with a truncated 750.
  spe = 1_281_167 / 4096
  schedule = train.learning_rate_schedule(0.016, 4096, spe)
  expected = {
    1562: 0.256 * 1562 / 1563,
    1563: 0.256 * 0.97**2,
    2252: 0.256 * 0.97**2,
    2253: 0.256 * 0.97**3,
    109_473: 0.256 * 0.97**145,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5)
  config = ml_collections.ConfigDict({'num_steps': 0, 'num_epochs': 350.0})
  assert train.num_steps(config, spe) == 109_474  # int(350 * 312.785), not 350 * 312 = 109,200


def _tf_rmsprop_numpy(w, grads, lrs, decay=0.9, momentum=0.9, eps=1e-3):
  """tf.compat.v1.train.RMSPropOptimizer's update, written out by hand."""
  ms, mom = np.ones_like(w), np.zeros_like(w)
  for g, lr in zip(grads, lrs):
    ms = ms + (g * g - ms) * (1 - decay)
    mom = momentum * mom + lr * g / np.sqrt(ms + eps)
    w = w - mom
  return w


def test_rmsprop_tf_matches_hand_computed_steps():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(3, 4)).astype(np.float32)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (1.0, 0.01, 3.0)]
  lrs = [0.1, 0.05, 0.2]
  tx = train.rmsprop_tf(lambda count: jnp.asarray(lrs)[count])
  params = {'w': jnp.asarray(w0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params['w'], _tf_rmsprop_numpy(w0, grads, lrs), rtol=1e-5)
  # One step by hand: ms = 0.9 + 0.1 g^2, update = -lr g / sqrt(ms + 1e-3).
  g = np.float32(2.0)
  updates, _ = train.rmsprop_tf(0.5).update(
    {'w': jnp.full(1, g)}, train.rmsprop_tf(0.5).init({'w': jnp.zeros(1)})
  )
  np.testing.assert_allclose(updates['w'], [-0.5 * 2.0 / np.sqrt(0.9 + 0.4 + 1e-3)], rtol=1e-6)


def test_rmsprop_tf_differs_from_optax_rmsprop():
  # Mean square starting at 1 and eps inside the root make the first step far smaller than optax's.
  g = {'w': jnp.full(1, 0.01)}
  tf_update, _ = train.rmsprop_tf(1.0, momentum=0.0).update(g, train.rmsprop_tf(1.0).init(g))
  ox = optax.rmsprop(1.0, decay=0.9, eps=1e-3)
  ox_update, _ = ox.update(g, ox.init(g))
  assert abs(float(tf_update['w'][0])) < 0.02 < abs(float(ox_update['w'][0]))
