"""The 'eval' job: top-1 and top-5 of a checkpoint (a train workdir, or timm's or torchvision's
weights imported by pretrained.py) on the evaluation split of `config.data` (ImageNet's validation
set through TFDS, or the local data), data-parallel over this host's devices (and every host's)."""

from __future__ import annotations

import functools
import json
import os

import flax
import jax

from mnasnet_jax import errors
from mnasnet_jax import input_pipeline
from mnasnet_jax import platform
from mnasnet_jax import train


def evaluate_checkpoint(config) -> dict:
  """{'accuracy' (top-1), 'top5', 'loss', 'examples'} of `config.checkpoint`; the model is the one
  the checkpoint names, else the config's (arch, depth_multiplier, padding, bn_epsilon)."""
  if not config.checkpoint:
    raise errors.UserError(
      'the eval job needs --config.checkpoint: a configs/train.py workdir or a timm or '
      'torchvision .safetensors or .pth file'
    )
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = platform.data_mesh()
  eval_batch = train.eval_batch_part(config.eval_batch_size, mesh, process_count)
  checkpoint = train.load_checkpoint(config.checkpoint, config.source_model, config.use_ema)
  data = input_pipeline.create(config.data, config.data.split, process_index, process_count)
  definition = checkpoint.model or train.model_def(config, config.arch, data.num_classes)
  if definition.num_classes != data.num_classes:
    raise errors.UserError(
      f'{config.checkpoint} classifies {definition.num_classes} classes, {data.name} has '
      f'{data.num_classes}: fine-tune it first (configs/train.py with --config.init_from)'
    )
  model = definition.create(depthwise=config.depthwise, conv=config.conv, dtype=config.dtype)
  variables = flax.traverse_util.unflatten_dict(
    train.initial_variables(
      model, data.image_size, checkpoint.variables, config.checkpoint, new_classifier=False
    )
  )
  state = train.TrainState(
    step=None,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=None,
    ema_params=None,
    ema_batch_stats=None,
    rng=None,
  )
  state = train.replicate(state, mesh)
  eval_fn = train.data_parallel(
    functools.partial(
      train.eval_step, model=model, use_ema=False, image_stats=(data.mean, data.std)
    ),
    mesh,
    3,
  )
  return train.evaluate(eval_fn, state, data, eval_batch, mesh, config.eval_examples)


def run(config, workdir):
  """Prints the result; with a workdir, also writes it to DIR/eval.json."""
  result = evaluate_checkpoint(config)
  line = (
    f'{config.checkpoint}: top-1 {100 * result["accuracy"]:.2f}%, top-5 '
    f'{100 * result["top5"]:.2f}% on {result["examples"]} images of {config.data.dataset}'
  )
  if jax.process_index():
    return
  print(line)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump({'checkpoint': config.checkpoint, **result}, f, indent=2)
