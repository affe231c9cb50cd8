"""Pretrained weights in: timm's and torchvision's MnasNet state dicts as this project's variables.

The published ImageNet MnasNets are PyTorch models: timm's (efficientnet.py, `_gen_mnasnet_a1`,
`_gen_mnasnet_b1`, `_gen_mnasnet_small`) and torchvision's (models/mnasnet.py, MNASNet(alpha)). Each
is one of this project's architectures at a depth multiplier, computed with PyTorch's symmetric
padding and BatchNorm epsilon 1e-5 (`models.MnasNet`'s `padding` and `bn_epsilon`); what a source
has that the official TensorFlow code lacks is written in its block strings (timm's mnasnet_small
has an identity skip around its first layer: `i8` where the official string says `i16`). Importing
is then a renaming and transposition of tensors (PyTorch's OIHW kernels to Flax's HWIO), checked
tensor by tensor against the model's own shapes.

Files are read without running pickled code: safetensors, or `.pth` through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import errors
from mnasnet_jax import models


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The function a set of weights computes: everything of `models.create` but the device's forms."""

  arch: models.Architecture
  depth_multiplier: float = 1.0
  padding: str = 'same'
  bn_epsilon: float = 1e-3
  num_classes: int = 1000

  def create(self, **kwargs) -> models.MnasNet:
    """The model; `kwargs` are models.create's other arguments (forms, dtype, dropout, BN)."""
    return models.create(
      self.arch,
      num_classes=self.num_classes,
      depth_multiplier=self.depth_multiplier,
      padding=self.padding,
      bn_epsilon=self.bn_epsilon,
      **kwargs,
    )

  def to_json(self) -> str:
    fields = dataclasses.asdict(self)
    fields['arch']['blocks'] = list(self.arch.blocks)
    return json.dumps(fields, indent=2)

  @classmethod
  def from_json(cls, text: str) -> ModelDef:
    fields = json.loads(text)
    arch = fields.pop('arch')
    return cls(models.Architecture(tuple(arch.pop('blocks')), **arch), **fields)


# --- the source models --------------------------------------------------------------------------

PYTORCH = {'padding': 'symmetric', 'bn_epsilon': 1e-5}  # nn.Conv2d(padding=k // 2), nn.BatchNorm2d
_SMALL = models.ARCHITECTURES['mnasnet_small']
# timm's first layer keeps the stem's 8 channels, so its identity skip applies (the official rule:
# stride 1 and i == o); the official string's i16 names a width the tensor does not have.
TIMM_MNASNET_SMALL = dataclasses.replace(_SMALL, blocks=('r1_k3_s11_e1_i8_o8',) + _SMALL.blocks[1:])


@dataclasses.dataclass(frozen=True)
class Source:
  library: str  # 'timm' or 'torchvision': the layout of its state dict
  model: ModelDef


def _source(library, arch, multiplier=1.0):
  arch = models.ARCHITECTURES[arch] if isinstance(arch, str) else arch
  return Source(library, ModelDef(arch, multiplier, **PYTORCH))


# Every MnasNet timm 1.0 and torchvision 0.29 build, by the name they build it with.
SOURCES = {
  **{f'semnasnet_{m:03.0f}': _source('timm', 'mnasnet_a1', m / 100) for m in (50, 75, 100, 140)},
  **{f'mnasnet_{m:03.0f}': _source('timm', 'mnasnet_b1', m / 100) for m in (50, 75, 100, 140)},
  'mnasnet_small': _source('timm', TIMM_MNASNET_SMALL),
  **{
    f'mnasnet{name}': _source('torchvision', 'mnasnet_b1', alpha)
    for name, alpha in (('0_5', 0.5), ('0_75', 0.75), ('1_0', 1.0), ('1_3', 1.3))
  },
}
CLASSIFIER = {'timm': 'classifier.weight', 'torchvision': 'classifier.1.weight'}
STEM = {'timm': 'conv_stem.weight', 'torchvision': 'layers.0.weight'}


# --- the tensors' names: (source key, collection, variable path) per tensor -----------------------

Entry = tuple[str, str, tuple[str, ...]]


def _conv(source: str, target: tuple[str, ...], bias: bool = False) -> Iterator[Entry]:
  yield f'{source}.weight', 'params', (*target, 'kernel')
  if bias:
    yield f'{source}.bias', 'params', (*target, 'bias')


def _bn(source: str, target: tuple[str, ...]) -> Iterator[Entry]:
  yield f'{source}.weight', 'params', (*target, 'scale')
  yield f'{source}.bias', 'params', (*target, 'bias')
  yield f'{source}.running_mean', 'batch_stats', (*target, 'mean')
  yield f'{source}.running_var', 'batch_stats', (*target, 'var')


def _layer(prefix: str, spec: blocks_lib.Layer, target: str, names: dict) -> Iterator[Entry]:
  """One inverted bottleneck; `names` maps its convs and BNs to the source's module names."""
  parts = ('expand', 'depthwise', 'project') if spec.expand != 1 else ('depthwise', 'project')
  for part in parts:
    conv, bn = names[part]
    yield from _conv(prefix + conv, (target, part))
    yield from _bn(prefix + bn, (target, f'{part}_bn'))
  if spec.se_filters:
    yield from _conv(f'{prefix}se.conv_reduce', (target, 'se', 'reduce'), bias=True)
    yield from _conv(f'{prefix}se.conv_expand', (target, 'se', 'expand'), bias=True)


_TIMM_DS = {'depthwise': ('conv_dw', 'bn1'), 'project': ('conv_pw', 'bn2')}
_TIMM_IR = {
  'expand': ('conv_pw', 'bn1'),
  'depthwise': ('conv_dw', 'bn2'),
  'project': ('conv_pwl', 'bn3'),
}
_TORCHVISION_FIRST = {'depthwise': ('3', '4'), 'project': ('6', '7')}
_TORCHVISION_IR = {'expand': ('0', '1'), 'depthwise': ('3', '4'), 'project': ('6', '7')}


def _positions(model: models.MnasNet, resolution: int):
  """(block index, repeat, layer spec) of every layer, in the model's order."""
  scaled = blocks_lib.scale(model.blocks, model.depth_multiplier)
  where = [(b, r) for b, block in enumerate(scaled) for r in range(block.repeats)]
  return [(b, r, spec) for (b, r), spec in zip(where, model.layer_specs(resolution))]


def timm_entries(model: models.MnasNet, resolution: int) -> Iterator[Entry]:
  """timm's EfficientNet layout: conv_stem/bn1, blocks.<stage>.<repeat>, conv_head/bn2."""
  yield from _conv('conv_stem', ('stem',))
  yield from _bn('bn1', ('stem_bn',))
  for i, (b, r, spec) in enumerate(_positions(model, resolution)):
    names = _TIMM_DS if spec.expand == 1 else _TIMM_IR
    yield from _layer(f'blocks.{b}.{r}.', spec, f'layer_{i}', names)
  yield from _conv('conv_head', ('head',))
  yield from _bn('bn2', ('head_bn',))
  yield from _conv('classifier', ('classifier',), bias=True)


def torchvision_entries(model: models.MnasNet, resolution: int) -> Iterator[Entry]:
  """torchvision's MNASNet: one nn.Sequential `layers` (stem 0-1, the separable first layer 3-7,
  a stack of _InvertedResidual per block, head 14-15) and `classifier.1`."""
  positions = _positions(model, resolution)
  yield from _conv('layers.0', ('stem',))
  yield from _bn('layers.1', ('stem_bn',))
  for i, (b, r, spec) in enumerate(positions):
    if b == 0:
      yield from _layer('layers.', spec, f'layer_{i}', _TORCHVISION_FIRST)
    else:
      yield from _layer(f'layers.{7 + b}.{r}.layers.', spec, f'layer_{i}', _TORCHVISION_IR)
  head = 8 + positions[-1][0]
  yield from _conv(f'layers.{head}', ('head',))
  yield from _bn(f'layers.{head + 1}', ('head_bn',))
  yield from _conv('classifier.1', ('classifier',), bias=True)


ENTRIES = {'timm': timm_entries, 'torchvision': torchvision_entries}


def to_flax(array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in Flax's layout: conv kernels OIHW (depthwise C1HW) -> HWIO, dense OI -> IO."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def _torch_shape(flax_shape) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


# --- reading files ------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict as float32 NumPy arrays, from safetensors or a `.pth` read with
  weights_only=True (a training checkpoint's 'state_dict' or 'model' entry; 'module.' prefixes of
  DataParallel dropped)."""
  if not os.path.isfile(path):
    raise errors.UserError(f'no weights file {path!r}: expected a .safetensors or .pth file')
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
      state = load_file(path)
    except (SafetensorError, ValueError) as e:
      raise errors.UserError(f'{path}: not a readable safetensors file ({e})') from None
  elif path.endswith(('.pth', '.pt', '.bin')):
    import pickle

    import torch

    try:
      state = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
      reason = str(e).splitlines()[0]
      raise errors.UserError(
        f'{path}: not a state dict torch.load(weights_only=True) can read ({reason})'
      ) from None
    for key in ('state_dict', 'model'):
      if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
    if not isinstance(state, dict):
      raise errors.UserError(f'{path}: holds a {type(state).__name__}, expected a state dict')
    other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
      raise errors.UserError(
        f'{path}: entry {other!r} is not a tensor ({type(state[other]).__name__}): expected a '
        'state dict of tensors'
      )
    state = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  else:
    raise errors.UserError(f'weights file {path!r}: expected a .safetensors or .pth file')
  return {k.removeprefix('module.'): np.asarray(v) for k, v in state.items()}


# --- the import ---------------------------------------------------------------------------------


def convert(state: dict[str, np.ndarray], name: str, where: str = 'the state dict'):
  """(ModelDef, Flax variables) of `state`, the state dict of source model `name` (SOURCES).

  Every variable of the model must come from one tensor of its shape, and every tensor but BN's
  step counters must be used: anything else is a UserError naming the tensor and its shape. The
  number of classes is the file's (a fine-tuned source model may have another)."""
  if name not in SOURCES:
    raise errors.UserError(f'unknown source model {name!r}: expected one of {sorted(SOURCES)}')
  source = SOURCES[name]
  classifier = state.get(CLASSIFIER[source.library])
  num_classes = classifier.shape[0] if classifier is not None and classifier.ndim == 2 else 1000
  definition = dataclasses.replace(source.model, num_classes=num_classes)
  model = definition.create(
    depthwise='native', conv='native', batch_norm='autodiff', dtype='float32'
  )
  resolution = 32  # any size: shapes do not depend on it
  shapes = models.variable_shapes(model, (1, resolution, resolution, 3))
  variables = {'params': {}, 'batch_stats': {}}
  used = set()
  for key, collection, path in ENTRIES[source.library](model, resolution):
    expected = _torch_shape(_leaf(shapes[collection], path).shape)
    if key not in state:
      raise errors.UserError(
        f'{where} has no tensor {key!r} (expected shape {expected}) of {source.library} {name}'
      )
    if tuple(state[key].shape) != expected:
      raise errors.UserError(
        f'{where}: tensor {key!r} has shape {tuple(state[key].shape)}, expected {expected} '
        f'for {source.library} {name}'
      )
    node = variables[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(to_flax(state[key]).astype(np.float32))
    used.add(key)
  unused = sorted(k for k in set(state) - used if not k.endswith('num_batches_tracked'))
  if unused:
    raise errors.UserError(
      f'{where}: tensor {unused[0]!r} of shape {tuple(state[unused[0]].shape)} has no place in '
      f'{source.library} {name} ({len(unused)} unused tensors)'
    )
  expected_tree = jax.tree_util.tree_structure(shapes)
  if jax.tree_util.tree_structure(variables) != expected_tree:  # a bug in ENTRIES, not the file
    raise AssertionError(f'the {source.library} names do not cover the variables of {name}')
  return definition, variables


def _leaf(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def identify(state: dict[str, np.ndarray], where: str = 'the state dict'):
  """(name, ModelDef, variables) of the source model whose state dict `state` is: of the library
  its names are in, the one whose stem width it has and whose every tensor it holds."""
  libraries = [lib for lib, key in STEM.items() if key in state]
  if not libraries:
    raise errors.UserError(
      f'{where} is neither a timm nor a torchvision MnasNet: it has no '
      f'{" or ".join(repr(k) for k in STEM.values())}'
    )
  library = libraries[0]
  stem = state[STEM[library]].shape[0]
  candidates = [
    name
    for name, source in SOURCES.items()
    if source.library == library
    and blocks_lib.round_filters(source.model.arch.stem_filters, source.model.depth_multiplier)
    == stem
  ]
  failures = {}
  for name in candidates:
    try:
      return (name, *convert(state, name, where))
    except errors.UserError as e:
      failures[name] = e
  if not failures:
    raise errors.UserError(
      f'{where}: stem {STEM[library]!r} has {stem} filters, which no {library} MnasNet has'
    )
  raise errors.UserError(
    f'{where} matches no {library} MnasNet ({", ".join(failures)} have its stem); as '
    f'{candidates[0]}: {failures[candidates[0]]}'
  )


def import_file(path: str, source_model: str | None = None):
  """(source model name, ModelDef, Flax variables) of a timm or torchvision weights file; without
  `source_model` the model is identified from the file's tensors."""
  state = read_state_dict(path)
  if source_model is None:
    return identify(state, path)
  return (source_model, *convert(state, source_model, path))
