"""MnasNet to TFLite without TensorFlow: BN folded into the convs, `jax.export`, `litert-converter`.

A phone runs the inference graph: every conv followed by BN becomes one conv with a bias, and the
convs are the native ops (TFLite's CONV_2D, DEPTHWISE_CONV_2D). That graph is the Flax model itself,
`inference_model` (native forms, BN 'folded') on the variables `fold_batchnorm` makes of trained
ones; a latency table's unit is one of its parts (models.Stem, MnasLayer, Head) exported alone.
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax.latency import quantize

# --- the inference graph -----------------------------------------------------------------------


def inference_model(model: models.MnasNet) -> models.MnasNet:
  """`model` as a phone runs it: the native convs, float32, BN folded (its variables come from
  `fold_batchnorm`)."""
  return model.clone(
    depthwise='native', conv='native', batch_norm='folded', dtype=jnp.float32, bn_axis_name=None
  )


def fold_batchnorm(variables, epsilon: float = models.MnasNet.bn_epsilon):
  """Flax variables -> the variables of the same model with BN folded: every `<conv>` + `<conv>_bn`
  pair becomes `<conv>` with its kernel scaled and `<conv>_bn` with a bias alone.

  BN in inference is y = (x - mean) * scale / sqrt(var + eps) + bias, an affine map per output
  channel: its factor merges into the conv's kernel (last axis), the rest is a bias. Other leaves
  stay.
  """

  def fold(params, stats):
    out = {}
    for name, value in params.items():
      bn = f'{name}_bn'
      if bn in params:
        factor = params[bn]['scale'] / np.sqrt(stats[bn]['var'] + epsilon)
        out[name] = {**value, 'kernel': value['kernel'] * factor}
        out[bn] = {'bias': params[bn]['bias'] - stats[bn]['mean'] * factor}
      elif name.endswith('_bn') and name[:-3] in params:
        continue  # folded with its conv
      elif isinstance(value, dict) and 'kernel' not in value:
        out[name] = fold(value, stats.get(name, {}))
      else:
        out[name] = value
    return out

  variables = jax.tree_util.tree_map(np.asarray, dict(variables))
  return {'params': fold(variables['params'], variables.get('batch_stats', {}))}


def random_variables(module: nn.Module, input_shape, seed: int = 0):
  """Variables of `module` with random values drawn in NumPy: shapes come from `eval_shape` alone,
  so no initialiser runs (for latency only the shapes matter; BN statistics are made non-trivial).
  Kernels are scaled by fan-in so activations keep their size through a network."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module, input_shape))


def param_count(module: nn.Module, input_shape) -> int:
  return models.count_params(models.variable_shapes(module, input_shape)['params'])


# --- export ------------------------------------------------------------------------------------


def to_tflite(fn, input_shape) -> bytes:
  """A TFLite flatbuffer of `fn` (one float32 input, constants closed over) via StableHLO."""
  from litert_converter import converter_api_ext
  from litert_converter.mlir import ir
  from litert_converter.mlir import passmanager

  exported = jax_export.export(jax.jit(fn), platforms=['cpu'])(
    jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  )
  context = ir.Context()
  converter_api_ext.prepare_mlir_context(context)
  with context, ir.Location.unknown():
    module = ir.Module.parse(exported.mlir_module())
    converter_api_ext.run_convert_to_tfl_passes(
      module, passmanager.PassManager(), converter_api_ext.ConvertToTFLConfig()
    )
    converter_api_ext.set_signature(module.operation, 'serving_default', ['images'], ['output'])
    return converter_api_ext.export_flatbuffer_to_bytes(module.operation)


def module_tflite(module: nn.Module, input_shape, variables=None, seed: int = 0) -> bytes:
  """`module` (of an `inference_model`) in inference as a TFLite model; None draws random
  `variables`."""
  if variables is None:
    variables = random_variables(module, input_shape, seed)
  return to_tflite(functools.partial(module.apply, variables, train=False), input_shape)


def _write(path, content: bytes) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)
  return path


def export_tflite(
  arch,
  path,
  resolution: int = 224,
  num_classes: int = 1000,
  params=None,
  seed: int = 0,
  depth_multiplier: float = 1.0,
  padding: str = 'same',
  bn_epsilon: float = models.MnasNet.bn_epsilon,
) -> str:
  """Writes `arch` (a name or block strings) as a TFLite model of input [1, res, res, 3].

  `params`: the Flax variables ({'params', 'batch_stats'}) of `models.create(arch, ...)` with this
  `padding` and `bn_epsilon`; None draws random ones (enough for latency). Returns the path.
  """
  # The native depthwise form spares building the CPU kernel that inference_model drops anyway.
  model = models.create(
    arch,
    num_classes=num_classes,
    depth_multiplier=depth_multiplier,
    depthwise='native',
    padding=padding,
    bn_epsilon=bn_epsilon,
  )
  shape = (1, resolution, resolution, 3)
  variables = random_variables(model, shape, seed) if params is None else params
  folded = fold_batchnorm(variables, model.bn_epsilon)
  return _write(path, module_tflite(inference_model(model), shape, folded))


def run(config, workdir):
  """launch/main.py's 'export' job: DIR/model.tflite from random, trained or imported weights (the
  model a checkpoint names, else the config's)."""
  from mnasnet_jax import train  # pylint: disable=g-import-not-at-top  (training is optional here)

  if not workdir:
    raise errors.UserError(f'the export job needs --workdir=DIR for its {config.filename}')
  quantize.check_precision(config.precision, config.io_dtype)
  variables = None
  definition = train.model_def(config, config.arch, config.num_classes)
  if config.checkpoint:
    checkpoint = train.load_checkpoint(config.checkpoint, config.source_model, config.use_ema)
    variables, definition = checkpoint.variables, checkpoint.model or definition
  data = quantize.int8_data(config, definition) if config.precision == 'int8' else None
  if jax.process_index():  # every host of a multi-host job runs the job: one writes the file
    return
  weights = 'trained' if variables else 'random'
  if variables is None and config.precision == 'int8':  # the JAX model's top-1 needs them too
    shape = (1, config.resolution, config.resolution, 3)
    variables = random_variables(definition.create(depthwise='native'), shape)
  path = export_tflite(
    definition.arch,
    os.path.join(workdir, config.filename),
    config.resolution,
    definition.num_classes,
    params=variables,
    depth_multiplier=definition.depth_multiplier,
    padding=definition.padding,
    bn_epsilon=definition.bn_epsilon,
  )
  print(f'wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {weights} weights)')
  if config.precision == 'int8':
    report = quantize.export_int8(config, definition, variables, data, path)
    report_path = os.path.join(workdir, 'export_report.json')
    with open(report_path, 'w') as f:
      json.dump(report, f, indent=2)
    top1, ms = report['top1'], report['latency_ms']
    print(
      f'wrote {report["int8_file"]} ({report["size_mb"]["int8"]:.2f} MB, int8, '
      f'{config.io_dtype} input and output): top-1 {100 * top1["int8"]:.2f}% against the '
      f"float JAX model's {100 * top1['jax_float32']:.2f}% on {top1['examples']} held-out "
      f'images; {ms["int8"]["median"]:.3f} ms against {ms["float32"]["median"]:.3f} ms '
      f'(median, back to back); {report_path}'
    )
