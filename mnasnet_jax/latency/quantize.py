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

from typing import Iterable

import numpy as np

from mnasnet_jax import errors

PRECISIONS = ('float32', 'int8')
IO_DTYPES = ('int8', 'float32')
SIGNATURE = 'serving_default'
INPUT_NAME = 'images'  # export.to_tflite's signature


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
