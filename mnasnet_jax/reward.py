"""The multi-objective reward (paper section 3) and the other published latency-aware rewards.

    mnas:     ACC * (LAT / T)^w,  w = alpha if LAT <= T else beta      (paper, eq. 2)
              soft: alpha = beta = -0.07 (doubling latency costs about 5% relative accuracy);
              hard: alpha = 0, beta = -1 (no gain below T, a steep penalty above it)
    capped:   ACC * min((LAT / T)^beta, 1)                                (no reward for beating T)
    absolute: ACC + beta * |LAT / T - 1|                                  (TuNAS, beta = -0.1)

Every function works on Python scalars and on (broadcastable) NumPy / JAX arrays, and is jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import errors

KINDS = ('soft', 'hard', 'capped', 'absolute')
# (alpha, beta) each kind uses when the config leaves them None.
PRESETS = {
  'soft': (-0.07, -0.07),
  'hard': (0.0, -1.0),
  'capped': (None, -0.07),
  'absolute': (None, -0.1),
}


def _check_positive(name, value):
  if not isinstance(value, jax.core.Tracer) and np.any(np.asarray(value) <= 0):
    raise ValueError(f'{name} must be positive, got {value!r}')


def _ratio(latency_ms, target_ms):
  _check_positive('latency_ms', latency_ms)
  _check_positive('target_ms', target_ms)
  return jnp.asarray(latency_ms, jnp.float32) / jnp.asarray(target_ms, jnp.float32)


def mnas_reward(accuracy, latency_ms, target_ms, alpha, beta):
  """ACC * (LAT / T)^w with w = alpha when LAT <= T, beta otherwise."""
  ratio = _ratio(latency_ms, target_ms)
  return jnp.asarray(accuracy, jnp.float32) * ratio ** jnp.where(ratio <= 1.0, alpha, beta)


def capped_reward(accuracy, latency_ms, target_ms, beta):
  """ACC * min((LAT / T)^beta, 1): the soft penalty above the target, nothing for beating it."""
  ratio = _ratio(latency_ms, target_ms)
  return jnp.asarray(accuracy, jnp.float32) * jnp.minimum(ratio**beta, 1.0)


def absolute_reward(accuracy, latency_ms, target_ms, beta):
  """TuNAS: ACC + beta * |LAT / T - 1|, penalising distance from the target either way."""
  ratio = _ratio(latency_ms, target_ms)
  return jnp.asarray(accuracy, jnp.float32) + beta * jnp.abs(ratio - 1.0)


def exponents(config) -> tuple:
  """(alpha, beta) of `config.kind`: the config's values, or the kind's preset where None."""
  if config.kind not in KINDS:
    raise errors.UserError(f'unknown reward kind {config.kind!r}: expected one of {KINDS}')
  alpha, beta = PRESETS[config.kind]
  alpha = alpha if config.alpha is None else float(config.alpha)
  beta = beta if config.beta is None else float(config.beta)
  return alpha, beta


def compute(config, accuracy, latency_ms, target_ms):
  """The reward `config.kind` with the config's alpha and beta, for scalars or batches."""
  if target_ms is None:
    raise ValueError(
      'target_ms is None: resolve config.reward.target_ms (None means the latency '
      'of mobilenet_v2 in the latency table) before computing rewards'
    )
  alpha, beta = exponents(config)
  if config.kind in ('soft', 'hard'):
    return mnas_reward(accuracy, latency_ms, target_ms, alpha, beta)
  if config.kind == 'capped':
    return capped_reward(accuracy, latency_ms, target_ms, beta)
  return absolute_reward(accuracy, latency_ms, target_ms, beta)
