"""The official recipe's optimizer and learning-rate schedule, with TensorFlow's exact semantics.

TF's RMSProp differs from optax.rmsprop in three ways that matter at epsilon 1e-3: the mean square
starts at 1.0 (not 0), epsilon sits inside the square root, and momentum accumulates steps already
scaled by the learning rate (so a falling rate does not shrink the momentum already built up).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnasnet_jax import errors


class RMSPropTFState(NamedTuple):
  count: jax.Array
  mean_square: optax.Updates
  momentum: optax.Updates


def rmsprop_tf(
  learning_rate: optax.ScalarOrSchedule,
  decay: float = 0.9,
  momentum: float = 0.9,
  eps: float = 1e-3,
) -> optax.GradientTransformation:
  """tf.compat.v1.train.RMSPropOptimizer:
      ms  <- decay * ms + (1 - decay) * g**2            (ms starts at 1)
      mom <- momentum * mom + lr * g / sqrt(ms + eps)
      w   <- w - mom
  The learning rate may be a schedule of the step count (0 at the first update)."""

  def init(params):
    return RMSPropTFState(
      jnp.zeros([], jnp.int32),
      jax.tree.map(jnp.ones_like, params),
      jax.tree.map(jnp.zeros_like, params),
    )

  def update(grads, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    mean_square = jax.tree.map(
      lambda ms, g: decay * ms + (1 - decay) * jnp.square(g), state.mean_square, grads
    )
    mom = jax.tree.map(
      lambda m, g, ms: momentum * m + lr * g * jax.lax.rsqrt(ms + eps),
      state.momentum,
      grads,
      mean_square,
    )
    updates = jax.tree.map(jnp.negative, mom)
    return updates, RMSPropTFState(optax.safe_int32_increment(state.count), mean_square, mom)

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(
  base_lr: float,
  batch_size: int,
  steps_per_epoch: float,
  warmup_epochs: float = 5,
  decay_rate: float = 0.97,
  decay_epochs: float = 2.4,
) -> optax.Schedule:
  """Official schedule (mnasnet_utils.build_learning_rate): base_lr per 256 images scaled to the
  batch, linear warmup from 0, and a staircase exponential decay counted from step 0 (so the
  warmup's epochs count toward it). `steps_per_epoch` is the official float (1,281,167 / 4096 =
  312.785): the warmup's length is truncated to whole steps (1563), the decay period is not
  (floor(step / 750.68), as tf.train.exponential_decay with staircase)."""
  peak = base_lr * batch_size / 256
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  decay_steps = decay_epochs * steps_per_epoch
  if decay_steps <= 0:
    raise errors.UserError(
      f'lr_decay_epochs = {decay_epochs} at {steps_per_epoch} steps per '
      'epoch: expected a positive decay period'
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    decayed = peak * decay_rate ** jnp.floor(step / decay_steps)
    if warmup_steps == 0:
      return decayed
    return jnp.where(step < warmup_steps, peak * step / warmup_steps, decayed)

  return schedule
