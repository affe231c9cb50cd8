"""Device-specific choices, made in one place and selected by backend unless the config says otherwise.

Each op has a native form (the first of its forms below: what TPU/GPU compilers and TFLite know
best, chosen off CPU) and forms written for XLA:CPU (mnasnet_jax/cpu/, chosen on CPU):

* Depthwise convolution (DEPTHWISE_FORMS): XLA:CPU's grouped convolution (its gradient above all)
  is tens of times slower than the same conv written as k*k shifted multiply-adds ('shifted'), and
  those in turn leave the kernel gradient to slow strided reductions; on CPU the conv and both
  gradients run as compiled C++ custom calls ('kernel', cpu/depthwise_kernel.py), with 'shifted' as
  the fallback. 'kernel' runs on CPU only and is refused elsewhere. Export to TFLite needs 'native'.
* Regular (1x1, stem, k x k) convolution (CONV_FORMS): XLA:CPU runs a conv's weight gradient as a
  conv with an image-sized window, tens of times slower than the same sums as a matrix product over
  the windows ('matmul', im2col).
* BatchNorm (BATCH_NORM_FORMS): autodiff of BatchNorm ('autodiff', bn_groups.py) keeps one more
  full-size tensor per BN for the backward pass; on CPU, where a step is bound by memory traffic,
  the gradient in closed form ('closed_form', cpu/batch_norm.py) recomputes it from the input.
* Compute dtype: bfloat16 on TPU (its MXU's native input type), float32 elsewhere. Parameters stay
  float32 everywhere.
* The data-parallel mesh: one axis over every device of every process.
* Host memory (CPU runs only): the entry points run under tcmalloc when it is installed
  (allocator.py); glibc's malloc made XLA:CPU page-fault its buffers back in on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from mnasnet_jax import cpu
from mnasnet_jax import errors

BATCH_AXIS = 'batch'
DEPTHWISE_FORMS = ('native', *cpu.DEPTHWISE)
CONV_FORMS = ('native', *cpu.CONV)
BATCH_NORM_FORMS = ('autodiff', *cpu.BATCH_NORM)


def _form(kind: str, setting: str, forms: tuple[str, ...], on_cpu, backend: str | None) -> str:
  """`setting` if it is one of `forms` this backend runs; for 'auto' `on_cpu()` on CPU, else the
  native form (the first)."""
  if setting not in ('auto', *forms):
    raise errors.UserError(f'{kind} form must be "auto" or one of {forms}, got {setting!r}')
  if setting == 'auto' or setting in cpu.CPU_ONLY:
    backend = backend or jax.default_backend()
  if setting == 'auto':
    return on_cpu() if backend == 'cpu' else forms[0]
  if setting in cpu.CPU_ONLY and backend != 'cpu':
    runnable = tuple(f for f in forms if f not in cpu.CPU_ONLY)
    raise errors.UserError(
      f'{kind} form {setting!r} is an XLA:CPU custom call and this run is on '
      f'{backend}: expected "auto" or one of {runnable}'
    )
  return setting


def depthwise_form(setting: str = 'auto', backend: str | None = None, dtype=jnp.float32) -> str:
  """'native' (grouped conv) on TPU/GPU; on CPU 'kernel' (compiled C++, float32) when it builds
  here, else 'shifted' (k*k multiply-adds in XLA); unless set."""

  def on_cpu():
    ready = jnp.dtype(dtype) == jnp.float32 and cpu.depthwise_kernel.available()  # builds on use
    return 'kernel' if ready else 'shifted'

  return _form('depthwise', setting, DEPTHWISE_FORMS, on_cpu, backend)


def conv_form(setting: str = 'auto', backend: str | None = None) -> str:
  """'native' (conv op) on TPU/GPU, 'matmul' (a matrix product over windows) on CPU, unless set."""
  return _form('conv', setting, CONV_FORMS, lambda: 'matmul', backend)


def batch_norm_form(setting: str = 'auto', backend: str | None = None) -> str:
  """'autodiff' (bn_groups.BatchNorm) on TPU/GPU, 'closed_form' (its gradient by hand) on CPU,
  unless set."""
  return _form('batch_norm', setting, BATCH_NORM_FORMS, lambda: 'closed_form', backend)


def compute_dtype(setting: str = 'auto', backend: str | None = None) -> jnp.dtype:
  """bfloat16 on TPU, float32 elsewhere, unless set ('float32' or 'bfloat16')."""
  if setting == 'auto':
    return jnp.bfloat16 if (backend or jax.default_backend()) == 'tpu' else jnp.float32
  if setting not in ('float32', 'bfloat16'):
    raise errors.UserError(
      f'compute dtype must be "auto", "float32" or "bfloat16", got {setting!r}'
    )
  return jnp.dtype(setting)


def data_mesh(devices=None) -> Mesh:
  """A one-axis mesh over all devices (of all processes) for data parallelism."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (BATCH_AXIS,))
