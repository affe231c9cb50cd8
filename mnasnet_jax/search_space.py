"""The factorised hierarchical search space (paper section 4.2): one searched layer per block.

The network is MobileNetV2's sequence of blocks (`config.base_blocks`, stem `config.stem_filters`).
Each searched block (`config.searched_blocks`) picks, by one token per decision, in this order:

    conv_op   'conv' (a regular k x k conv, e1), 'sepconv' (depthwise separable: the inverted
              bottleneck with e1), 'mbconv<e>' (inverted bottleneck with expansion e)
    kernel    k x k of the conv op (odd)
    se_ratio  squeeze-and-excitation ratio, 0 for none
    skip      'pool', 'identity' or 'none' (blocks.py's `_poolskip`, default, `_noskip`)
    filters   output width = multiplier x the base block's width, rounded as the depth multiplier is,
              by `blocks.round_filters` (nearest multiple of 8, never more than 10% down)
    layers    the base block's layer count plus a delta

and every one of its layers is that layer. Fixed blocks keep their base block string. The options of
each decision come from the config, so widening the space (kernel 7, expansion 4, more widths) is a
config change.

What a skip does when stride or width change (see blocks.py): the identity residual exists only where
the layer has stride 1 and equal input and output widths, so a block's first layer loses it when the
block strides or changes width (its later layers keep it); the pooling skip is always there, the
input average-pooled to the stride and projected by a 1x1 conv + BN when the widths differ.

A layer count that would reach 0 removes the block (`r0`): the next block takes the tensor the
removed block would have taken. Only stride-1 blocks may be removed (with MobileNetV2's n = 1 blocks,
the first and the last, `-1` removes them), so the resolution at every block is fixed; a config in
which a strided block could reach 0 layers, or any block fewer, raises UserError here.

Decoded strings are self-consistent: each block's `i` is the width of the tensor that reaches it (the
previous non-empty block's `o`, else the stem's), so `models` and the latency table agree on every
layer. A removed block stays in the list as its `r0` string (so `encode` gets every token back).

`size` counts token sequences, the paper's S^B. Some sequences build the same network: width rounding
maps two multipliers of a narrow block to one width (16 x 0.75 and 16 x 1.0 both give 16), and a
removed block's other decisions do nothing. `encode` returns the first (smallest) token of each
decision that gives the string, so `decode(encode(s)) == s` for every decoded `s`.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from mnasnet_jax import blocks
from mnasnet_jax import errors

DECISIONS = ('conv_op', 'kernel', 'se_ratio', 'skip', 'filters', 'layers')
_CONFIG_FIELDS = {
  'conv_op': 'conv_ops',
  'kernel': 'kernels',
  'se_ratio': 'se_ratios',
  'skip': 'skip_ops',
  'filters': 'filter_multipliers',
  'layers': 'layer_deltas',
}
_MBCONV = re.compile(r'^mbconv(\d+)$')


def parse_conv_op(name: str) -> tuple[str, int]:
  """A conv-op option name as (blocks op, expansion)."""
  if name == 'conv':
    return 'conv', 1
  if name == 'sepconv':
    return 'mbconv', 1
  match = _MBCONV.match(str(name))
  if match and int(match.group(1)) >= 1:
    return 'mbconv', int(match.group(1))
  raise errors.UserError(
    f"unknown conv op {name!r}: expected 'conv', 'sepconv' or 'mbconv<expansion>' such as 'mbconv6'"
  )


class SearchSpace:
  """Tokens <-> block strings of the factorised hierarchical space described by `config`."""

  def __init__(self, config):
    self.stem_filters = int(config.stem_filters)
    self.base = blocks.as_block_args(config.base_blocks)
    searched = tuple(int(b) for b in config.searched_blocks)
    for b in searched:
      if not 0 <= b < len(self.base):
        raise errors.UserError(
          f'searched block {b} does not exist: the base network has blocks 0..{len(self.base) - 1}'
        )
    if len(set(searched)) != len(searched):
      raise errors.UserError(f'searched_blocks lists a block twice: {searched}')
    self.searched = tuple(sorted(searched))
    self.options = {}
    for decision in DECISIONS:
      values = tuple(config[_CONFIG_FIELDS[decision]])
      if not values:
        raise errors.UserError(f'config.{_CONFIG_FIELDS[decision]} needs at least one option')
      self.options[decision] = values
    self.conv_ops = tuple(parse_conv_op(name) for name in self.options['conv_op'])
    for skip in self.options['skip']:
      if skip not in blocks.SKIP_OPS:
        raise errors.UserError(
          f'unknown skip op {skip!r} in config.skip_ops: expected one of {blocks.SKIP_OPS}'
        )
    for kernel in self.options['kernel']:
      if int(kernel) < 1 or int(kernel) % 2 == 0:
        raise errors.UserError(f'kernel {kernel!r} in config.kernels: expected an odd size >= 1')
    for ratio in self.options['se_ratio']:
      if not 0.0 <= float(ratio) <= 1.0:
        raise errors.UserError(
          f'se ratio {ratio!r} in config.se_ratios: expected a value in [0, 1]'
        )
    for multiplier in self.options['filters']:
      if float(multiplier) <= 0:
        raise errors.UserError(f'filter multiplier {multiplier!r}: expected a positive number')
    for b, base in enumerate(self.base):
      deltas = self.options['layers'] if b in self.searched else (0,)
      fewest = base.repeats + min(int(d) for d in deltas)
      if fewest < 0 or (fewest == 0 and base.stride != 1):
        raise errors.UserError(
          f'block {b} ({blocks.encode(base)}) could have {fewest} layers: only stride-1 blocks may '
          'be removed (reach 0 layers), and no block may have fewer; narrow config.layer_deltas '
          'or fix the block'
        )
    self._first_token = {b: k * len(DECISIONS) for k, b in enumerate(self.searched)}
    self.choices = tuple(len(self.options[d]) for _ in self.searched for d in DECISIONS)
    self.size = math.prod(self.choices)

  # --- tokens <-> strings -----------------------------------------------------------------------

  def _position(self, p: int) -> str:
    return (
      f'position {p} (block {self.searched[p // len(DECISIONS)]}, {DECISIONS[p % len(DECISIONS)]})'
    )

  def _check_tokens(self, tokens) -> list[int]:
    try:
      tokens = [t for t in tokens]
    except TypeError:
      raise ValueError(
        f'expected a sequence of {len(self.choices)} tokens, got {tokens!r}'
      ) from None
    if len(tokens) != len(self.choices):
      raise ValueError(
        f'expected {len(self.choices)} tokens ({len(self.searched)} searched blocks x '
        f'{len(DECISIONS)} decisions), got {len(tokens)}'
      )
    checked = []
    for p, (token, n) in enumerate(zip(tokens, self.choices)):
      try:
        ok = not isinstance(token, bool) and int(token) == token and 0 <= token < n
      except (TypeError, ValueError):
        ok = False
      if not ok:
        raise ValueError(
          f'token {token!r} at {self._position(p)}: expected an integer in 0..{n - 1}'
        )
      checked.append(int(token))
    return checked

  def _searched_block(self, b: int, picks: dict, in_filters: int) -> blocks.BlockArgs:
    """Block `b` as the decisions `picks` (option values) make it, reached by `in_filters`."""
    base = self.base[b]
    op, expand = parse_conv_op(picks['conv_op'])
    return blocks.BlockArgs(
      repeats=base.repeats + int(picks['layers']),
      kernel=int(picks['kernel']),
      stride=base.stride,
      expand=expand,
      in_filters=in_filters,
      out_filters=blocks.round_filters(base.out_filters, float(picks['filters'])),
      se_ratio=float(picks['se_ratio']),
      skip=picks['skip'],
      op=op,
    )

  def largest(self) -> list[int]:
    """The tokens of the child holding most of the others' weights in the supernet (supernet.py):
    each searched block at its largest expansion (mbconv before the regular conv), kernel, SE
    ratio, filter multiplier and layer count, with a residual (identity before pool before none)."""

    def size(d: str, i: int):
      if d == 'conv_op':
        op, expansion = self.conv_ops[i]
        return expansion, op == 'mbconv'
      if d == 'skip':
        return ('none', 'pool', 'identity').index(self.options[d][i])
      return float(self.options[d][i])

    picks = [max(range(len(self.options[d])), key=lambda i: size(d, i)) for d in DECISIONS]
    return picks * len(self.searched)

  def decode(self, tokens: Sequence[int]) -> list[str]:
    """The block strings of the whole network that `tokens` select (fixed blocks included)."""
    tokens = self._check_tokens(tokens)
    result, width = [], self.stem_filters
    for b, base in enumerate(self.base):
      if b in self.searched:
        start = self._first_token[b]
        picks = {d: self.options[d][tokens[start + j]] for j, d in enumerate(DECISIONS)}
        block = self._searched_block(b, picks, width)
      else:
        block = base.replace(in_filters=width)
      result.append(blocks.encode(block))
      if block.repeats:
        width = block.out_filters
    return result

  def encode(self, block_strings: Sequence[blocks.BlockLike]) -> list[int]:
    """The smallest tokens that decode to `block_strings`; ValueError naming the block if none do."""
    given = blocks.as_block_args(block_strings)
    if len(given) != len(self.base):
      raise ValueError(f'expected {len(self.base)} block strings, got {len(given)}')
    tokens = []
    for b in self.searched:
      block = given[b]
      values = {
        'conv_op': (block.op, block.expand),
        'kernel': block.kernel,
        'se_ratio': block.se_ratio,
        'skip': block.skip,
        'filters': block.out_filters,
        'layers': block.repeats - self.base[b].repeats,
      }
      for decision in DECISIONS:
        if decision == 'conv_op':
          options = self.conv_ops
        elif decision == 'filters':
          options = [
            blocks.round_filters(self.base[b].out_filters, float(m))
            for m in self.options['filters']
          ]
        else:
          options = self.options[decision]
        matches = [j for j, option in enumerate(options) if option == values[decision]]
        if not matches:
          raise ValueError(
            f'block {b} ({blocks.encode(block)}): {decision} {values[decision]!r} is '
            f'not in the space, whose options are {list(options)}'
          )
        tokens.append(matches[0])
    expected = self.decode(tokens)
    for b, (want, got) in enumerate(zip(expected, given)):
      if blocks.encode(got) != want:
        raise ValueError(
          f'block {b} is {blocks.encode(got)!r}, but the space builds {want!r} there '
          '(fixed blocks must be the base block; `i` must be the incoming width)'
        )
    return tokens

  # --- what the space can produce (for latency tables) ------------------------------------------

  def _input_widths(self) -> list[set[int]]:
    """The widths that can reach each block, and (last entry) the head."""
    reaching, widths = [], {self.stem_filters}
    for b, base in enumerate(self.base):
      reaching.append(widths)
      if b in self.searched:
        outs = {blocks.round_filters(base.out_filters, float(m)) for m in self.options['filters']}
        removable = any(base.repeats + int(d) == 0 for d in self.options['layers'])
      else:
        outs, removable = {base.out_filters}, base.repeats == 0
      widths = outs | (widths if removable else set())
    reaching.append(widths)
    return reaching

  def block_candidates(self, i: int) -> list[blocks.BlockArgs]:
    """Every block the i-th block can become, for every width that can reach it (`r0` included)."""
    if not 0 <= i < len(self.base):
      raise ValueError(
        f'block {i} does not exist: the base network has blocks 0..{len(self.base) - 1}'
      )
    widths = sorted(self._input_widths()[i])
    if i not in self.searched:
      return [self.base[i].replace(in_filters=w) for w in widths]
    candidates = set()
    grid = [[]]
    for decision in DECISIONS:
      grid = [picks + [v] for picks in grid for v in self.options[decision]]
    for values in grid:
      picks = dict(zip(DECISIONS, values))
      for w in widths:
        candidates.add(self._searched_block(i, picks, w))
    return sorted(candidates, key=blocks.encode)

  def block_resolutions(self, resolution: int) -> list[int]:
    """The input resolution of each block for `resolution` x `resolution` images (after the stem)."""
    size = blocks.same_output_size(resolution, 2)
    result = []
    for base in self.base:
      result.append(size)
      size = blocks.same_output_size(size, base.stride)
    return result

  def distinct_layers(self, resolution: int) -> set[blocks.Layer]:
    """Every layer the space can produce for `resolution`-pixel images (the stem not included)."""
    layers = set()
    for i, size in enumerate(self.block_resolutions(resolution)):
      for block in self.block_candidates(i):
        layers.update(blocks.layers([block], block.in_filters, size))
    return layers

  def head_input_widths(self) -> set[int]:
    """The widths that can reach the 1x1 head conv."""
    return set(self._input_widths()[-1])
