"""The detector to TFLite, through latency/export.py's path (BN folded, native convs, jax.export,
litert-converter): one float32 input, the normalised image [1, S, S, 3], and one output
[1, N, 4 + C], each anchor's decoded box (ymin, xmin, ymax, xmax, normalised) then its C class
scores (sigmoids, background dropped). Non-maximum suppression runs after the graph (nms.detect),
as LiteRT's builtin ops have no batched multi-class NMS."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax.detection import boxes as boxes_lib
from mnasnet_jax.detection import ssdlite
from mnasnet_jax.latency import export as latency_export


def outputs(model, variables, images, anchors, scales):
  """[B, N, 4 + C]: decoded boxes and class scores, the exported graph's output."""
  codes, logits = model.apply(variables, images, train=False)
  decoded = boxes_lib.decode(codes, jnp.asarray(anchors), scales)
  return jnp.concatenate([decoded, jax.nn.sigmoid(logits[..., 1:])], axis=-1)


def inference_detector(model: ssdlite.SSDLite) -> ssdlite.SSDLite:
  """`model` as a phone runs it: its backbone's (and so its own layers') native, BN-folded forms."""
  return model.clone(backbone=latency_export.inference_model(model.backbone))


def detector_tflite(model: ssdlite.SSDLite, variables, resolution: int, anchors, scales) -> bytes:
  folded = latency_export.fold_batchnorm(variables, model.backbone.bn_epsilon)
  fn = functools.partial(outputs, inference_detector(model), folded, anchors=anchors, scales=scales)
  return latency_export.to_tflite(fn, (1, resolution, resolution, 3))


def run_tflite(content: bytes, images: np.ndarray) -> np.ndarray:
  """The TFLite model's output on each of `images` (normalised float32 [B, S, S, 3])."""
  from ai_edge_litert.interpreter import Interpreter

  interpreter = Interpreter(model_content=content, num_threads=1)
  interpreter.allocate_tensors()
  (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
  results = []
  for image in images:
    interpreter.set_tensor(given['index'], image[None].astype(np.float32))
    interpreter.invoke()
    results.append(interpreter.get_tensor(taken['index'])[0])
  return np.stack(results)
