"""MnasNet in Flax Linen, built from block strings, exact to the official TensorFlow code.

Stem (3x3/2 conv, BN, ReLU), the blocks' layers, head (1x1 conv to 1280, never scaled by the depth
multiplier, BN, ReLU), global average pool, dropout, dense. Convs have no bias; BN uses momentum 0.99
and epsilon 1e-3; convs pad as TensorFlow's 'SAME'; initialisers are the official ones. Parameters
are float32, compute is `dtype`. `padding='symmetric'` and `bn_epsilon=1e-5` give the function of
PyTorch's MnasNets (timm's, torchvision's), whose weights pretrained.py imports.

This is the one description of the network: training runs it with the forms `platform` picks for
the device (mnasnet_jax/cpu/ holds the CPU ones), the TFLite export and the latency table's units
run it (or its Stem, MnasLayer, Head alone) with the native forms and BN folded (latency/export.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import Callable
from typing import Sequence
from typing import Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import bn_groups
from mnasnet_jax import cpu
from mnasnet_jax import errors
from mnasnet_jax import platform

HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class Architecture:
  blocks: tuple[str, ...]
  stem_filters: int = 32
  dropout_rate: float = 0.2


ARCHITECTURES = {
  'mnasnet_a1': Architecture(
    (
      'r1_k3_s11_e1_i32_o16_noskip',
      'r2_k3_s22_e6_i16_o24',
      'r3_k5_s22_e3_i24_o40_se0.25',
      'r4_k3_s22_e6_i40_o80',
      'r2_k3_s11_e6_i80_o112_se0.25',
      'r3_k5_s22_e6_i112_o160_se0.25',
      'r1_k3_s11_e6_i160_o320',
    )
  ),
  'mnasnet_b1': Architecture(
    (
      'r1_k3_s11_e1_i32_o16_noskip',
      'r3_k3_s22_e3_i16_o24',
      'r3_k5_s22_e3_i24_o40',
      'r3_k5_s22_e6_i40_o80',
      'r2_k3_s11_e6_i80_o96',
      'r4_k5_s22_e6_i96_o192',
      'r1_k3_s11_e6_i192_o320_noskip',
    )
  ),
  'mnasnet_small': Architecture(
    (
      'r1_k3_s11_e1_i16_o8',
      'r1_k3_s22_e3_i8_o16',
      'r2_k3_s22_e6_i16_o16',
      'r4_k5_s22_e6_i16_o32_se0.25',
      'r3_k3_s11_e6_i32_o32_se0.25',
      'r3_k5_s22_e6_i32_o88_se0.25',
      'r1_k3_s11_e6_i88_o144',
    ),
    stem_filters=8,
    dropout_rate=0.0,
  ),
  'mnasnet_d1': Architecture(
    (
      'r1_k3_s11_e9_i32_o24',
      'r3_k3_s22_e9_i24_o36',
      'r5_k3_s22_e9_i36_o48',
      'r4_k5_s22_e9_i48_o96',
      'r5_k7_s11_e3_i96_o96',
      'r3_k3_s22_e9_i96_o80',
      'r1_k7_s11_e6_i80_o320_noskip',
    )
  ),
  'mnasnet_d1_320': Architecture(
    (
      'r3_k5_s11_e6_i32_o24',
      'r4_k7_s22_e9_i24_o36',
      'r5_k5_s22_e9_i36_o48',
      'r5_k7_s22_e6_i48_o96',
      'r5_k3_s11_e9_i96_o144',
      'r5_k5_s22_e6_i144_o160',
      'r1_k7_s11_e9_i160_o320',
    )
  ),
  # MobileNetV2 1.0 as a point of the search space: its (t, c, n, s) table in MnasNet's layers.
  'mobilenet_v2': Architecture(
    (
      'r1_k3_s11_e1_i32_o16',
      'r2_k3_s22_e6_i16_o24',
      'r3_k3_s22_e6_i24_o32',
      'r4_k3_s22_e6_i32_o64',
      'r3_k3_s11_e6_i64_o96',
      'r3_k3_s22_e6_i96_o160',
      'r1_k3_s11_e6_i160_o320',
    )
  ),
}

ArchLike = Union[str, Sequence[str], Sequence[blocks_lib.BlockArgs], Architecture]


def architecture(arch: ArchLike) -> Architecture:
  """A named architecture, or block strings with the default stem (32) and dropout (0.2)."""
  if isinstance(arch, Architecture):
    return arch
  if isinstance(arch, str):
    if arch in ARCHITECTURES:
      return ARCHITECTURES[arch]
    if '_' in arch and arch.startswith('r'):
      arch = arch.split(',')
    else:
      raise errors.UserError(
        f'unknown architecture {arch!r}: expected one of '
        f'{sorted(ARCHITECTURES)} or a comma-separated list of block strings'
      )
  parsed = blocks_lib.as_block_args(arch)
  if not parsed:
    raise errors.UserError('an architecture needs at least one block string')
  return Architecture(tuple(blocks_lib.encode(b) for b in parsed))


# --- initialisers (official code) ---------------------------------------------------------------


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """normal(0, sqrt(2 / fan_out)) with fan_out = kh * kw * out_channels (1 per depthwise group)."""
  kh, kw, _, out_channels = shape
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out_channels))


def depthwise_kernel_init(key, shape, dtype=jnp.float32):
  kh, kw = shape[:2]
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw))


def dense_kernel_init(init_range: float | None = None):
  """Uniform in +-`init_range`; None: the official code's 1/sqrt(classes)."""

  def init(key, shape, dtype=jnp.float32):
    limit = 1.0 / math.sqrt(shape[1]) if init_range is None else init_range
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


# --- the ops' native forms, and the CPU forms by name (platform.py chooses) ---------------------


def _lax_padding(x, kernel_size: int, stride: int, padding: str):
  """'SAME' as itself (TFLite's convs take it as an attribute), 'symmetric' as explicit pads."""
  if padding == 'same':
    return 'SAME'
  return [blocks_lib.conv_padding(s, kernel_size, stride, padding) for s in x.shape[1:3]]


def conv_native(x, kernel, stride: int, padding: str, groups: int = 1):
  """XLA's conv op: what TPU/GPU compilers and TFLite know best."""
  return lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    _lax_padding(x, kernel.shape[0], stride, padding),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def depthwise_native(x, kernel, stride: int, padding: str):
  """The grouped convolution: XLA's native depthwise op, fast on TPU/GPU, what TFLite exports."""
  return conv_native(x, kernel, stride, padding, groups=x.shape[-1])


class FoldedBatchNorm(nn.Module):
  """A BatchNorm folded into the conv before it (latency/export.fold_batchnorm): in inference BN is
  an affine map per channel, whose scale the conv's kernel has taken; its offset is left here."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, use_running_average: bool = True):
    if not use_running_average:
      raise ValueError('a folded BatchNorm has no batch statistics: it runs in inference only')
    return x + self.param('bias', nn.initializers.zeros, (x.shape[-1],), jnp.float32).astype(
      self.dtype
    )


DEPTHWISE = {'native': depthwise_native, **cpu.DEPTHWISE}
CONV = {'native': conv_native, **cpu.CONV}
BATCH_NORM = {'autodiff': bn_groups.BatchNorm, **cpu.BATCH_NORM}


def _masked(kernel, kernel_mask):
  return (
    kernel if kernel_mask is None else kernel * kernel_mask.astype(kernel.dtype)[:, :, None, None]
  )


class DepthwiseConv(nn.Module):
  """k x k depthwise conv, no bias; every form shares one kernel of shape (k, k, 1, C)."""

  kernel_size: int
  stride: int
  form: str
  dtype: Any = jnp.float32
  padding: str = 'same'

  @nn.compact
  def __call__(self, x, kernel_mask=None):
    """`kernel_mask` (k, k), of 0 and 1: a smaller kernel inside this one (supernet.py)."""
    kernel = self.param(
      'kernel',
      depthwise_kernel_init,
      (self.kernel_size, self.kernel_size, 1, x.shape[-1]),
      jnp.float32,
    )
    x, kernel = x.astype(self.dtype), _masked(kernel.astype(self.dtype), kernel_mask)
    return DEPTHWISE[self.form](x, kernel, self.stride, self.padding)


class Conv(nn.Module):
  """k x k conv, padded as `padding` (blocks.PADDINGS); every form shares nn.Conv's variables: a
  (k, k, C, O) kernel, a bias."""

  features: int
  kernel_size: int
  form: str
  stride: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  padding: str = 'same'
  bias_init: Callable = nn.initializers.zeros  # a detector's class logits start at a prior

  @nn.compact
  def __call__(self, x, kernel_mask=None):
    """`kernel_mask` as DepthwiseConv's."""
    kernel = self.param(
      'kernel',
      conv_kernel_init,
      (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
      jnp.float32,
    )
    kernel = _masked(kernel.astype(self.dtype), kernel_mask)
    y = CONV[self.form](x.astype(self.dtype), kernel, self.stride, self.padding)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


# --- the network's parts: stem, layers, head ----------------------------------------------------
#
# Each part takes `norm`, a constructor of the BN that follows each conv (MnasNet.norm), and the
# padding of its k x k convs, and is a unit of the latency table on its own (latency/export.py).


def pool_to_stride(x, stride: int):
  """The pooling skip's downsampling: the mean of each stride x stride window (padding not counted).
  This project's own op, under either conv padding: its window is its stride, so 'SAME' pads only
  an odd size's last row (PyTorch's MnasNets have no pooling skip)."""
  if stride == 1:
    return x
  return nn.avg_pool(x, (stride, stride), (stride, stride), padding='SAME', count_include_pad=False)


class SqueezeExcite(nn.Module):
  """Spatial mean, 1x1 reduce (with bias) + ReLU, 1x1 expand (with bias) + sigmoid, rescale."""

  reduced: int
  conv: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, reduced_width=None):
    """`reduced_width` (may be traced): the reduced channels beyond it masked (supernet.py)."""
    conv = functools.partial(Conv, kernel_size=1, form=self.conv, use_bias=True, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(conv(self.reduced, name='reduce')(s))
    if reduced_width is not None:
      s = s * (jnp.arange(self.reduced) < reduced_width).astype(s.dtype)
    s = nn.sigmoid(conv(x.shape[-1], name='expand')(s))
    return x * s


class Stem(nn.Module):
  """3x3/2 conv, BN, ReLU; its variables are `stem` and `stem_bn`."""

  filters: int
  norm: Callable[..., nn.Module]
  conv: str
  dtype: Any = jnp.float32
  padding: str = 'same'

  @nn.compact
  def __call__(self, images, train: bool):
    x = Conv(
      self.filters, 3, self.conv, stride=2, dtype=self.dtype, padding=self.padding, name='stem'
    )(images.astype(self.dtype))
    return nn.relu(self.norm(name='stem_bn')(x, use_running_average=not train))


class MnasLayer(nn.Module):
  """One layer of a block: an inverted bottleneck (or a regular conv), SE, and its skip.
  `expansion_output` also returns the depthwise conv's input (its input itself without one): the
  feature map SSDLite takes from the layer that enters stride 32."""

  spec: blocks_lib.Layer
  norm: Callable[..., nn.Module]
  depthwise: str
  conv: str
  dtype: Any = jnp.float32
  padding: str = 'same'
  expansion_output: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    spec = self.spec
    conv = functools.partial(Conv, form=self.conv, dtype=self.dtype, padding=self.padding)
    pointwise = functools.partial(conv, kernel_size=1)
    bn = lambda x, name: self.norm(name=name)(x, use_running_average=not train)
    se = functools.partial(SqueezeExcite, spec.se_filters, self.conv, self.dtype, name='se')
    inputs = expanded = x
    if spec.op == 'conv':
      x = conv(spec.out_filters, spec.kernel, stride=spec.stride, name='conv')(x)
      x = nn.relu(bn(x, 'conv_bn'))
      if spec.se_filters:
        x = se()(x)
    else:
      if spec.expand != 1:
        x = pointwise(spec.hidden_filters, name='expand')(x)
        x = nn.relu(bn(x, 'expand_bn'))
      expanded = x
      x = DepthwiseConv(
        spec.kernel, spec.stride, self.depthwise, self.dtype, self.padding, name='depthwise'
      )(x)
      x = nn.relu(bn(x, 'depthwise_bn'))
      if spec.se_filters:
        x = se()(x)
      x = pointwise(spec.out_filters, name='project')(x)
      x = bn(x, 'project_bn')
    if spec.residual:
      shortcut = pool_to_stride(inputs, spec.stride)
      if spec.projects_shortcut:
        shortcut = pointwise(spec.out_filters, name='shortcut')(shortcut)
        shortcut = bn(shortcut, 'shortcut_bn')
      x = x + shortcut
    return (x, expanded) if self.expansion_output else x


class Head(nn.Module):
  """1x1 conv to `filters` (never scaled by the depth multiplier), BN, ReLU, global average pool,
  dropout, dense; its variables are `head`, `head_bn` and `classifier`. `features_only` stops
  before the pool (a detector's backbone: no classifier)."""

  num_classes: int
  filters: int
  dropout_rate: float
  norm: Callable[..., nn.Module]
  conv: str
  dtype: Any = jnp.float32
  features_only: bool = False
  classifier_init_range: float | None = None  # dense_kernel_init's

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.filters, 1, self.conv, dtype=self.dtype, name='head')(x)
    x = nn.relu(self.norm(name='head_bn')(x, use_running_average=not train))
    if self.features_only:
      return x
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(
      self.num_classes,
      kernel_init=dense_kernel_init(self.classifier_init_range),
      dtype=self.dtype,
      name='classifier',
    )(x)


class MnasNet(nn.Module):
  """MnasNet from block strings; `bn_axis_name` makes BN average statistics across devices.

  `depthwise`, `conv` and `batch_norm` name the forms of those ops (DEPTHWISE, CONV, BATCH_NORM);
  'folded' is the inference graph's BN, on variables from latency/export.fold_batchnorm. `padding`
  and `bn_epsilon` are part of the function the weights compute (blocks.PADDINGS).
  """

  blocks: tuple[str, ...]
  num_classes: int = 1000
  stem_filters: int = 32
  head_filters: int = HEAD_FILTERS
  depth_multiplier: float = 1.0
  dropout_rate: float = 0.2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  padding: str = 'same'  # 'symmetric': PyTorch's, for timm's and torchvision's weights
  depthwise: str = 'native'
  conv: str = 'native'
  batch_norm: str = 'autodiff'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_group_size: int | None = None  # images per BN statistic (bn_groups.py); None: the whole batch
  remat: bool = False  # recompute each layer's activations in the backward pass (memory.py)
  # Return {'layer_<i>/expansion': each layer's depthwise input, 'head': the head's 1x1 features}
  # instead of logits, with no classifier: a detector's backbone (mnasnet_jax/detection/).
  feature_maps: bool = False
  # The classifier's initial weights, uniform in +-this; None: the official 1/sqrt(num_classes),
  # whose initial logits grow as the classes fall (near 5 standard deviations for 10 classes).
  classifier_init_range: float | None = None

  def layer_specs(self, resolution: int) -> list[blocks_lib.Layer]:
    stem = blocks_lib.round_filters(self.stem_filters, self.depth_multiplier)
    scaled = blocks_lib.scale(self.blocks, self.depth_multiplier)
    return blocks_lib.layers(scaled, stem, blocks_lib.same_output_size(resolution, 2))

  @nn.nowrap
  def norm(self) -> Callable[..., nn.Module]:
    """The constructor of the BN after each conv, given its name."""
    if self.batch_norm == 'folded':
      return functools.partial(FoldedBatchNorm, dtype=self.dtype)
    return functools.partial(
      BATCH_NORM[self.batch_norm],
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      axis_name=self.bn_axis_name,
      group_size=self.bn_group_size,
    )

  # The parts with this network's forms; each is a module of its own (a latency table's unit).

  @nn.nowrap
  def stem(self, filters: int) -> Stem:
    return Stem(filters, self.norm(), self.conv, self.dtype, self.padding)

  @nn.nowrap
  def layer(self, spec: blocks_lib.Layer, name: str | None = None) -> MnasLayer:
    layer = nn.remat(MnasLayer, static_argnums=(2,)) if self.remat else MnasLayer  # 2: `train`
    return layer(
      spec,
      self.norm(),
      self.depthwise,
      self.conv,
      self.dtype,
      self.padding,
      expansion_output=self.feature_maps,
      name=name,
    )

  @nn.nowrap
  def head(self) -> Head:
    return Head(
      self.num_classes,
      self.head_filters,
      self.dropout_rate,
      self.norm(),
      self.conv,
      self.dtype,
      features_only=self.feature_maps,
      classifier_init_range=self.classifier_init_range,
    )

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise ValueError(f'expected square NHWC images, got shape {images.shape}')
    # The stem and head keep their variables in the network's own scope, as checkpoints have them.
    stem = self.stem(blocks_lib.round_filters(self.stem_filters, self.depth_multiplier))
    nn.share_scope(self, stem)
    x = stem(images, train)
    maps = {}
    for i, spec in enumerate(self.layer_specs(images.shape[1])):
      x = self.layer(spec, name=f'layer_{i}')(x, train)
      if self.feature_maps:
        x, maps[f'layer_{i}/expansion'] = x
    head = self.head()
    nn.share_scope(self, head)
    if self.feature_maps:
      return {**maps, 'head': head(x, train)}
    return head(x, train).astype(jnp.float32)


def create(
  arch: ArchLike,
  *,
  num_classes: int = 1000,
  depth_multiplier: float = 1.0,
  dropout_rate: float | None = None,
  depthwise: str = 'auto',
  conv: str = 'auto',
  batch_norm: str = 'auto',
  dtype: str = 'auto',
  padding: str = 'same',
  **kwargs,
) -> MnasNet:
  """The model of a named architecture or block strings; device choices come from `platform`."""
  spec = architecture(arch)
  if padding not in blocks_lib.PADDINGS:
    raise errors.UserError(f'padding {padding!r}: expected one of {blocks_lib.PADDINGS}')
  dtype = platform.compute_dtype(dtype)
  return MnasNet(
    blocks=spec.blocks,
    num_classes=num_classes,
    stem_filters=spec.stem_filters,
    depth_multiplier=depth_multiplier,
    dropout_rate=spec.dropout_rate if dropout_rate is None else dropout_rate,
    depthwise=platform.depthwise_form(depthwise, dtype=dtype),
    conv=platform.conv_form(conv),
    batch_norm=platform.batch_norm_form(batch_norm),
    dtype=dtype,
    padding=padding,
    **kwargs,
  )


# --- analytic size ------------------------------------------------------------------------------


def layer_cost(layer: blocks_lib.Layer) -> tuple[int, int]:
  """(params, multiply-adds) of one layer; BN counts its scale and offset."""
  out_pixels = layer.out_resolution**2
  params = macs = 0

  def conv(cin, cout, k, pixels, groups=1):
    nonlocal params, macs
    params += k * k * cin * cout // groups + 2 * cout  # weights + BN
    macs += pixels * k * k * cin * cout // groups

  def se(width):
    nonlocal params, macs
    params += 2 * width * layer.se_filters + layer.se_filters + width
    macs += 2 * width * layer.se_filters

  if layer.op == 'conv':
    conv(layer.in_filters, layer.out_filters, layer.kernel, out_pixels)
    if layer.se_filters:
      se(layer.out_filters)
  else:
    hidden = layer.hidden_filters
    if layer.expand != 1:
      conv(layer.in_filters, hidden, 1, layer.resolution**2)
    conv(hidden, hidden, layer.kernel, out_pixels, groups=hidden)
    if layer.se_filters:
      se(hidden)
    conv(hidden, layer.out_filters, 1, out_pixels)
  if layer.projects_shortcut:
    conv(layer.in_filters, layer.out_filters, 1, out_pixels)
  return params, macs


def summary(
  arch: ArchLike, depth_multiplier: float = 1.0, resolution: int = 224, num_classes: int = 1000
) -> dict:
  """Trainable parameters and multiply-adds (convolutions and classifier), counted analytically."""
  model = create(
    arch,
    num_classes=num_classes,
    depth_multiplier=depth_multiplier,
    depthwise='native',
    dtype='float32',
  )
  stem = blocks_lib.round_filters(model.stem_filters, depth_multiplier)
  stem_res = blocks_lib.same_output_size(resolution, 2)
  specs = model.layer_specs(resolution)
  params = 27 * stem + 2 * stem
  macs = stem_res**2 * 27 * stem
  for layer in specs:
    p, m = layer_cost(layer)
    params += p
    macs += m
  last_width = specs[-1].out_filters if specs else stem
  last_res = specs[-1].out_resolution if specs else stem_res
  params += last_width * model.head_filters + 2 * model.head_filters
  macs += last_res**2 * last_width * model.head_filters
  params += model.head_filters * num_classes + num_classes
  macs += model.head_filters * num_classes
  return {
    'params': int(params),
    'macs': int(macs),
    'layers': len(specs),
    'blocks': list(model.blocks),
    'stem_filters': stem,
    'resolution': resolution,
    'depth_multiplier': depth_multiplier,
    'num_classes': num_classes,
  }


def variable_shapes(module: nn.Module, input_shape):
  """`module`'s variables as shapes and dtypes, on a float32 input of `input_shape`."""
  return jax.eval_shape(
    functools.partial(module.init, train=False),
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
  )


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def print_summary_table(config, workdir=None):
  """The `summary` job: parameters and multiply-adds of the configured architectures."""
  del workdir
  print(f'{"architecture":<16}{"params":>12}{"mult-adds":>14}')
  for arch in config.architectures:
    s = summary(arch, config.depth_multiplier, config.resolution, config.num_classes)
    print(f'{arch:<16}{s["params"]:>12,}{s["macs"] / 1e6:>13.1f}M')
