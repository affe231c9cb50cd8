"""The depthwise and regular convolutions written for XLA:CPU, in XLA alone.

Both compute what models.depthwise_native and models.conv_native do (same kernels, same padding:
blocks.PADDINGS), from the k*k strided windows of the padded input: the depthwise conv as per-channel multiply-adds
of the windows, the regular conv as one matrix product over them (im2col). platform.py says why
each is the faster form on CPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from mnasnet_jax import blocks as blocks_lib


def _windows(padded, kernel_size: int, stride: int, out_h: int, out_w: int):
  """The k*k strided views of `padded` that each kernel tap multiplies, row-major."""
  n, _, _, c = padded.shape
  return [
    lax.slice(
      padded,
      (0, i, j, 0),
      (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
      (1, stride, stride, 1),
    )
    for i in range(kernel_size)
    for j in range(kernel_size)
  ]


def _shifted_sum(padded, kernel, stride: int, out_h: int, out_w: int):
  k = kernel.shape[0]
  taps = kernel.reshape(k * k, -1)
  out = None
  for t, window in enumerate(_windows(padded, k, stride, out_h, out_w)):
    out = window * taps[t] if out is None else out + window * taps[t]
  return out


def _pad(x, kernel_size: int, stride: int, padding: str):
  pads = [blocks_lib.conv_padding(size, kernel_size, stride, padding) for size in x.shape[1:3]]
  return jnp.pad(x, ((0, 0), *pads, (0, 0))), pads


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x, kernel, stride: int, padding: str):
  """The depthwise conv as k*k strided slices times per-channel weights: the CPU fallback when the
  compiled kernel (depthwise_kernel.py) cannot be built, and the CPU form for bfloat16.

  Its gradient is written by hand as the same kind of shifted sums (XLA's own transpose of the
  strided slices compiles slowly and runs no faster).
  """
  padded, _ = _pad(x, kernel.shape[0], stride, padding)
  out_h, out_w = (blocks_lib.same_output_size(s, stride) for s in x.shape[1:3])
  return _shifted_sum(padded, kernel, stride, out_h, out_w)


def _depthwise_shifted_fwd(x, kernel, stride, padding):
  return depthwise_shifted(x, kernel, stride, padding), (x, kernel)


def _depthwise_shifted_bwd(stride, padding, residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  padded, ((top, _), (left, _)) = _pad(x, k, stride, padding)
  out_h, out_w = grad.shape[1:3]
  windows = _windows(padded, k, stride, out_h, out_w)
  # One variadic reduction for all k*k taps: a single pass over the input and gradient. (A sum per
  # tap becomes a library dot on XLA:CPU that needs each tap's window written out whole.)
  products = [w * grad for w in windows]
  grad_kernel = jnp.stack(
    lax.reduce(
      products,
      [jnp.zeros((), grad.dtype)] * len(products),
      lambda xs, ys: [a + b for a, b in zip(xs, ys)],
      (0, 1, 2),
    )
  )
  # The input gradient is a full correlation of the stride-dilated output gradient with the
  # flipped kernel, over the padded input's extent, cropped back to the unpadded input.
  dilated = lax.pad(
    grad,
    jnp.zeros((), grad.dtype),
    ((0, 0, 0), (k - 1, k - 1, stride - 1), (k - 1, k - 1, stride - 1), (0, 0, 0)),
  )
  reach_h, reach_w = (out_h - 1) * stride + k, (out_w - 1) * stride + k
  grad_padded = _shifted_sum(dilated, kernel[::-1, ::-1], 1, reach_h, reach_w)
  grad_padded = jnp.pad(
    grad_padded,
    (
      (0, 0),
      (0, max(padded.shape[1] - reach_h, 0)),
      (0, max(padded.shape[2] - reach_w, 0)),
      (0, 0),
    ),
  )
  grad_x = grad_padded[:, top : top + x.shape[1], left : left + x.shape[2], :]
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def conv_matmul(x, kernel, stride: int, padding: str):
  """The regular conv as one (pixels, k*k*C) x (k*k*C, O) matrix product over the k*k windows (for
  1x1 stride 1 the input itself). XLA:CPU runs a conv's weight gradient as a conv with an
  image-sized window, tens of times slower than this product's."""
  k, _, c, features = kernel.shape
  if k == 1 and stride == 1:
    patches = x
  else:
    padded, _ = _pad(x, k, stride, padding)
    out_h, out_w = (blocks_lib.same_output_size(s, stride) for s in x.shape[1:3])
    patches = jnp.concatenate(_windows(padded, k, stride, out_h, out_w), axis=-1)
  n, h, w, depth = patches.shape
  return jnp.dot(patches.reshape(n * h * w, depth), kernel.reshape(k * k * c, features)).reshape(
    n, h, w, features
  )
