"""The depthwise conv and its gradient as compiled XLA:CPU custom calls (depthwise_kernel.cc).

XLA:CPU runs the kernel gradient of a depthwise conv (a per-channel sum over every pixel of k*k
products) as scalar loops striding across channels: in MnasNet-A1's training step at 224 px it
took a quarter of the step. The C++ kernels sum along the contiguous channel axis instead. They are
compiled with the machine's C++ compiler on first use (a few seconds) and cached per source and
CPU; `available()` says whether that worked, and platform.depthwise_form falls back to the 'shifted'
form (forms.py) when it did not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform as host
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import blocks as blocks_lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'depthwise_kernel.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
_TARGETS = {'forward': 'MnasDepthwiseForward', 'backward': 'MnasDepthwiseBackward'}


def _cpu_identity() -> str:
  """The CPU's model and features: the library is built with -march=native."""
  try:
    with open('/proc/cpuinfo') as f:
      return ''.join(sorted({line for line in f if line.startswith(('model name', 'flags'))}))
  except OSError:
    return host.processor() + host.machine()


def cache_dir() -> str:
  return os.environ.get(
    'MNASNET_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'mnasnet_jax')
  )


def _build() -> str:
  """Compiles the kernels unless a library for this source, jaxlib and CPU is cached; its path."""
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(
    source + jax.__version__.encode() + ' '.join(FLAGS).encode() + _cpu_identity().encode()
  ).hexdigest()[:16]
  path = os.path.join(cache_dir(), f'depthwise_kernel_{key}.so')
  if os.path.exists(path):
    return path
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise RuntimeError('no C++ compiler (g++) found; install one (apt-get install g++) or set CXX')
  os.makedirs(cache_dir(), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix='.so', dir=cache_dir())
  os.close(fd)
  command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', SOURCE, '-o', partial]
  logging.info('Compiling the depthwise CPU kernels: %s', ' '.join(command))
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    os.remove(partial)
    raise RuntimeError(f'compiling {SOURCE} failed:\n{result.stderr[-2000:]}')
  os.replace(partial, path)  # atomic: concurrent builders each leave a whole library
  return path


_LOCK = threading.Lock()  # the search builds a child's programs on several threads at once


@functools.cache
def _load_once():
  try:
    library = ctypes.cdll.LoadLibrary(_build())
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
        f'mnasnet_depthwise_{name}', jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu'
      )
  except (OSError, RuntimeError, AttributeError) as error:
    logging.warning('Depthwise CPU kernels unavailable (%s); using the shifted form.', error)
    return error
  return None


def _load():
  """Builds, loads and registers the kernels once per process; the exception if that failed."""
  with _LOCK:
    return _load_once()


def available() -> bool:
  return _load() is None


def _attributes(size, kernel_size: int, stride: int, padding: str) -> dict:
  pads = [blocks_lib.conv_padding(s, kernel_size, stride, padding) for s in size]
  return {'stride': np.int64(stride), 'top': np.int64(pads[0][0]), 'left': np.int64(pads[1][0])}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x, kernel, stride: int, padding: str):
  """k x k depthwise conv, NHWC float32, on CPU only; `padding` is one of blocks.PADDINGS (both
  give the same output size: the kernels take the top and left padding alone)."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f'the depthwise CPU kernels take float32, got {x.dtype} and {kernel.dtype}')
  if not available():
    raise RuntimeError(f'the depthwise CPU kernels are unavailable: {_load()}')
  n, h, w, c = x.shape
  out = jax.ShapeDtypeStruct(
    (n, blocks_lib.same_output_size(h, stride), blocks_lib.same_output_size(w, stride), c),
    jnp.float32,
  )
  return jax.ffi.ffi_call('mnasnet_depthwise_forward', out)(
    x, kernel, **_attributes((h, w), kernel.shape[0], stride, padding)
  )


def _forward(x, kernel, stride, padding):
  return depthwise(x, kernel, stride, padding), (x, kernel)


def _backward(stride, padding, residuals, grad):
  x, kernel = residuals
  outs = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, kernel))
  return jax.ffi.ffi_call('mnasnet_depthwise_backward', outs)(
    x, kernel, grad, **_attributes(x.shape[1:3], kernel.shape[0], stride, padding)
  )


depthwise.defvjp(_forward, _backward)
