"""Device-specific choices, made in one place and selected by backend unless the config says otherwise.

* Depthwise convolution: XLA:CPU's grouped convolution (its gradient above all) is several times
  slower than the same conv written as k*k shifted multiply-adds, while on TPU and GPU the native
  grouped conv is the fast one, and export to TFLite needs the native op.
* Compute dtype: bfloat16 on TPU (its MXU's native input type), float32 elsewhere. Parameters stay
  float32 everywhere.
* The data-parallel mesh: one axis over every device of every process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

BATCH_AXIS = 'batch'
DEPTHWISE_FORMS = ('native', 'shifted')


def depthwise_form(setting: str = 'auto', backend: str | None = None) -> str:
  """'native' (grouped conv) on TPU/GPU, 'shifted' (k*k multiply-adds) on CPU, unless set."""
  if setting in DEPTHWISE_FORMS:
    return setting
  if setting != 'auto':
    raise ValueError(f'depthwise form must be "auto" or one of {DEPTHWISE_FORMS}, got {setting!r}')
  return 'shifted' if (backend or jax.default_backend()) == 'cpu' else 'native'


def compute_dtype(setting: str = 'auto', backend: str | None = None) -> jnp.dtype:
  """bfloat16 on TPU, float32 elsewhere, unless set ('float32' or 'bfloat16')."""
  if setting == 'auto':
    return jnp.bfloat16 if (backend or jax.default_backend()) == 'tpu' else jnp.float32
  if setting not in ('float32', 'bfloat16'):
    raise ValueError(f'compute dtype must be "auto", "float32" or "bfloat16", got {setting!r}')
  return jnp.dtype(setting)


def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh over all devices (of all processes) for data parallelism."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (BATCH_AXIS,))
