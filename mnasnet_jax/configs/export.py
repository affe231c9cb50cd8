"""Exports an architecture to TFLite:
`python launch/main.py --config=configs/export.py[:ARG] --workdir=DIR`.

ARG: `local` (32 px, 10 classes, as the local search and training), `resolution=N`.
`--config.arch` is a named architecture or comma-separated block strings; `--config.checkpoint`
the workdir of a `configs/train.py` run whose trained (EMA) weights to export, or a timm or
torchvision weights file (.safetensors, .pth; mnasnet_jax/pretrained.py); unset, the weights are
random (enough for latency). A checkpoint that names its model (a file's source model, a train
workdir's model.json) sets the architecture, depth multiplier, padding, BN epsilon and classes.
Writes DIR/model.tflite.
"""

import ml_collections
from ml_collections import config_dict

from mnasnet_jax.configs import common


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
  return config
