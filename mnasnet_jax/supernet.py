"""The weight-sharing supernet over the factorised space (TuNAS, Bender et al. 2020; as in
ProxylessNAS and Once-for-All): one set of weights holds every child, and a child is data.

    net = supernet.create(config.proxy, space, num_classes)     # one program for the whole space
    logits = net.apply(variables, images, tokens)                # any child: tokens int32 [P]
    model, child_variables = supernet.extract(net, space, variables, tokens)  # the standalone child

The tokens enter the compiled program as an array, so a new architecture never recompiles. Each
layer of a block holds its ops' weights at their widest: a tensor is carried at the widest width
that can reach it, the channels beyond the child's width zero, and each op's output masked to the
child's width (filter multiplier, expansion, SE width). The smaller kernel is the centre of the
largest one (its outer ring masked), the conv op's regular conv has weights of its own, the
expansions share one expand/depthwise/project stack (sepconv is that stack without the expand),
SE and the skip op are switched, and the layers beyond a block's layer count pass their input
through. Every switch is a conditional (`switch`), so a step runs the child's ops alone, not
every op at its widest (the local supernet's train step: 0.105 s, not 0.38 s, on 2 Zen 4 cores).
With a child's choices fixed, the supernet is that child: `extract` slices its weights out, and
models.MnasNet computes the same function with them, and the same gradients
(tests/test_supernet.py).

The stem, head, BatchNorm and every op's device form are models.py's, chosen by the same config
keys (`train.create_model`), so the supernet trains with train.py's steps, mesh and recipe.
BatchNorm statistics live at the widest width; a child's channels are the first ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import search_space

_SKIP_CODES = {skip: i for i, skip in enumerate(blocks_lib.SKIP_OPS)}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """What one base block can become (a fixed block: its one choice each), and its static widths."""

  index: int
  first_token: int | None  # position of its conv_op token; None for a fixed block
  repeats: int
  stride: int
  conv_ops: tuple  # (blocks op, expansion) per option
  kernels: tuple
  se_ratios: tuple
  skips: tuple
  out_widths: tuple  # rounded output width per filter-multiplier option
  deltas: tuple
  in_max: int  # the widest tensor that can reach the block

  @property
  def out_max(self) -> int:
    return max(self.out_widths)

  @property
  def max_layers(self) -> int:
    return self.repeats + max(self.deltas)

  @property
  def removable(self) -> bool:
    return self.repeats + min(self.deltas) == 0

  @property
  def carried(self) -> int:
    """The width of the tensor leaving the block (the next block's `in_max`)."""
    return max(self.in_max, self.out_max) if self.removable else self.out_max


def plan(space: search_space.SearchSpace) -> tuple[BlockPlan, ...]:
  reaching = space._input_widths()  # pylint: disable=protected-access  (the space's own widths)
  result = []
  for b, base in enumerate(space.base):
    in_max = max(reaching[b])
    if b in space.searched:
      o = space.options
      result.append(
        BlockPlan(
          b,
          space.searched.index(b) * len(search_space.DECISIONS),
          base.repeats,
          base.stride,
          tuple(space.conv_ops),
          tuple(int(k) for k in o['kernel']),
          tuple(float(r) for r in o['se_ratio']),
          tuple(o['skip']),
          tuple(blocks_lib.round_filters(base.out_filters, float(m)) for m in o['filters']),
          tuple(int(d) for d in o['layers']),
          in_max,
        )
      )
    else:
      result.append(
        BlockPlan(
          b,
          None,
          base.repeats,
          base.stride,
          ((base.op, base.expand),),
          (base.kernel,),
          (base.se_ratio,),
          (base.skip,),
          (base.out_filters,),
          (0,),
          in_max,
        )
      )
  return tuple(result)


def choices(p: BlockPlan, tokens) -> dict:
  """The block's decisions as (traced) values, looked up from its tokens."""
  pick = lambda j, values, dtype: jnp.asarray(values, dtype)[
    0 if p.first_token is None else tokens[p.first_token + j]
  ]
  return {
    'is_conv': pick(0, [op == 'conv' for op, _ in p.conv_ops], jnp.bool_),
    'expand': pick(0, [e for _, e in p.conv_ops], jnp.int32),
    'kernel': pick(1, p.kernels, jnp.int32),
    'se_ratio': pick(2, p.se_ratios, jnp.float32),
    'skip': pick(3, [_SKIP_CODES[s] for s in p.skips], jnp.int32),
    'out': pick(4, p.out_widths, jnp.int32),
    'layers': p.repeats + pick(5, p.deltas, jnp.int32),
  }


def resize(x, width: int):
  """`x` with `width` channels: zeros appended, or trailing (zero) channels dropped."""
  have = x.shape[-1]
  if have < width:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - have)])
  return x[..., :width]


def channel_mask(x, width):
  return x * (jnp.arange(x.shape[-1]) < width).astype(x.dtype)


def kernel_mask(size: int, kernel, dtype):
  """(size, size) mask of the centre `kernel` x `kernel` window."""
  inside = jnp.abs(jnp.arange(size) - size // 2) <= kernel // 2
  return (inside[:, None] & inside[None, :]).astype(dtype)


def switch(pred, on_true, on_false, module: nn.Module, x, *operands):
  """The branch `pred` picks, run alone (lax.cond, lifted), so a child costs what it computes, not
  what the whole supernet holds; at init both run, so that each creates its weights. Either
  branch's output takes the dtype of `x`, the tensor it replaces (in bfloat16 a pooled shortcut
  is float32, the ops' outputs bfloat16)."""
  cast = lambda branch: lambda m, *a: branch(m, *a).astype(x.dtype)
  if module.is_initializing():
    return jnp.where(
      pred, cast(on_true)(module, x, *operands), cast(on_false)(module, x, *operands)
    )
  return nn.cond(pred, cast(on_true), cast(on_false), module, x, *operands)


def passed(module, x):  # pylint: disable=unused-argument  (a branch that changes nothing)
  return x


class SuperLayer(nn.Module):
  """Layer `first` or later of a block: every op of models.MnasLayer the block's options allow, the
  chosen one run (`switch`) and masked to its width. Input width `in_width` (traced) is carried in
  a tensor of static width."""

  plan: BlockPlan
  first: bool
  norm: Any
  depthwise: str
  conv: str
  dtype: Any = jnp.float32
  padding: str = 'same'

  @nn.compact
  def __call__(self, x, c, in_width, train: bool):
    p = self.plan
    stride = p.stride if self.first else 1
    out_w = c['out']
    k = max(p.kernels)
    bn = lambda y, name: self.norm(name=name)(y, use_running_average=not train)
    pointwise = functools.partial(
      models.Conv, kernel_size=1, form=self.conv, dtype=self.dtype, padding=self.padding
    )
    # SE width as blocks.layers has it, of the block string's `i` (the incoming width) or `o`.
    reduced = jnp.maximum(1, jnp.floor(in_width * c['se_ratio']).astype(jnp.int32))
    max_reduced = max(1, int(x.shape[-1] * max(p.se_ratios)))

    def squeeze_excite(module, y, name):
      if max(p.se_ratios) == 0:
        return y
      se = lambda m, y: models.SqueezeExcite(max_reduced, self.conv, self.dtype, name=name)(
        y, reduced
      )
      return switch(c['se_ratio'] > 0, se, passed, module, y)

    def regular_conv(module, x):
      y = models.Conv(
        p.out_max, k, self.conv, stride, dtype=self.dtype, padding=self.padding, name='conv'
      )(x, kernel_mask(k, c['kernel'], self.dtype))
      y = channel_mask(nn.relu(bn(y, 'conv_bn')), out_w)
      return squeeze_excite(module, y, 'conv_se')

    expansions = {e for op, e in p.conv_ops if op == 'mbconv'}
    hidden = x.shape[-1] * max(expansions, default=1)
    hidden_w = in_width * c['expand']

    def expand(module, x):
      e = pointwise(hidden, name='expand')(x)
      return channel_mask(nn.relu(bn(e, 'expand_bn')), hidden_w)

    def mbconv(module, x):
      if expansions == {1}:
        h = resize(x, hidden)
      elif 1 in expansions:  # sepconv: the stack without its expansion
        h = switch(c['expand'] == 1, lambda m, x: resize(x, hidden), expand, module, x)
      else:
        h = expand(module, x)
      h = models.DepthwiseConv(
        k, stride, self.depthwise, self.dtype, self.padding, name='depthwise'
      )(h, kernel_mask(k, c['kernel'], self.dtype))
      h = channel_mask(nn.relu(bn(h, 'depthwise_bn')), hidden_w)
      h = squeeze_excite(module, h, 'se')
      y = pointwise(p.out_max, name='project')(h)
      return channel_mask(bn(y, 'project_bn'), out_w)

    x = x.astype(self.dtype)
    ops = {op for op, _ in p.conv_ops}
    if ops == {'conv', 'mbconv'}:
      y = switch(c['is_conv'], regular_conv, mbconv, self, x)
    else:
      y = regular_conv(self, x) if ops == {'conv'} else mbconv(self, x)
    if set(p.skips) == {'none'}:
      return y
    # The skips of blocks.layers: identity where the stride is 1 and `i == o`, pool always.
    identity = (stride == 1) & (in_width == out_w)
    residual = jnp.where(
      c['skip'] == _SKIP_CODES['identity'], identity, c['skip'] == _SKIP_CODES['pool']
    )
    pooled = models.pool_to_stride(x, stride)
    shortcut = resize(pooled, p.out_max)
    if 'pool' in p.skips:

      def projected(module, unprojected):  # pylint: disable=unused-argument  (from `pooled`)
        z = bn(pointwise(p.out_max, name='shortcut')(pooled), 'shortcut_bn')
        return channel_mask(z, out_w)

      projects = (c['skip'] == _SKIP_CODES['pool']) & (in_width != out_w)
      shortcut = switch(projects, projected, passed, self, shortcut)
    return y + jnp.where(residual, shortcut, jnp.zeros_like(shortcut))


class Supernet(nn.Module):
  """Every child of the space in one network; `tokens` (int32 [P], the space's token positions)
  picks one. The fields are models.MnasNet's (its stem, head and BN are used as they are)."""

  plan: tuple[BlockPlan, ...]
  stem_filters: int
  num_classes: int = 1000
  head_filters: int = models.HEAD_FILTERS
  dropout_rate: float = 0.2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  padding: str = 'same'
  depthwise: str = 'native'
  conv: str = 'native'
  batch_norm: str = 'autodiff'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_group_size: int | None = None
  remat: bool = False  # recompute each layer's activations in the backward pass (memory.py)
  classifier_init_range: float | None = None

  @nn.nowrap
  def network(self, blocks=('r1_k3_s11_e1_i8_o8',)) -> models.MnasNet:
    """models.MnasNet with this supernet's forms (by default a stand-in whose parts are used)."""
    fields = {k: getattr(self, k) for k in _SHARED_FIELDS}
    return models.MnasNet(blocks=tuple(blocks), **fields, parent=None)

  @nn.compact
  def __call__(self, images, tokens, train: bool = False):
    net = self.network()
    # 4: `train`, counting the module itself.
    super_layer = nn.remat(SuperLayer, static_argnums=(4,)) if self.remat else SuperLayer
    stem = net.stem(self.stem_filters)
    nn.share_scope(self, stem)
    x = stem(images, train)
    width = jnp.asarray(self.stem_filters, jnp.int32)
    for p in self.plan:
      c = choices(p, jnp.asarray(tokens))
      x = resize(x, p.in_max)
      for j in range(p.max_layers):
        layer = functools.partial(
          super_layer,
          p,
          j == 0,
          net.norm(),
          self.depthwise,
          self.conv,
          self.dtype,
          self.padding,
          name=f'block_{p.index}_layer_{j}',
        )
        if j == 0 and not p.removable:
          x, width = layer()(x, c, width, train), c['out']
        elif j == 0:  # a removed block passes its input on (stride 1, see search_space.py)
          x = switch(
            c['layers'] > 0,
            lambda m, x, w: resize(layer()(x, c, w, train), p.carried),
            lambda m, x, w: resize(x, p.carried),
            self,
            x,
            width,
          )
          width = jnp.where(c['layers'] > 0, c['out'], width)
        else:  # a layer beyond the child's count passes its input on
          x = switch(
            j < c['layers'],
            lambda m, x: resize(layer()(resize(x, p.out_max), c, c['out'], train), x.shape[-1]),
            passed,
            self,
            x,
          )
    head = net.head()
    nn.share_scope(self, head)
    return head(x, train).astype(jnp.float32)


_SHARED_FIELDS = (
  'stem_filters',
  'num_classes',
  'head_filters',
  'dropout_rate',
  'bn_momentum',
  'bn_epsilon',
  'padding',
  'depthwise',
  'conv',
  'batch_norm',
  'dtype',
  'bn_axis_name',
  'bn_group_size',
  'classifier_init_range',
)


def from_model(model: models.MnasNet, space: search_space.SearchSpace) -> Supernet:
  """The supernet of `space` with `model`'s forms, BN and head (its blocks are not used)."""
  if model.depth_multiplier != 1.0:
    raise errors.UserError(
      f'depth multiplier {model.depth_multiplier}: the supernet takes the widths of '
      'config.search_space (set config.search_space.filter_multipliers instead)'
    )
  fields = {k: getattr(model, k) for k in _SHARED_FIELDS}
  fields['stem_filters'] = space.stem_filters
  return Supernet(plan=plan(space), **fields)


def create(config, space: search_space.SearchSpace, num_classes: int) -> Supernet:
  """The supernet with the forms, BN and dropout `config` (a proxy or train config) gives a model,
  through train.create_model."""
  from mnasnet_jax import train  # pylint: disable=g-import-not-at-top  (train imports much)

  return from_model(train.create_model(config, space.base, num_classes), space)


@dataclasses.dataclass(frozen=True)
class Child:
  """The supernet with one child's tokens bound: what train.py's steps take as their `model`."""

  supernet: Supernet
  tokens: Any

  def apply(self, variables, images, *args, **kwargs):
    return self.supernet.apply(variables, images, self.tokens, *args, **kwargs)

  def init(self, key, images, *args, **kwargs):
    return self.supernet.init(key, images, self.tokens, *args, **kwargs)

  def clone(self, **changes) -> Child:
    return Child(self.supernet.clone(**changes), self.tokens)


def standalone(net: Supernet, space: search_space.SearchSpace, tokens) -> models.MnasNet:
  """The child `tokens` selects as a models.MnasNet with the supernet's forms."""
  return net.network(space.decode([int(t) for t in tokens]))


def _crop(value, shape):
  """`value` cut to `shape`: the first entries of each axis, the centre of a kernel's two spatial
  axes (the smaller kernel inside the larger)."""
  index = []
  for axis, (have, want) in enumerate(zip(value.shape, shape)):
    start = (have - want) // 2 if value.ndim == 4 and axis < 2 else 0
    index.append(slice(start, start + want))
  return value[tuple(index)]


def extract(net: Supernet, space: search_space.SearchSpace, variables, tokens):
  """(standalone model, its variables sliced out of the supernet's): the child `tokens` selects,
  computing the supernet's function for those tokens. Also a warm start for retraining it."""
  tokens = [int(t) for t in tokens]
  model = standalone(net, space, tokens)
  names = {}  # standalone layer -> (supernet layer, whether its op is the regular conv)
  for p in net.plan:
    c = jax.tree.map(int, choices(p, jnp.asarray(tokens, jnp.int32)))
    for j in range(c['layers']):
      names[f'layer_{len(names)}'] = (f'block_{p.index}_layer_{j}', bool(c['is_conv']))
  shapes = flax.traverse_util.flatten_dict(models.variable_shapes(model, (1, 32, 32, 3)))
  flat = flax.traverse_util.flatten_dict(variables)
  result = {}
  for path, shape in shapes.items():
    source = list(path)
    if path[1] in names:
      source[1], is_conv = names[path[1]]
      if is_conv and path[2] == 'se':
        source[2] = 'conv_se'
    result[path] = _crop(flat[tuple(source)], shape.shape)
  return model, flax.traverse_util.unflatten_dict(result)
