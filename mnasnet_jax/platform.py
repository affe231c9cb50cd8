"""Device-specific choices, made in one place and selected by backend unless the config says otherwise.

* Depthwise convolution: XLA:CPU's grouped convolution (its gradient above all) is tens of times
  slower than the same conv written as k*k shifted multiply-adds, and those in turn leave the
  kernel gradient to slow strided reductions; on CPU the conv and both gradients run as compiled
  C++ custom calls (depthwise_cpu), with the shifted form as the fallback. On TPU and GPU the native
  grouped conv is the fast one, and export to TFLite needs the native op.
* Regular (1x1, stem, k x k) convolution: XLA:CPU runs a conv's weight gradient as a conv with an
  image-sized window, tens of times slower than the same sums as a matrix product over the windows
  (im2col); elsewhere the conv op is kept (what the TPU/GPU compilers and TFLite know best).
* Compute dtype: bfloat16 on TPU (its MXU's native input type), float32 elsewhere. Parameters stay
  float32 everywhere.
* The data-parallel mesh: one axis over every device of every process.
* Host memory (any backend): the entry points run under tcmalloc when it is installed
  (allocator.py); glibc's malloc made XLA:CPU page-fault its buffers back in on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

BATCH_AXIS = 'batch'
DEPTHWISE_FORMS = ('native', 'shifted', 'kernel')
CONV_FORMS = ('native', 'matmul')


def _form(kind: str, setting: str, forms: tuple[str, ...], on_cpu, backend: str | None) -> str:
  if setting in forms:
    return setting
  if setting != 'auto':
    raise ValueError(f'{kind} form must be "auto" or one of {forms}, got {setting!r}')
  return on_cpu() if (backend or jax.default_backend()) == 'cpu' else 'native'


def depthwise_form(setting: str = 'auto', backend: str | None = None, dtype=jnp.float32) -> str:
  """'native' (grouped conv) on TPU/GPU; on CPU 'kernel' (compiled C++, float32) when it builds
  here, else 'shifted' (k*k multiply-adds in XLA); unless set."""
  def on_cpu():
    from mnasnet_jax import depthwise_cpu  # pylint: disable=g-import-not-at-top (builds on use)
    return 'kernel' if jnp.dtype(dtype) == jnp.float32 and depthwise_cpu.available() else 'shifted'
  return _form('depthwise', setting, DEPTHWISE_FORMS, on_cpu, backend)


def conv_form(setting: str = 'auto', backend: str | None = None) -> str:
  """'native' (conv op) on TPU/GPU, 'matmul' (a matrix product over windows) on CPU, unless set."""
  return _form('conv', setting, CONV_FORMS, lambda: 'matmul', backend)


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
