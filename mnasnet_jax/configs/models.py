"""Prints the named architectures' sizes: `python launch/main.py --config=configs/models.py`."""

import ml_collections

from mnasnet_jax.configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # takes no ARG: refuses one in a line
  config = ml_collections.ConfigDict()
  config.job = 'summary'
  config.architectures = (
    'mnasnet_a1',
    'mnasnet_b1',
    'mnasnet_small',
    'mnasnet_d1',
    'mnasnet_d1_320',
    'mobilenet_v2',
  )
  config.depth_multiplier = 1.0
  config.resolution = 224
  config.num_classes = 1000
  return config
