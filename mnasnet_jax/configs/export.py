"""Exports an architecture to TFLite:
`python launch/main.py --config=configs/export.py[:ARG] --workdir=DIR`.

ARG: `local` (32 px, 10 classes, as the local search and training), `resolution=N`.
`--config.arch` is a named architecture or comma-separated block strings; `--config.checkpoint_dir`
the workdir of a `configs/train.py` run whose trained (EMA) weights to export; unset, the weights
are random (enough for latency). Writes DIR/model.tflite.
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
  config.checkpoint_dir = config_dict.placeholder(str)
  config.use_ema = True  # export the moving average of the weights when the checkpoint has one
  config.filename = 'model.tflite'
  return config
