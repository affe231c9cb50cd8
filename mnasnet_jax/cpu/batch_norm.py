"""Batch normalisation: bn_groups.BatchNorm's variables and statistics, its gradient in closed form.

Autodiff of nn.BatchNorm keeps `x - mean` as a residual beside `x`: one more full-size tensor
written in the forward pass and read back in the backward, for every BN layer. A MnasNet training
step on XLA:CPU is bound by memory traffic, and those tensors were a large part of it. The gradient
here is the textbook one over each group of images (bn_groups.py), recomputed from `x` alone.
platform.batch_norm_form chooses it on CPU, where it was measured; elsewhere the same module with
autodiff's gradient (bn_groups.BatchNorm) runs.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from mnasnet_jax import bn_groups

_AXES = (1, 2, 3)  # [groups, N / groups, H, W, C]: statistics per group and channel


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def normalize_batch(
  groups, mean, var, scale, bias, epsilon: float, axis_name: str | None, layout: bn_groups.Grouping
):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over `bn_groups.split_groups` output, where
  (mean, var) are the groups' own `bn_groups.statistics`. The gradient with respect to `groups`
  includes the path through the statistics, so `mean` and `var` receive none of their own."""
  return bn_groups.affine(groups, mean, var, scale, bias, epsilon)


def _normalize_batch_fwd(groups, mean, var, scale, bias, epsilon, axis_name, layout):
  return bn_groups.affine(groups, mean, var, scale, bias, epsilon), (groups, mean, var, scale)


def _normalize_batch_bwd(epsilon, axis_name, layout, residuals, grad):
  groups, mean, var, scale = residuals
  rstd = lax.rsqrt(var + epsilon)
  x_hat = (groups - mean) * rstd
  grad_bias = jnp.sum(grad, _AXES, keepdims=True)
  grad_scale = jnp.sum(grad * x_hat, _AXES, keepdims=True)
  count = groups[0].size // groups.shape[-1]
  mean_grad, mean_grad_x_hat = bn_groups.group_mean(
    jnp.stack([grad_bias / count, grad_scale / count]), axis_name, layout
  )
  grad_x = (scale * rstd) * (grad - mean_grad - x_hat * mean_grad_x_hat)
  return (
    grad_x.astype(groups.dtype),
    jnp.zeros_like(mean),
    jnp.zeros_like(var),
    jnp.sum(grad_scale, (0, 1, 2, 3)),
    jnp.sum(grad_bias, (0, 1, 2, 3)),
  )


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(bn_groups.BatchNorm):
  """bn_groups.BatchNorm (nn.BatchNorm's variables, arguments and momentum rule, statistics per
  group); only its gradient is computed differently."""

  def normalize(self, groups, scale, bias, axis_name, layout):
    mean, var = lax.stop_gradient(bn_groups.statistics(groups, axis_name, layout))
    return (
      normalize_batch(groups, mean, var, scale, bias, self.epsilon, axis_name, layout),
      mean,
      var,
    )
