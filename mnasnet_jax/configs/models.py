"""Prints the named architectures' sizes: `python launch/main.py --config=configs/models.py`."""

import ml_collections

from mnasnet_jax import models
from mnasnet_jax.configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # takes no ARG: refuses one in a line
  config = ml_collections.ConfigDict()
  config.job = 'summary'
  config.architectures = tuple(models.ARCHITECTURES)  # every named model
  config.depth_multiplier = 1.0
  config.resolution = 224
  config.num_classes = 1000
  return config
