"""MnasNet to TFLite without TensorFlow: BN folded into the convs, `jax.export`, `litert-converter`.

A phone runs the inference graph: every conv followed by BN becomes one conv with a bias, and the
depthwise conv is the native grouped conv (TFLite's DEPTHWISE_CONV_2D). The folded forward pass below
is that graph written over the Flax model's own variable tree, so trained variables export as they
are and a single layer (for the latency table) exports without building a network around it.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export
from jax import lax

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import models

BN_EPSILON = 1e-3
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


# --- BN folding --------------------------------------------------------------------------------

def fold_batchnorm(variables, epsilon: float = BN_EPSILON):
  """Flax variables -> the same tree with every `<conv>` + `<conv>_bn` pair as one biased conv.

  BN in inference is y = (x - mean) * scale / sqrt(var + eps) + bias, an affine map per output
  channel, so it merges into the conv's kernel (last axis) and a new bias. Other leaves stay.
  """
  def fold(params, stats):
    out = {}
    for name, value in params.items():
      if name.endswith('_bn'):
        continue
      bn = f'{name}_bn'
      if bn in params:
        factor = params[bn]['scale'] / np.sqrt(stats[bn]['var'] + epsilon)
        out[name] = {'kernel': value['kernel'] * factor,
                     'bias': params[bn]['bias'] - stats[bn]['mean'] * factor}
      elif isinstance(value, dict) and 'kernel' not in value:
        out[name] = fold(value, stats.get(name, {}))
      else:
        out[name] = value
    return out

  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  return fold(variables['params'], variables.get('batch_stats', {}))


def random_variables(module: nn.Module, input_shape, seed: int = 0, **kwargs):
  """Variables of `module` with random values drawn in NumPy: shapes come from `eval_shape` alone,
  so no initialiser runs (for latency only the shapes matter; BN statistics are made non-trivial)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# --- the folded inference graph ----------------------------------------------------------------

def _conv(x, p, stride: int = 1, groups: int = 1):
  y = lax.conv_general_dilated(x, p['kernel'], (stride, stride), 'SAME',
                               dimension_numbers=_DIMENSIONS, feature_group_count=groups)
  return y + p['bias'] if 'bias' in p else y


def _squeeze_excite(x, p):
  s = jnp.mean(x, axis=(1, 2), keepdims=True)
  s = jax.nn.relu(_conv(s, p['reduce']))
  return x * jax.nn.sigmoid(_conv(s, p['expand']))


def layer_forward(spec: blocks_lib.Layer, p, x):
  """One MnasNet layer (models.MnasLayer) in inference, on folded parameters."""
  inputs = x
  if spec.op == 'conv':
    x = jax.nn.relu(_conv(x, p['conv'], spec.stride))
  else:
    if spec.expand != 1:
      x = jax.nn.relu(_conv(x, p['expand']))
    x = jax.nn.relu(_conv(x, p['depthwise'], spec.stride, groups=x.shape[-1]))
  if spec.se_filters:
    x = _squeeze_excite(x, p['se'])
  if spec.op != 'conv':
    x = _conv(x, p['project'])
  if spec.residual:
    shortcut = models.pool_to_stride(inputs, spec.stride)
    if spec.projects_shortcut:
      shortcut = _conv(shortcut, p['shortcut'])
    x = x + shortcut
  return x


def stem_forward(p, x):
  return jax.nn.relu(_conv(x, p['stem'], 2))


def head_forward(p, x):
  x = jax.nn.relu(_conv(x, p['head']))
  x = jnp.mean(x, axis=(1, 2))
  return x @ p['classifier']['kernel'] + p['classifier']['bias']


def network_forward(specs, p, images):
  x = stem_forward(p, images)
  for i, spec in enumerate(specs):
    x = layer_forward(spec, p[f'layer_{i}'], x)
  return head_forward(p, x)


# --- export ------------------------------------------------------------------------------------

def to_tflite(fn, input_shape) -> bytes:
  """A TFLite flatbuffer of `fn` (one float32 input, constants closed over) via StableHLO."""
  from litert_converter import converter_api_ext
  from litert_converter.mlir import ir
  from litert_converter.mlir import passmanager

  exported = jax_export.export(jax.jit(fn), platforms=['cpu'])(
      jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  context = ir.Context()
  converter_api_ext.prepare_mlir_context(context)
  with context, ir.Location.unknown():
    module = ir.Module.parse(exported.mlir_module())
    converter_api_ext.run_convert_to_tfl_passes(module, passmanager.PassManager(),
                                                converter_api_ext.ConvertToTFLConfig())
    converter_api_ext.set_signature(module.operation, 'serving_default', ['images'], ['output'])
    return converter_api_ext.export_flatbuffer_to_bytes(module.operation)


def _write(path, content: bytes) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)
  return path


def _model(arch, num_classes, depth_multiplier=1.0):
  return models.create(arch, num_classes=num_classes, depth_multiplier=depth_multiplier,
                       depthwise='native', conv='native', dtype='float32')


def export_tflite(arch, path, resolution: int = 224, num_classes: int = 1000, params=None,
                  seed: int = 0, depth_multiplier: float = 1.0) -> str:
  """Writes `arch` (a name or block strings) as a TFLite model of input [1, res, res, 3].

  `params`: the Flax variables ({'params', 'batch_stats'}) of `models.create(arch, ...)`; None
  draws random ones (enough for latency). Returns the path.
  """
  model = _model(arch, num_classes, depth_multiplier)
  shape = (1, resolution, resolution, 3)
  variables = random_variables(model, shape, seed) if params is None else params
  folded = fold_batchnorm(variables, model.bn_epsilon)
  specs = model.layer_specs(resolution)
  return _write(path, to_tflite(functools.partial(network_forward, specs, folded), shape))


# --- the units of the latency table --------------------------------------------------------------

def _conv_shapes(kernel: int, cin: int, cout: int) -> dict:
  """A folded conv's parameter shapes; `cin` 1 is the depthwise kernel (k, k, 1, C)."""
  return {'kernel': (kernel, kernel, cin, cout), 'bias': (cout,)}


def layer_param_shapes(spec: blocks_lib.Layer) -> dict:
  """The folded parameter tree of one layer (what `fold_batchnorm` makes of models.MnasLayer's)."""
  p = {}
  if spec.op == 'conv':
    p['conv'] = _conv_shapes(spec.kernel, spec.in_filters, spec.out_filters)
    width = spec.out_filters
  else:
    width = spec.hidden_filters
    if spec.expand != 1:
      p['expand'] = _conv_shapes(1, spec.in_filters, width)
    p['depthwise'] = _conv_shapes(spec.kernel, 1, width)
    p['project'] = _conv_shapes(1, width, spec.out_filters)
  if spec.se_filters:
    p['se'] = {'reduce': _conv_shapes(1, width, spec.se_filters),
               'expand': _conv_shapes(1, spec.se_filters, width)}
  if spec.projects_shortcut:
    p['shortcut'] = _conv_shapes(1, spec.in_filters, spec.out_filters)
  return p


def stem_param_shapes(filters: int) -> dict:
  return {'stem': _conv_shapes(3, 3, filters)}


def head_param_shapes(in_filters: int, num_classes: int, head_filters: int = models.HEAD_FILTERS):
  return {'head': _conv_shapes(1, in_filters, head_filters),
          'classifier': {'kernel': (head_filters, num_classes), 'bias': (num_classes,)}}


def _is_shape(x):
  return isinstance(x, tuple)


def param_count(shapes: dict) -> int:
  return int(sum(np.prod(s) for s in jax.tree_util.tree_leaves(shapes, is_leaf=_is_shape)))


def random_params(shapes: dict, seed: int = 0) -> dict:
  """Random folded parameters drawn directly from their shapes: no Flax init (the profiler makes
  thousands). Kernels are scaled by fan-in so activations keep their size through a network."""
  rng = np.random.default_rng(seed)

  def draw(shape):
    if len(shape) == 1:
      return rng.normal(0.0, 0.1, shape).astype(np.float32)
    return (rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map(draw, shapes, is_leaf=_is_shape)


def layer_tflite(spec: blocks_lib.Layer, seed: int = 0) -> bytes:
  """One layer alone: input [1, r, r, in_filters], random weights."""
  params = random_params(layer_param_shapes(spec), seed)
  shape = (1, spec.resolution, spec.resolution, spec.in_filters)
  return to_tflite(functools.partial(layer_forward, spec, params), shape)


def stem_tflite(filters: int, resolution: int, seed: int = 0) -> bytes:
  params = random_params(stem_param_shapes(filters), seed)
  return to_tflite(functools.partial(stem_forward, params), (1, resolution, resolution, 3))


def head_tflite(in_filters: int, resolution: int, num_classes: int, seed: int = 0) -> bytes:
  """The head as the model has it: 1x1 conv to 1280 + ReLU, global mean, classifier."""
  params = random_params(head_param_shapes(in_filters, num_classes), seed)
  return to_tflite(functools.partial(head_forward, params), (1, resolution, resolution, in_filters))


def run(config, workdir):
  """launch/main.py's 'export' job: DIR/model.tflite from random or trained weights."""
  from mnasnet_jax import train  # pylint: disable=g-import-not-at-top  (training is optional here)
  if not workdir:
    raise ValueError('the export job needs --workdir for the .tflite file')
  variables = None
  if config.checkpoint_dir:
    variables = train.restore_variables(config.checkpoint_dir, use_ema=config.use_ema)
  path = export_tflite(config.arch, os.path.join(workdir, config.filename), config.resolution,
                       config.num_classes, params=variables,
                       depth_multiplier=config.depth_multiplier)
  print(f'wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, '
        f'{"trained" if variables else "random"} weights)')
