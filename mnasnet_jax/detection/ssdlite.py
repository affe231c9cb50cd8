"""SSDLite (MobileNetV2 paper, section 6.2; the TF OD API's `ssd_mobilenet_v2` feature extractor
with `use_depthwise` and its convolutional box predictor) on the project's MnasNet.

Feature maps: the expansion output of the backbone's first layer that goes from stride 16 to 32
(before its depthwise conv; MobileNetV2's `layer_15/expansion_output`), the head's 1x1 features at
stride 32 (`layer_19`), and four extra layers down to 1x1, each a 1x1 conv to half its depth, then
a 3x3 stride-2 depthwise conv and a 1x1 conv to its depth (512, 256, 256, 128), every conv with BN
and ReLU6. Each map's predictors are depthwise-separable: a 3x3 depthwise conv (BN, ReLU6), then a
1x1 conv with bias to 4 box codes, or to C + 1 class logits (background first, biases at -4.6), per
anchor. Its BN, conv and depthwise forms are the backbone's, so it trains, exports and folds BN as
the classifier does. Kernels start as the backbone's initialisers (official MnasNet ones), not the
TF OD API's truncated normal.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax.detection import anchors as anchors_lib


def stride32_layer(specs: Sequence[blocks_lib.Layer]) -> int:
  """The index of the first layer that goes from stride 16 to 32 (the stem has stride 2)."""
  stride = 2
  for i, spec in enumerate(specs):
    if stride == 16 and spec.stride == 2:
      return i
    stride *= spec.stride
  raise errors.UserError(
    'SSDLite takes the expansion output of the layer that goes from stride 16 to 32: '
    f'the architecture has none (its layers reach stride {stride})'
  )


def depth(value: int, multiplier: float, min_depth: int) -> int:
  """TF OD API's depth_fn: the extra layers' width scaled by the depth multiplier, at least
  min_depth."""
  return max(int(value * multiplier), min_depth)


class ExtraLayer(nn.Module):
  """1x1 conv to depth / 2, 3x3 stride-2 depthwise conv, 1x1 conv to depth, each with BN, ReLU6."""

  depth: int
  backbone: models.MnasNet

  @nn.compact
  def __call__(self, x, train: bool):
    b = self.backbone
    bn = lambda x, name: b.norm()(name=name)(x, use_running_average=not train)
    conv = functools.partial(models.Conv, kernel_size=1, form=b.conv, dtype=b.dtype)
    x = jax.nn.relu6(bn(conv(self.depth // 2, name='reduce')(x), 'reduce_bn'))
    x = models.DepthwiseConv(3, 2, b.depthwise, b.dtype, name='depthwise')(x)
    x = jax.nn.relu6(bn(x, 'depthwise_bn'))
    return jax.nn.relu6(bn(conv(self.depth, name='project')(x), 'project_bn'))


class BoxPredictor(nn.Module):
  """Box codes [B, H*W*A, 4] and class logits [B, H*W*A, C + 1] of one feature map, each from a
  3x3 depthwise conv (BN, ReLU6) and a 1x1 conv with bias."""

  boxes_per_location: int
  num_logits: int  # classes + background
  class_prior_bias: float
  backbone: models.MnasNet

  @nn.compact
  def __call__(self, x, train: bool):
    b = self.backbone

    def predict(name, width, bias_init):
      y = models.DepthwiseConv(3, 1, b.depthwise, b.dtype, name=f'{name}_depthwise')(x)
      y = jax.nn.relu6(b.norm()(name=f'{name}_depthwise_bn')(y, use_running_average=not train))
      y = models.Conv(
        self.boxes_per_location * width,
        1,
        b.conv,
        use_bias=True,
        dtype=b.dtype,
        bias_init=bias_init,
        name=name,
      )(y)
      return y.reshape(y.shape[0], -1, width).astype(jnp.float32)

    codes = predict('box', 4, nn.initializers.zeros)
    logits = predict('class', self.num_logits, nn.initializers.constant(self.class_prior_bias))
    return codes, logits


class SSDLite(nn.Module):
  """(box codes [B, N, 4], class logits [B, N, C + 1]) over the N anchors of `anchors(size)`.
  `backbone` is a models.MnasNet with feature_maps=True; its variables are under 'backbone'."""

  backbone: models.MnasNet
  num_classes: int  # without the background
  extra_depths: tuple[int, ...] = (512, 256, 256, 128)
  boxes_per_location: tuple[int, ...] = (3, 6, 6, 6, 6, 6)
  class_prior_bias: float = -4.6
  min_depth: int = 16

  @nn.compact
  def __call__(self, images, train: bool = False):
    maps = self.backbone(images, train)
    index = stride32_layer(self.backbone.layer_specs(images.shape[1]))
    features = [maps[f'layer_{index}/expansion'], maps['head']]
    for i, d in enumerate(self.extra_depths):
      d = depth(d, self.backbone.depth_multiplier, self.min_depth)
      features.append(ExtraLayer(d, self.backbone, name=f'extra_{i}')(features[-1], train))
    if len(features) != len(self.boxes_per_location):
      raise ValueError(
        f'{len(features)} feature maps, {len(self.boxes_per_location)} anchor counts'
      )
    outputs = [
      BoxPredictor(a, self.num_classes + 1, self.class_prior_bias, self.backbone, name=f'box_{i}')(
        f, train
      )
      for i, (f, a) in enumerate(zip(features, self.boxes_per_location))
    ]
    return tuple(jnp.concatenate(o, axis=1) for o in zip(*outputs))


def feature_sizes(resolution: int, num_extra: int) -> list[int]:
  """The feature maps' sizes: stride 16, stride 32, then each extra layer's stride 2 ('SAME')."""
  sizes = [blocks_lib.same_output_size(resolution, 16), blocks_lib.same_output_size(resolution, 32)]
  for _ in range(num_extra):
    sizes.append(blocks_lib.same_output_size(sizes[-1], 2))
  return sizes


def box_specs(config):
  """The (scale, aspect ratio) boxes of each feature map: the two backbone maps and the extras."""
  return anchors_lib.box_specs(
    len(config.ssd.extra_depths) + 2,
    config.anchors.min_scale,
    config.anchors.max_scale,
    config.anchors.aspect_ratios,
    config.anchors.interpolated_scale_aspect_ratio,
    config.anchors.reduce_boxes_in_lowest_layer,
  )


def anchors(config, resolution: int):
  """[N, 4] anchors of `config` (configs/detection.py's `anchors` and `ssd`) at `resolution`."""
  specs = box_specs(config)
  return anchors_lib.ssd_anchors(feature_sizes(resolution, len(config.ssd.extra_depths)), specs)


def boxes_per_location(config) -> tuple[int, ...]:
  specs = box_specs(config)
  return tuple(len(s) for s in specs)


def summary(
  arch,
  resolution: int = 320,
  num_classes: int = 90,
  depth_multiplier: float = 1.0,
  extra_depths: Sequence[int] = (512, 256, 256, 128),
  boxes: Sequence[int] = (3, 6, 6, 6, 6, 6),
  min_depth: int = 16,
) -> dict:
  """Parameters (BN's scale and offset included, as models.summary) and multiply-adds of the
  backbone without its classifier plus SSDLite, counted analytically."""
  backbone = models.summary(arch, depth_multiplier, resolution, num_classes=1)
  params = backbone['params'] - models.HEAD_FILTERS - 1
  macs = backbone['macs'] - models.HEAD_FILTERS
  specs = models.create(arch, depth_multiplier=depth_multiplier).layer_specs(resolution)
  widths = [specs[stride32_layer(specs)].hidden_filters, models.HEAD_FILTERS]
  sizes = feature_sizes(resolution, len(extra_depths))
  for i, d in enumerate(extra_depths):
    d = depth(d, depth_multiplier, min_depth)
    half, c, s_in, s_out = d // 2, widths[-1], sizes[i + 1], sizes[i + 2]
    params += c * half + 2 * half + 9 * half + 2 * half + half * d + 2 * d
    macs += s_in**2 * c * half + s_out**2 * (9 * half + half * d)
    widths.append(d)
  for c, s, a in zip(widths, sizes, boxes):
    for outputs in (4 * a, (num_classes + 1) * a):
      params += 9 * c + 2 * c + c * outputs + outputs
      macs += s**2 * (9 * c + c * outputs)
  return {
    'params': int(params),
    'macs': int(macs),
    'anchors': int(sum(s * s * a for s, a in zip(sizes, boxes))),
  }
