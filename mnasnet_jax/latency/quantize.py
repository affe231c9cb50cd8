"""Full-integer post-training quantization of a TFLite model with `ai-edge-quantizer`.

A phone runs MnasNet in int8: weights int8 per output channel, activations int8 per tensor with
ranges calibrated on a representative dataset (min/max over its images), every op on integer kernels.
The float TFLite file of export.py is quantized as converted (BN already folded, so each conv's
per-channel scale covers the folded kernel). The model's input and output are int8 (the graph is
integer end to end, as a phone's camera pipeline feeds it) or float32 (a QUANTIZE op after the
input and a DEQUANTIZE before the output, so the caller feeds the same normalised images as the
float model's).

A latency table's int8 units are quantized the same way with int8 inputs and outputs, as they sit
inside an int8 network, calibrated on random inputs: the integer kernels' time does not depend on
the values.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from mnasnet_jax import errors

PRECISIONS = ('float32', 'int8')
IO_DTYPES = ('int8', 'float32')
SIGNATURE = 'serving_default'
INPUT_NAME = 'images'  # export.to_tflite's signature
# The narrowest activation range calibrated: a tensor that is constant on every calibration image
# (a ReLU dead on all of them, common in a unit's SE on random inputs) otherwise gets a scale of
# about 1e-12, which XNNPACK refuses ("failed to prepare"). Normalised activations span units.
MIN_RANGE = 1e-2


def check_precision(precision: str, io_dtype: str = 'int8', where: str = 'config'):
  if precision not in PRECISIONS:
    raise errors.UserError(f'{where}.precision = {precision!r}: expected one of {PRECISIONS}')
  if io_dtype not in IO_DTYPES:
    raise errors.UserError(f'{where}.io_dtype = {io_dtype!r}: expected one of {IO_DTYPES}')


def recipe(io_dtype: str = 'int8'):
  """ai-edge-quantizer's static recipe: int8 weights (per channel) and activations for every op
  it supports; a float32 `io_dtype` leaves the graph's input and output unquantized."""
  from ai_edge_quantizer import algorithm_manager
  from ai_edge_quantizer import qtyping
  from ai_edge_quantizer import recipe_manager

  manager = recipe_manager.RecipeManager()
  manager.add_static_config(
    regex='.*',
    operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
    activation_num_bits=8,
    weight_num_bits=8,
  )
  if io_dtype == 'float32':
    for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
      manager.add_quantization_config(
        '.*', op, algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE
      )
  return manager.get_quantization_recipe()


def quantize_int8(content: bytes, samples: Iterable[np.ndarray], io_dtype: str = 'int8') -> bytes:
  """The full-integer model of the float TFLite `content`, its activation ranges calibrated on
  `samples` (float32 inputs of the model's input shape, as the float model takes them)."""
  from ai_edge_quantizer import quantizer

  check_precision('int8', io_dtype)
  q = quantizer.Quantizer(bytearray(content), recipe(io_dtype))
  data = [{INPUT_NAME: np.asarray(x, np.float32)} for x in samples]
  if not data:
    raise errors.UserError('int8 quantization needs at least one calibration image')
  calibration = q.calibrate({SIGNATURE: data}, num_threads=1)
  for qsv in calibration.values():
    if 'min' in qsv and 'max' in qsv:
      qsv['max'] = np.maximum(qsv['max'], qsv['min'] + MIN_RANGE).astype(np.float32)
  result = q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
  return bytes(result.quantized_model)


def random_samples(shape, num: int = 2, seed: int = 0) -> list[np.ndarray]:
  """Calibration inputs for a latency unit: standard normal, like the normalised activations."""
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(num)]


class Runner:
  """Runs a TFLite model (float, or int8 with either I/O) on float32 inputs, returning float32
  outputs: an int8 input is quantized with the input tensor's scale and zero point, an int8
  output dequantized with the output's."""

  def __init__(self, content: bytes, num_threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
    self.interpreter.allocate_tensors()
    self.input = self.interpreter.get_input_details()[0]
    self.output = self.interpreter.get_output_details()[0]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    dtype = self.input['dtype']
    if dtype != np.float32:
      scale, zero = self.input['quantization']
      info = np.iinfo(dtype)
      x = np.clip(np.round(x / scale) + zero, info.min, info.max)
    self.interpreter.set_tensor(self.input['index'], np.asarray(x, dtype))
    self.interpreter.invoke()
    y = self.interpreter.get_tensor(self.output['index'])
    if self.output['dtype'] != np.float32:
      scale, zero = self.output['quantization']
      y = (y.astype(np.float32) - zero) * scale
    return y


# --- the export job's int8 file ------------------------------------------------------------------


def normalised(images, data) -> np.ndarray:
  """uint8 images as the exported model takes them: normalised as on the training devices."""
  from mnasnet_jax import train

  return np.asarray(train.normalise(images, (data.mean, data.std)))


def representative_images(data, count: int, seed: int) -> list[np.ndarray]:
  """`count` training images of `data` (as its training batches draw them), each [1, H, W, 3]
  normalised: the ranges the int8 activations are calibrated to."""
  images, _ = next(data.train_batches(count, seed))
  return [x[None] for x in normalised(images, data)]


def top1(definition, variables, contents: dict, data, examples, batch_size: int) -> dict:
  """Top-1 of the float JAX model and of each TFLite file in `contents` (name -> bytes) on the
  first `examples` held-out images of `data` (None: all), image by image for the files."""
  import jax

  model = definition.create(dtype='float32')
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  runners = {name: Runner(content) for name, content in contents.items()}
  correct = dict.fromkeys(['jax_float32', *runners], 0)
  count = 0
  for images, labels, mask in data.eval_batches(batch_size, examples):
    x = normalised(images, data)
    keep = mask > 0
    correct['jax_float32'] += int(np.sum((np.argmax(forward(variables, x), -1) == labels)[keep]))
    for name, run in runners.items():
      predicted = np.array([np.argmax(run(image[None])) for image in x[keep]])
      correct[name] += int(np.sum(predicted == labels[keep]))
    count += int(keep.sum())
  return {'examples': count, **{name: hits / max(count, 1) for name, hits in correct.items()}}


def int8_data(config, definition):
  """`config.data` for the int8 file's calibration and evaluation, loaded (and checked against the
  model) before anything is exported."""
  from mnasnet_jax import input_pipeline

  if config.calibration_images < 1:
    raise errors.UserError(
      f'config.calibration_images = {config.calibration_images}: expected a whole number >= 1'
    )
  data = input_pipeline.create(config.data, config.data.split)
  if (data.image_size, data.num_classes) != (config.resolution, definition.num_classes):
    raise errors.UserError(
      f'config.data ({data.name}, {data.image_size} px, {data.num_classes} classes) does not '
      f'match the model ({config.resolution} px, {definition.num_classes} classes): set '
      'config.data.dataset and config.data.image_size to the data it was trained on'
    )
  return data


def export_int8(config, definition, variables, data, float_path: str) -> dict:
  """The export job's int8 half: `float_path` quantized on representative training images of
  `data` (`int8_data`), written beside it as `config.int8_filename`; reports the int8 file's top-1
  against the float JAX model's (and the float file's) on held-out images, and both files' latency
  timed back to back after warm-up, as TFLite's benchmark_model times a model (`config.latency`)."""
  from mnasnet_jax.latency import profiler

  with open(float_path, 'rb') as f:
    float_content = f.read()
  samples = representative_images(data, config.calibration_images, config.seed)
  int8_content = quantize_int8(float_content, samples, config.io_dtype)
  int8_path = os.path.join(os.path.dirname(float_path), config.int8_filename)
  with open(int8_path, 'wb') as f:
    f.write(int8_content)
  files = {'float32': float_content, 'int8': int8_content}
  accuracy = top1(definition, variables, files, data, config.eval_examples, config.eval_batch_size)
  timing = config.latency
  backend = profiler.LiteRTBackend(
    timing.warmup, timing.repeats, timing.num_threads, timing.instances
  )
  latency = {name: backend.time(content, name) for name, content in files.items()}
  return {
    'float32_file': float_path,
    'int8_file': int8_path,
    'io_dtype': config.io_dtype,
    'calibration_images': len(samples),
    'held_out': f'{data.name} ({config.data.split} split), first {accuracy["examples"]} images',
    'top1': accuracy,
    'top1_delta_int8_vs_jax': accuracy['int8'] - accuracy['jax_float32'],
    'size_mb': {name: len(content) / 1e6 for name, content in files.items()},
    'latency_ms': {
      name: {'median': stats['median_ms'], 'min': stats['min_ms']}
      for name, stats in latency.items()
    },
    'latency_protocol': f'back to back after {timing.warmup} warm-up invokes, '
    f'{timing.instances} fresh interpreters x {timing.repeats}, {timing.num_threads} thread(s)',
    'device': backend.device()['name'],
  }
