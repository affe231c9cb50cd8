"""BatchNorm as the official recipe normalises: statistics over groups of a fixed number of images.

The official MnasNet trains with plain BatchNorm under TPUEstimator, so each TPU core normalises by
the statistics of its own images: 128 at batch 4096 on 32 cores, as at the default 1024 on 8 cores.
`group_size` images per statistic is that recipe on any number of devices and any per-device
batch: a device holding several groups splits its images into groups of their own, and a device
holding fewer images than a group shares its statistics with the few devices that make up the
group. None is one group of the whole global batch.

The running averages keep the mean over all groups of the per-group statistics. Under TPUEstimator
each core keeps its own moving averages, and core 0's are the ones saved; the mean over the groups
is the closest single value, and the one every device agrees on. Their variance is the
Bessel-corrected one, n / (n - 1) times the biased variance that normalises (n = images x height x
width of a group), as TF's fused BatchNorm keeps it.

`BatchNorm` here is the native form (the gradient by autodiff); cpu/batch_norm.py writes the same
module's gradient in closed form.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from mnasnet_jax import errors


@dataclasses.dataclass(frozen=True)
class Grouping:
  """How one device's `batch` images form the statistics' groups."""

  batch: int
  groups_per_device: int  # the device's images split into this many groups of their own
  devices_per_group: int  # or one group spans this many devices' images (1: within a device)
  devices: int

  @property
  def images(self) -> int:
    """Images per statistic."""
    return self.batch // self.groups_per_device * self.devices_per_group


def grouping(batch: int, devices: int, group_size: int | None) -> Grouping:
  """Groups of `group_size` images from `batch` images on each of `devices` devices; the nearest
  smaller groups that tile the batch when `group_size` does not (the whole global batch when it is
  smaller than a group)."""
  if group_size is not None and group_size < 1:
    raise errors.UserError(
      f'bn_group_size = {group_size}: expected a number of images >= 1, or '
      'None for the whole global batch'
    )
  if group_size is None or group_size >= batch * devices:
    return Grouping(batch, 1, devices, devices)
  if group_size <= batch:
    groups = min(k for k in range(1, batch + 1) if batch % k == 0 and batch // k <= group_size)
    return Grouping(batch, groups, 1, devices)
  shared = max(d for d in range(1, devices + 1) if devices % d == 0 and batch * d <= group_size)
  return Grouping(batch, 1, shared, devices)


def group_mean(stats, axis_name: str | None, layout: Grouping):
  """The mean of per-device `stats` over the devices of this device's group. shard_map has no
  axis_index_groups: a group that spans some of the devices gathers all and averages its own."""
  if layout.devices_per_group == 1 or axis_name is None:
    return stats
  if layout.devices_per_group == layout.devices:
    return lax.pmean(stats, axis_name)
  gathered = lax.all_gather(stats, axis_name)
  first = lax.axis_index(axis_name) // layout.devices_per_group * layout.devices_per_group
  return jnp.mean(lax.dynamic_slice_in_dim(gathered, first, layout.devices_per_group), 0)


def split_groups(x, layout: Grouping):
  """[N, H, W, C] as [groups, N / groups, H, W, C]: the device's groups on the leading axis."""
  return x.reshape((layout.groups_per_device, -1) + x.shape[1:])


def statistics(groups, axis_name: str | None, layout: Grouping):
  """Per-group mean and biased variance of `split_groups` output, [groups, 1, 1, 1, C] each, in
  float32, as E[x^2] - E[x]^2 clipped at 0: nn.BatchNorm's statistics, per group."""
  groups = groups.astype(jnp.promote_types(groups.dtype, jnp.float32))
  moments = jnp.stack(
    [
      jnp.mean(groups, (1, 2, 3), keepdims=True),
      jnp.mean(jnp.square(groups), (1, 2, 3), keepdims=True),
    ]
  )
  mean, mean_square = group_mean(moments, axis_name, layout)
  return mean, jnp.maximum(0.0, mean_square - jnp.square(mean))


def affine(x, mean, var, scale, bias, epsilon: float):
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


class BatchNorm(nn.Module):
  """BatchNorm over NHWC inputs with nn.BatchNorm's variables ('scale', 'bias'; batch_stats 'mean',
  'var'), arguments and momentum rule, its statistics over groups of `group_size` images."""

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32
  axis_name: str | None = None
  group_size: int | None = None

  def normalize(self, groups, scale, bias, axis_name, layout):
    """(normalised groups, their mean, their variance): the gradient flows through the statistics
    by autodiff."""
    mean, var = statistics(groups, axis_name, layout)
    return affine(groups, mean, var, scale, bias, self.epsilon), mean, var

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    if use_running_average:
      return affine(x, running_mean.value, running_var.value, scale, bias, self.epsilon).astype(
        self.dtype
      )
    # During init the batch axis may not exist yet, as in nn.BatchNorm.
    axis_name = None if self.is_initializing() else self.axis_name
    devices = 1 if axis_name is None else lax.axis_size(axis_name)
    layout = grouping(x.shape[0], devices, self.group_size)
    y, mean, var = self.normalize(split_groups(x, layout), scale, bias, axis_name, layout)
    if not self.is_initializing():
      count = layout.images * x.shape[1] * x.shape[2]
      stats = jnp.stack(
        [
          jnp.mean(mean, 0).reshape(features),
          jnp.mean(var, 0).reshape(features) * count / max(count - 1, 1),
        ]
      )
      if axis_name is not None and layout.devices_per_group < devices:
        stats = lax.pmean(stats, axis_name)  # the mean over every device's groups
      stats = lax.stop_gradient(stats)
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * stats[0]
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * stats[1]
    return y.reshape(x.shape).astype(self.dtype)
