"""Size and TFLite latency of SSDLite on a MnasNet backbone (random weights: latency needs none).

    python benchmarks/detection_latency.py --arch=mnasnet_a1 --resolution=320 --num_classes=90

Exports the detector as the detect job does (mnasnet_jax/detection/export.py: BN folded, boxes
and class scores out, NMS after the graph), checks the TFLite outputs against the JAX model's on
one random image, and times it with the profiler's litert backend, back to back after warm-up on
one thread (latency/profiler.py), then times NMS on those outputs. Counts are
detection/ssdlite.py's analytic ones. The last line printed is one JSON object.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mnasnet_jax import allocator
from mnasnet_jax import train
from mnasnet_jax.configs import detection as detection_config
from mnasnet_jax.detection import export
from mnasnet_jax.detection import job
from mnasnet_jax.detection import nms
from mnasnet_jax.detection import ssdlite
from mnasnet_jax.latency import export as latency_export
from mnasnet_jax.latency import profiler

_ARCH = flags.DEFINE_string('arch', 'mnasnet_a1', 'Named architecture or comma-separated blocks.')
_RESOLUTION = flags.DEFINE_integer('resolution', 320, 'Input resolution.')
_CLASSES = flags.DEFINE_integer('num_classes', 90, 'Classes (COCO ids: 90).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed invokes per interpreter.')
_INSTANCES = flags.DEFINE_integer('instances', 3, 'Fresh interpreters.')


def main(argv):
  del argv
  config = detection_config.get_config()
  config.arch = _ARCH.value
  res = _RESOLUTION.value
  definition = train.model_def(config, config.arch, _CLASSES.value)
  model = job.create_detector(
    config, definition, _CLASSES.value, depthwise='native', conv='native', bn_axis_name=None
  )
  variables = latency_export.random_variables(model, (1, res, res, 3))
  anchors = ssdlite.anchors(config, res)
  scales = tuple(config.ssd.box_scales)
  start = time.perf_counter()
  content = export.detector_tflite(model, variables, res, anchors, scales)
  export_seconds = time.perf_counter() - start
  image = np.random.default_rng(0).normal(size=(1, res, res, 3)).astype(np.float32)
  want = jax.jit(functools.partial(export.outputs, model, anchors=anchors, scales=scales))(
    variables, image
  )
  got = export.run_tflite(content, image)
  timing = profiler.LiteRTBackend(5, _REPEATS.value, 1, _INSTANCES.value).time(content, 'detector')
  start = time.perf_counter()
  nms.detect(got[0, :, :4], got[0, :, 4:])
  nms_ms = (time.perf_counter() - start) * 1e3
  size = ssdlite.summary(config.arch, res, _CLASSES.value)
  report = {
    'arch': config.arch,
    'resolution': res,
    'num_classes': _CLASSES.value,
    **size,
    'tflite_mb': len(content) / 1e6,
    'export_seconds': export_seconds,
    'max_abs_difference': float(np.max(np.abs(got - np.asarray(want)))),
    'latency_ms': timing,
    'nms_ms': nms_ms,
  }
  print(
    f'{config.arch} + SSDLite at {res} px, {_CLASSES.value} classes: {size["params"]:,} params, '
    f'{size["macs"] / 1e6:.1f}M mult-adds, {size["anchors"]} anchors; TFLite '
    f'{report["tflite_mb"]:.2f} MB within {report["max_abs_difference"]:.1e} of JAX, '
    f'{timing["median_ms"]:.1f} ms median (min {timing["min_ms"]:.1f}), NMS {nms_ms:.1f} ms'
  )
  print(json.dumps(report))


if __name__ == '__main__':
  allocator.use_tcmalloc()
  app.run(main)
