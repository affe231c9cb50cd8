"""Block strings: the official MnasNet text form of a block, and the layers a block expands into.

A block string names one block of `r` identical layers, in the official TensorFlow format:

    r<repeats>_k<kernel>_s<stride><stride>_e<expand>_i<in>_o<out>[_se<ratio>][_noskip]

Two extensions say what the search space needs and the official format cannot:

* `_conv`: the layer is one regular (dense) k x k convolution, BN, ReLU (then SE), instead of an
  inverted bottleneck. It has no expansion, so it requires `e1`.
* `_poolskip`: the pooling skip of the paper's SkipOp. Every layer of the block adds a shortcut: the
  input average-pooled to the layer's stride (when the stride is 2), then projected by a 1x1 conv + BN
  when the widths differ. With neither `_noskip` nor `_poolskip` the skip is the identity residual,
  which the official rule applies only where the stride is 1 and `i == o`.

Every official string is valid and means what it means in the official code; `encode(decode(s)) == s`.
A depthwise separable conv is the inverted bottleneck with `e1` (depthwise k x k, then 1x1 project).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable
from typing import Sequence
from typing import Union

from mnasnet_jax import errors

CONV_OPS = ('mbconv', 'conv')
SKIP_OPS = ('identity', 'pool', 'none')


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One block of `repeats` identical layers; only the first strides and changes width."""

  repeats: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  se_ratio: float = 0.0
  skip: str = 'identity'
  op: str = 'mbconv'

  def __post_init__(self):
    _check(self.repeats >= 0, f'repeats must be >= 0, got {self.repeats}', self)
    for name in ('kernel', 'stride', 'expand', 'in_filters', 'out_filters'):
      _check(getattr(self, name) >= 1, f'{name} must be >= 1, got {getattr(self, name)}', self)
    _check(self.kernel % 2 == 1, f'kernel must be odd, got {self.kernel}', self)
    _check(0.0 <= self.se_ratio <= 1.0, f'se_ratio must be in [0, 1], got {self.se_ratio}', self)
    _check(self.skip in SKIP_OPS, f'skip must be one of {SKIP_OPS}, got {self.skip!r}', self)
    _check(self.op in CONV_OPS, f'op must be one of {CONV_OPS}, got {self.op!r}', self)
    _check(
      self.op != 'conv' or self.expand == 1,
      f'a regular conv layer has no expansion: expected e1, got e{self.expand}',
      self,
    )

  def replace(self, **changes) -> BlockArgs:
    return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str, args: BlockArgs):
  if not ok:
    raise errors.UserError(f'{message} in block {args!r}')


_REQUIRED = ('r', 'k', 's', 'e', 'i', 'o')
_FLAGS = {'noskip': ('skip', 'none'), 'poolskip': ('skip', 'pool'), 'conv': ('op', 'conv')}
_PART = re.compile(r'^([a-z]+)(\d[\d.]*)?$')


def decode(block_string: str) -> BlockArgs:
  """Parses one block string; raises UserError naming the bad part and the whole string."""
  if not isinstance(block_string, str) or not block_string:
    raise errors.UserError(
      f'expected a block string like "r3_k5_s22_e3_i24_o40_se0.25", got {block_string!r}'
    )

  def fail(part, why):
    raise errors.UserError(f'bad part {part!r} in block string {block_string!r}: {why}')

  values, fields = {}, {}
  for part in block_string.split('_'):
    match = _PART.match(part)
    if not match:
      fail(
        part,
        'expected a key followed by a number (r, k, s, e, i, o, se) or a flag '
        f'({", ".join(_FLAGS)})',
      )
    key, value = match.groups()
    if key in _FLAGS:
      if value is not None:
        fail(part, f'flag {key!r} takes no value')
      field, setting = _FLAGS[key]
      if field in fields:
        fail(part, f'{field} is already set to {fields[field]!r}')
      fields[field] = setting
      continue
    if key not in _REQUIRED + ('se',):
      fail(part, f'unknown key {key!r}')
    if value is None:
      fail(part, f'key {key!r} needs a value')
    if key in values:
      fail(part, f'key {key!r} given twice')
    values[key] = (part, value)

  missing = [k for k in _REQUIRED if k not in values]
  if missing:
    raise errors.UserError(f'block string {block_string!r} is missing {", ".join(missing)}')

  def integer(key):
    part, value = values[key]
    if not value.isdigit():
      fail(part, 'expected a whole number')
    return int(value)

  stride_part, stride_value = values['s']
  if len(stride_value) != 2 or not stride_value.isdigit() or stride_value[0] != stride_value[1]:
    fail(stride_part, 'expected two equal stride digits such as s11 or s22')
  se_ratio = 0.0
  if 'se' in values:
    se_part, se_value = values['se']
    try:
      se_ratio = float(se_value)
    except ValueError:
      fail(se_part, 'expected a ratio such as se0.25')
    if not 0.0 < se_ratio <= 1.0:
      fail(se_part, 'expected a ratio in (0, 1]')
  try:
    return BlockArgs(
      repeats=integer('r'),
      kernel=integer('k'),
      stride=int(stride_value[0]),
      expand=integer('e'),
      in_filters=integer('i'),
      out_filters=integer('o'),
      se_ratio=se_ratio,
      **fields,
    )
  except errors.UserError as e:
    raise errors.UserError(f'block string {block_string!r}: {e}') from None


def encode(args: BlockArgs) -> str:
  """The canonical block string of `args`; official fields first, extensions last."""
  parts = [
    f'r{args.repeats}',
    f'k{args.kernel}',
    f's{args.stride}{args.stride}',
    f'e{args.expand}',
    f'i{args.in_filters}',
    f'o{args.out_filters}',
  ]
  if args.se_ratio:
    parts.append(f'se{args.se_ratio:g}')
  if args.op == 'conv':
    parts.append('conv')
  if args.skip == 'none':
    parts.append('noskip')
  elif args.skip == 'pool':
    parts.append('poolskip')
  return '_'.join(parts)


BlockLike = Union[str, BlockArgs]


def as_block_args(blocks: Iterable[BlockLike]) -> list[BlockArgs]:
  return [decode(b) if isinstance(b, str) else b for b in blocks]


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
  """The official width rounding: nearest multiple of `divisor`, never more than 10% down."""
  if multiplier == 1.0:
    return filters
  scaled = filters * multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def scale(blocks: Iterable[BlockLike], multiplier: float) -> list[BlockArgs]:
  """Applies the depth multiplier to every block's input and output widths."""
  return [
    b.replace(
      in_filters=round_filters(b.in_filters, multiplier),
      out_filters=round_filters(b.out_filters, multiplier),
    )
    for b in as_block_args(blocks)
  ]


def same_output_size(size: int, stride: int) -> int:
  return -(-size // stride)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding (before, after) of one spatial axis; the odd pixel goes after."""
  total = max((same_output_size(size, stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


# How a k x k conv pads: 'same', TensorFlow's (the official code's; at stride 2 on an even size the
# extra row goes after), or 'symmetric', PyTorch's k // 2 on each side (what timm's and
# torchvision's MnasNets were trained with). For odd kernels both give the output size
# `same_output_size`; they differ only where 'same' is asymmetric.
PADDINGS = ('same', 'symmetric')


def conv_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """(before, after) padding of one spatial axis under `padding` (one of PADDINGS)."""
  if padding == 'symmetric':
    return kernel // 2, kernel // 2
  if padding != 'same':
    raise errors.UserError(f'padding {padding!r}: expected one of {PADDINGS}')
  return same_padding(size, kernel, stride)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer as it runs: the widths the tensors really have and its input resolution.

  This is the unit that parameter and multiply-add counts, the latency table and the model share.
  `residual` says whether an identity or pooling shortcut is added.
  """

  op: str
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  se_filters: int
  skip: str
  residual: bool
  resolution: int

  @property
  def hidden_filters(self) -> int:
    return self.in_filters * self.expand

  @property
  def out_resolution(self) -> int:
    return same_output_size(self.resolution, self.stride)

  @property
  def projects_shortcut(self) -> bool:
    return self.residual and self.skip == 'pool' and self.in_filters != self.out_filters


def layers(blocks: Sequence[BlockLike], in_filters: int, resolution: int) -> list[Layer]:
  """Expands blocks into their layers, following widths and resolution from the stem's output.

  A layer's input width is the width of the tensor reaching it (the depthwise and expand convs take
  theirs from the tensor, as in the official code), while the identity-skip rule reads the block
  string's `i`, as the official code does. SE width is `max(1, int(i * se_ratio))` of the block's
  input filters. A block with `r0` contributes no layers.
  """
  result = []
  width = in_filters
  for block in as_block_args(blocks):
    for repeat in range(block.repeats):
      first = repeat == 0
      stride = block.stride if first else 1
      block_in = block.in_filters if first else block.out_filters
      if block.skip == 'identity':
        residual = stride == 1 and block_in == block.out_filters
      else:
        residual = block.skip == 'pool'
      se_filters = max(1, int(block_in * block.se_ratio)) if block.se_ratio else 0
      result.append(
        Layer(
          op=block.op,
          kernel=block.kernel,
          stride=stride,
          expand=block.expand,
          in_filters=width,
          out_filters=block.out_filters,
          se_filters=se_filters,
          skip=block.skip,
          residual=residual,
          resolution=resolution,
        )
      )
      width = block.out_filters
      resolution = same_output_size(resolution, stride)
  return result
