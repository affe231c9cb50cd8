"""Exports an architecture to TFLite:
`python launch/main.py --config=configs/export.py[:ARG] --workdir=DIR`.

ARG: `local` (32 px, 10 classes, as the local search and training), `resolution=N`.
`--config.arch` is a named architecture or comma-separated block strings; `--config.checkpoint`
the workdir of a `configs/train.py` run whose trained (EMA) weights to export, or a timm or
torchvision weights file (.safetensors, .pth; mnasnet_jax/pretrained.py); unset, the weights are
random (enough for latency). A checkpoint that names its model (a file's source model, a train
workdir's model.json) sets the architecture, depth multiplier, padding, BN epsilon and classes.
Writes DIR/model.tflite. `--config.precision=int8` also writes DIR/model_int8.tflite, quantized to
full integer on training images of `config.data`, and DIR/export_report.json: its top-1 against the
float JAX model's on held-out images and both files' latency.
"""

import ml_collections
from ml_collections import config_dict

from mnasnet_jax.configs import common
from mnasnet_jax.configs import train


def get_config(arg=None):
  arg = common.parse_local_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = 'export'
  config.arch = 'mnasnet_a1'
  config.resolution = common.image_size(arg)
  config.num_classes = 10 if arg.local else 1000
  config.depth_multiplier = 1.0
  config.padding = 'same'  # 'symmetric': PyTorch's (blocks.PADDINGS)
  config.bn_epsilon = 1e-3
  config.checkpoint = config_dict.placeholder(str)  # a train workdir or a weights file
  config.source_model = config_dict.placeholder(str)  # a file's timm/torchvision name; None: found
  config.use_ema = True  # export the moving average of the weights when the checkpoint has one
  config.filename = 'model.tflite'
  # Int8: full-integer post-training quantization (mnasnet_jax/latency/quantize.py).
  config.precision = 'float32'  # 'int8': the float file and its int8 twin
  config.io_dtype = 'int8'  # the int8 file's input and output: 'int8' or 'float32' (as the float's)
  config.int8_filename = 'model_int8.tflite'
  # The representative dataset (training images) and the held-out images (its evaluation split).
  config.data = train.data_config(
    'fashion_mnist' if arg.local else 'imagenet2012', config.resolution
  )
  config.calibration_images = 500
  config.seed = 0  # which training images calibrate
  config.eval_examples = 2000  # held-out images for top-1, the first of the evaluation split
  config.eval_batch_size = 500
  # Both files' latency: back to back after warm-up, as TFLite's benchmark_model, one thread.
  config.latency = ml_collections.ConfigDict()
  config.latency.instances = 3
  config.latency.warmup = 10
  config.latency.repeats = 50 if arg.local else 10
  config.latency.num_threads = 1
  return config
