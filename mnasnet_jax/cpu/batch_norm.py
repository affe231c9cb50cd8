"""Batch normalisation: nn.BatchNorm's variables and statistics, with its gradient in closed form.

Autodiff of nn.BatchNorm keeps `x - mean` as a residual beside `x`: one more full-size tensor
written in the forward pass and read back in the backward, for every BN layer. A MnasNet training
step on XLA:CPU is bound by memory traffic, and those tensors were a large part of it. The gradient
here is the textbook one over the global batch, recomputed from `x` alone. platform.batch_norm_form
chooses it on CPU, where it was measured; elsewhere nn.BatchNorm runs.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_AXES = (0, 1, 2)  # NHWC: statistics per channel


def batch_statistics(x, axis_name: str | None = None):
  """Per-channel mean and biased variance over the batch (and over `axis_name`'s devices), in
  float32, as E[x^2] - E[x]^2 clipped at 0: nn.BatchNorm's statistics."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, mean_square = jnp.mean(x, _AXES), jnp.mean(jnp.square(x), _AXES)
  if axis_name is not None:
    mean, mean_square = lax.pmean(jnp.stack([mean, mean_square]), axis_name)
  return mean, jnp.maximum(0.0, mean_square - jnp.square(mean))


def _affine(x, mean, var, scale, bias, epsilon):
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def normalize_batch(x, mean, var, scale, bias, epsilon: float, axis_name: str | None):
  """(x - mean) / sqrt(var + epsilon) * scale + bias, where (mean, var) are `x`'s own
  `batch_statistics`. The gradient with respect to `x` includes the path through the statistics,
  so `mean` and `var` receive none of their own."""
  return _affine(x, mean, var, scale, bias, epsilon)


def _normalize_batch_fwd(x, mean, var, scale, bias, epsilon, axis_name):
  return _affine(x, mean, var, scale, bias, epsilon), (x, mean, var, scale)


def _normalize_batch_bwd(epsilon, axis_name, residuals, grad):
  x, mean, var, scale = residuals
  rstd = lax.rsqrt(var + epsilon)
  x_hat = (x - mean) * rstd
  grad_bias = jnp.sum(grad, _AXES)
  grad_scale = jnp.sum(grad * x_hat, _AXES)
  count = x.size // x.shape[-1]
  mean_grad, mean_grad_x_hat = grad_bias / count, grad_scale / count
  if axis_name is not None:
    mean_grad, mean_grad_x_hat = lax.pmean(jnp.stack([mean_grad, mean_grad_x_hat]), axis_name)
  grad_x = (scale * rstd) * (grad - mean_grad - x_hat * mean_grad_x_hat)
  return (grad_x.astype(x.dtype), jnp.zeros_like(mean), jnp.zeros_like(var), grad_scale,
          grad_bias)


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm over NHWC inputs with the same variables ('scale', 'bias'; batch_stats 'mean',
  'var'), arguments, momentum rule and statistics; only its gradient is computed differently."""

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    if use_running_average:
      y = _affine(x, running_mean.value, running_var.value, scale, bias, self.epsilon)
    else:
      # During init the batch axis may not exist yet, as in nn.BatchNorm.
      axis_name = None if self.is_initializing() else self.axis_name
      mean, var = jax.lax.stop_gradient(batch_statistics(x, axis_name))
      y = normalize_batch(x, mean, var, scale, bias, self.epsilon, axis_name)
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)
