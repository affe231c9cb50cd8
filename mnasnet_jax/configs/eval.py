"""Evaluates a checkpoint: `python launch/main.py --config=configs/eval.py[:ARG]
--config.checkpoint=PATH [--workdir=DIR]`.

PATH is the workdir of a `configs/train.py` run (its EMA weights when it keeps them) or a timm or
torchvision weights file (.safetensors, .pth), imported by mnasnet_jax/pretrained.py. Prints top-1
and top-5 (and writes DIR/eval.json) on ImageNet's validation set through TFDS (prepared as for
configs/train.py), or with ARG `local` on Fashion-MNIST's test set; `resolution=N` sets the image
size. A checkpoint that names its model (a file's source model, a workdir's model.json) sets the
architecture, depth multiplier, padding and BN epsilon; the keys below are for one that does not.
"""

import ml_collections
from ml_collections import config_dict

from mnasnet_jax.configs import train


def get_config(arg=None):
  recipe = train.get_config(arg)
  config = ml_collections.ConfigDict()
  config.job = 'eval'
  config.checkpoint = config_dict.placeholder(str)
  # A file's timm or torchvision name ('semnasnet_100', 'mnasnet1_0', ...); None: identified from
  # its tensors.
  config.source_model = config_dict.placeholder(str)
  config.use_ema = True  # a workdir's moving average of the weights, when it keeps one
  config.data = recipe.data  # its split 'full': the official validation set; 'search': holdout
  for key in (
    'arch',
    'depth_multiplier',
    'padding',
    'bn_epsilon',
    'depthwise',
    'conv',
    'dtype',
    'eval_batch_size',
  ):
    config[key] = recipe[key]
  config.eval_examples = config_dict.placeholder(int)  # None: the whole evaluation set
  return config
