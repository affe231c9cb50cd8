"""Training parity: the recipe run by this project and by a PyTorch + timm reference, side by side.

    python benchmarks/train_parity.py --steps=1000 --seeds=0,1,2 [--side=both|jax|torch]
                                      [--recipe=train|proxy] [--results=FILE.jsonl]

`--recipe=train` is configs/train.py:local (MnasNet-A1 on Fashion-MNIST at 32 px, batch 128,
RMSProp-TF, warm-up then x0.97 every half epoch, label smoothing, L2, dropout, EMA), held-out top-1
(EMA weights, the 10,000 test images) every `--eval_every` steps. `--recipe=proxy` is the local
search's proxy (configs/search.py:local: 100 steps of 64 images, BN statistics re-estimated on 20
batches, top-1 on 2,000 held-out images) for each of `--archs`.

Both sides take the same batches: input_pipeline's uint8 images (zero-padded to 32, normalised by
the training mean and std) in its per-epoch permutations of (seed, epoch). The reference is written
from the official recipe (tensorflow/tpu models/official/mnasnet: mnasnet_main.py, mnasnet_utils.py)
on timm's pieces: timm's EfficientNet built from the same block strings (for MnasNet-A1 it is
`semnasnet_100`) with TF 'SAME' padding, BN momentum 0.99 and epsilon 1e-3, timm's RMSpropTF (epsilon
inside the square root, mean square from 1, learning rate inside the momentum), L2 on every weight
but BN's, the schedule in closed form, and TF's ExponentialMovingAverage (decay min(d, (1 + n) / (10
+ n)) after update n) over the weights and BN statistics. `--check` first imports the reference's
initial weights into this project's model and compares logits: the two are one function.

Each run (side, seed) is one JSON line in `--results`; runs already there for the same settings are
reused, so the slow reference can run in the background (`--side=torch`, one process per seed) and be
reported later with the project's side. The summary prints both curves (median and spread, max - min,
over seeds) and the wall time of each side; its last line is one JSON object.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mnasnet_jax import allocator
from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import input_pipeline
from mnasnet_jax import models
from mnasnet_jax import platform
from mnasnet_jax import pretrained
from mnasnet_jax import train
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config

_STEPS = flags.DEFINE_integer('steps', 1000, 'Training steps (recipe=train).')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 250, 'Steps between held-out evaluations.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (initialisation, dropout, data order).')
_SIDE = flags.DEFINE_enum('side', 'both', ['both', 'jax', 'torch'], 'Which side(s) to run.')
_RECIPE = flags.DEFINE_enum('recipe', 'train', ['train', 'proxy'], 'Full training or the proxy.')
_ARCHS = flags.DEFINE_list(
  'archs', ['mnasnet_a1'], 'Named architectures (recipe=proxy: each is proxy-trained).'
)
_RESULTS = flags.DEFINE_string('results', '', 'JSON-lines file of runs to reuse and append to.')
_THREADS = flags.DEFINE_integer('torch_threads', 0, 'PyTorch threads (0: its default).')
_CHECK = flags.DEFINE_bool('check', True, 'Check that both sides compute the same function.')
_LOCKSTEP = flags.DEFINE_integer(
  'lockstep', 0, 'Instead: N steps of both sides from the same weights, compared step by step.'
)
_VERBOSE = flags.DEFINE_integer('verbose', 0, 'Lockstep: print the N largest gaps of each step.')
_NATIVE = flags.DEFINE_bool('native', False, 'Lockstep: the native forms of every op.')
_OVERRIDES = flags.DEFINE_multi_string(
  'set', [], 'KEY=VALUE overrides of the recipe (both sides), e.g. --set=ema_decay=0.'
)


# --- the recipe and its data ----------------------------------------------------------------------


def recipe(name: str, arch: str):
  """(config of the recipe's keys, data config) of `name`, with --set overrides."""
  if name == 'train':
    config = train_config.get_config('local')
    data = config.data
    config.num_steps = _STEPS.value
  else:
    data, config = search_config.data_and_proxy_config('local')
  config.arch = arch
  for item in _OVERRIDES.value:
    key, _, value = item.partition('=')
    kind = type(config[key]) if config[key] is not None else (int if value.isdigit() else float)
    config[key] = kind(value)
  return config, data


def steps_per_epoch(config, data) -> float:
  return data.num_train / config.batch_size


def eval_points(config, total: int) -> list[int]:
  if _RECIPE.value == 'proxy':
    return [total]
  return sorted({*range(_EVAL_EVERY.value, total + 1, _EVAL_EVERY.value), total})


# --- this project's side ------------------------------------------------------------------------


def run_jax(config, data, seed: int) -> dict:
  """The project's loop: train.py's model, optimizer, state and data-parallel steps."""
  if _RECIPE.value == 'proxy':
    start = time.perf_counter()
    result = train.proxy_train(config, config.arch, data, seed)
    return {
      'curve': {str(result['steps']): result['accuracy']},
      'train_seconds': result['train_seconds'],
      'total_seconds': time.perf_counter() - start,
    }
  mesh = platform.data_mesh()
  per_epoch = steps_per_epoch(config, data)
  total = train.num_steps(config, per_epoch)
  model = train.create_model(config, config.arch, data.num_classes)
  tx, schedule = train.create_optimizer(config, per_epoch)
  state = train.create_state(model, tx, data.image_size, bool(config.ema_decay), seed, mesh)
  image_stats = (data.mean, data.std)
  train_fn = train.train_program(config, model, tx, schedule, mesh, image_stats=image_stats)
  eval_fn = train.eval_program(config, model, mesh, image_stats)
  batches = data.train_batches(config.batch_size, seed)
  curve, train_seconds, start = {}, 0.0, time.perf_counter()
  points = set(eval_points(config, total))
  mark = time.perf_counter()
  for step in range(1, total + 1):
    state, metrics = train_fn(state, *train.shard_batch(mesh, *next(batches)))
    if step == 1:  # its compilation is not training time (the reference's first step is kept)
      jax.block_until_ready(state)
      first_step_seconds, mark = time.perf_counter() - mark, time.perf_counter()
    if step in points:
      loss = float(metrics['loss'])
      train_seconds += time.perf_counter() - mark
      result = train.evaluate(eval_fn, state, data, config.eval_batch_size, mesh)
      curve[str(step)] = result['accuracy']
      print(f'jax seed {seed} step {step}: loss {loss:.4f} held-out top-1 {result["accuracy"]:.4f}')
      mark = time.perf_counter()
  return {
    'curve': curve,
    'train_seconds': train_seconds,
    'first_step_seconds': first_step_seconds,
    'total_seconds': time.perf_counter() - start,
  }


# --- the reference: PyTorch and timm ----------------------------------------------------------------


def timm_arch_def(model: models.MnasNet, resolution: int) -> list[list[str]]:
  """timm's block strings (one stage per block) of `model`'s blocks. timm adds an identity skip
  wherever stride is 1 and the tensor's width is the output's; the official rule reads the block
  string's `i`, so a block whose layers lack a skip that timm's rule would add is `noskip`."""
  specs = iter(model.layer_specs(resolution))
  stages = []
  for block in blocks_lib.as_block_args(model.blocks):
    layers = [next(specs) for _ in range(block.repeats)]
    if block.op != 'mbconv' or block.skip == 'pool':
      raise ValueError(f'the reference builds inverted bottlenecks only, not {block}')
    timm_adds = [s for s in layers if s.stride == 1 and s.in_filters == s.out_filters]
    noskip = any(not s.residual for s in timm_adds)
    if noskip and any(s.residual for s in timm_adds):
      raise ValueError(f'timm cannot skip some layers of {block} and not others')
    kind = 'ds' if block.expand == 1 else 'ir'
    parts = [kind, f'r{block.repeats}', f'k{block.kernel}', f's{block.stride}']
    parts += [f'e{block.expand}', f'c{block.out_filters}']
    parts += [f'se{block.se_ratio:g}'] if block.se_ratio else []
    parts += ['noskip'] if noskip or block.skip == 'none' else []
    stages.append(['_'.join(parts)])
  return stages


def reference_model(config, num_classes: int, resolution: int):
  """timm's EfficientNet of `config.arch`: TF 'SAME' padding, BN 0.99 / 1e-3, timm's TF init."""
  from timm.models import efficientnet
  import torch

  definition = train.model_def(config, config.arch, num_classes)
  model = definition.create(depthwise='native', conv='native', dtype='float32')
  norm = functools.partial(
    torch.nn.BatchNorm2d, eps=config.bn_epsilon, momentum=1 - config.bn_momentum
  )
  dropout = model.dropout_rate if config.dropout_rate is None else config.dropout_rate
  reference = efficientnet.EfficientNet(
    block_args=efficientnet.decode_arch_def(timm_arch_def(model, resolution)),
    num_classes=num_classes,
    stem_size=model.stem_filters,
    fix_stem=True,
    pad_type='same' if config.padding == 'same' else '',
    norm_layer=norm,
    drop_rate=dropout,
  )
  if config.classifier_init_range is not None:  # timm's is the official 1/sqrt(classes)
    torch.nn.init.uniform_(
      reference.classifier.weight, -config.classifier_init_range, config.classifier_init_range
    )
  return reference


def flax_variables(torch_model, model: models.MnasNet, resolution: int) -> dict:
  """The reference's weights and BN statistics as `model`'s variables (timm's layout)."""
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  variables = {'params': {}, 'batch_stats': {}}
  for key, collection, path in pretrained.timm_entries(model, resolution):
    node = variables[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = pretrained.to_flax(state[key])
  return variables


def check_same_function(config, data, torch_model) -> float:
  """Largest |logit difference| / largest |logit| of the reference's initial weights run by both."""
  import torch

  definition = train.model_def(config, config.arch, data.num_classes)
  model = definition.create(depthwise='native', conv='native', dtype='float32')
  images, _ = next(data.train_batches(8, 0))
  x = (images.astype(np.float32) - np.float32(data.mean[0])) / np.float32(data.std[0])
  variables = flax_variables(torch_model, model, data.image_size)
  ours = np.asarray(model.apply(variables, x, train=False))
  torch_model.eval()
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def official_learning_rate(config, per_epoch: float, step: int) -> float:
  """mnasnet_utils.build_learning_rate at global step `step`, in closed form."""
  peak = config.base_learning_rate * config.batch_size / 256
  warmup = int(config.warmup_epochs * per_epoch)
  if step < warmup:
    return peak * step / warmup
  return peak * config.lr_decay_rate ** (step // (config.lr_decay_epochs * per_epoch))


class Reference:
  """The recipe in PyTorch: timm's model and RMSpropTF, TF's schedule and moving average."""

  def __init__(self, config, data, seed: int):
    from timm.optim import RMSpropTF
    import torch

    torch.manual_seed(seed)
    self.config, self.data = config, data
    self.per_epoch = steps_per_epoch(config, data)
    self.model = reference_model(config, data.num_classes, data.image_size)
    bn_params = {
      id(p)
      for m in self.model.modules()
      if isinstance(m, torch.nn.BatchNorm2d)
      for p in m.parameters()
    }
    params = list(self.model.parameters())
    groups = [
      {'params': [p for p in params if id(p) not in bn_params]},
      {'params': [p for p in params if id(p) in bn_params], 'weight_decay': 0.0},
    ]
    self.optimizer = RMSpropTF(
      groups,
      lr=0.0,
      alpha=config.rmsprop_decay,
      eps=config.rmsprop_epsilon,
      weight_decay=config.weight_decay,
      momentum=config.momentum,
      lr_in_momentum=True,
    )
    self.ema = copy.deepcopy(self.model).eval() if config.ema_decay else None

  def as_torch(self, images):
    import torch

    mean, std = np.float32(self.data.mean[0]), np.float32(self.data.std[0])
    x = (images.astype(np.float32) - mean) / std
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  def step(self, images, labels, step: int) -> float:
    """Update `step` (0 for the first): its loss."""
    import torch

    for group in self.optimizer.param_groups:
      group['lr'] = official_learning_rate(self.config, self.per_epoch, step)
    self.model.train()
    loss = torch.nn.functional.cross_entropy(
      self.model(self.as_torch(images)),
      torch.from_numpy(labels).long(),
      label_smoothing=self.config.label_smoothing,
    )
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    if self.ema is not None:
      decay = min(self.config.ema_decay, (1 + step + 1) / (10 + step + 1))
      with torch.no_grad():
        pairs = zip(self.ema.state_dict().values(), self.model.state_dict().values())
        for averaged, current in pairs:
          if averaged.is_floating_point():
            averaged.mul_(decay).add_(current, alpha=1 - decay)
          else:
            averaged.copy_(current)
    return loss.item()

  def evaluate(self, batches) -> float:
    """Held-out top-1 of the EMA model (else the model, its BN statistics re-estimated on
    `config.bn_recalibration_batches` of `batches` when set)."""
    import torch

    model = self.ema if self.ema is not None else self.model
    if self.config.get('bn_recalibration_batches'):
      recalibrate(model, batches, self.config.bn_recalibration_batches, self.as_torch)
    model.eval()
    hits = count = 0
    config = self.config
    with torch.no_grad():
      for images, labels, mask in self.data.eval_batches(
        config.eval_batch_size, config.eval_examples
      ):
        predicted = model(self.as_torch(images)).argmax(-1).numpy()
        hits += float(np.sum((predicted == labels) * mask))
        count += float(np.sum(mask))
    return hits / count


def run_torch(config, data, seed: int) -> dict:
  import torch

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  reference = Reference(config, data, seed)
  check = check_same_function(config, data, reference.model) if _CHECK.value else None
  if check is not None:
    print(f'reference vs project, same weights: logits differ by {check:.2e} of the largest')
  total = train.num_steps(config, reference.per_epoch)
  points = set(eval_points(config, total))
  batches = data.train_batches(config.batch_size, seed)
  curve, train_seconds, start = {}, 0.0, time.perf_counter()
  mark = time.perf_counter()
  for step in range(total):
    loss = reference.step(*next(batches), step)
    if step + 1 in points:
      train_seconds += time.perf_counter() - mark
      curve[str(step + 1)] = accuracy = reference.evaluate(batches)
      print(f'torch seed {seed} step {step + 1}: loss {loss:.4f} held-out top-1 {accuracy:.4f}')
      mark = time.perf_counter()
  return {
    'curve': curve,
    'train_seconds': train_seconds,
    'total_seconds': time.perf_counter() - start,
    'check': check,
  }


def lockstep(config, data, steps: int, native: bool = False) -> list[dict]:
  """Both sides from the reference's initial weights on the same batches, without dropout: per
  step both cross-entropies and each kernel's, BN scale's and BN variance's relative gap
  |ours - theirs| / |theirs| (norms of the tensor; the means and offsets that a BN after them
  cancels get gradients of rounding noise alone, whose relative gaps mean nothing), EMA included.
  `native`: the native forms of every op instead of the CPU ones."""
  import flax

  config.dropout_rate = 0.0
  reference = Reference(config, data, 0)
  mesh = platform.data_mesh()
  if native:
    config.depthwise = config.conv = 'native'
  model = train.create_model(config, config.arch, data.num_classes)
  model = model.clone(batch_norm='autodiff') if native else model
  tx, schedule = train.create_optimizer(config, reference.per_epoch)
  initial = flax.traverse_util.flatten_dict(flax_variables(reference.model, model, data.image_size))
  state = train.create_state(model, tx, data.image_size, bool(config.ema_decay), 0, mesh, initial)
  train_fn = train.train_program(
    config, model, tx, schedule, mesh, image_stats=(data.mean, data.std)
  )
  batches = data.train_batches(config.batch_size, 0)
  history = []
  for step in range(steps):
    images, labels = next(batches)
    state, metrics = train_fn(state, *train.shard_batch(mesh, images, labels))
    torch_loss = reference.step(images, labels, step)
    ours = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
    theirs = flax_variables(reference.model, model, data.image_size)
    if state.ema_params is not None:
      ours['ema'] = jax.device_get(state.ema_params)
      theirs['ema'] = flax_variables(reference.ema, model, data.image_size)['params']
    gaps = jax.tree.map(
      lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)), ours, theirs
    )
    gaps = {
      '/'.join(path): gap
      for path, gap in flax.traverse_util.flatten_dict(gaps).items()
      if path[-1] in ('kernel', 'scale', 'var')
    }
    history.append({'jax': float(metrics['cross_entropy']), 'torch': torch_loss, 'gaps': gaps})
  return history


def recalibrate(model, batches, count: int, as_torch):
  """BN statistics as the mean of `count` training batches' own (train.recalibrate_batch_stats)."""
  import torch

  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in norms:
    m.reset_running_stats()
    m.momentum = None  # a cumulative average: the mean over the batches
  model.train()
  with torch.no_grad():
    for _ in range(count):
      model(as_torch(next(batches)[0]))


# --- runs, reuse and the summary --------------------------------------------------------------------


def settings(config, side: str, seed: int) -> dict:
  """What makes two runs the same run: recipe, side, seed, model, steps and overrides (the full
  config is recorded beside them)."""
  return {
    'recipe': _RECIPE.value,
    'side': side,
    'seed': seed,
    'arch': config.arch,
    'steps': _STEPS.value if _RECIPE.value == 'train' else config.num_steps,
    'eval_every': _EVAL_EVERY.value,
    'overrides': sorted(_OVERRIDES.value),
  }


def load_runs(path: str) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def spread(values):
  return {
    'median': statistics.median(values),
    'spread': max(values) - min(values),
    'values': values,
  }


def main(argv):
  del argv
  allocator.use_tcmalloc()
  summary = {}
  for arch in _ARCHS.value:
    config, data_config = recipe(_RECIPE.value, arch)
    split = 'search' if _RECIPE.value == 'proxy' else 'full'
    data = input_pipeline.create(data_config, split)
    if _LOCKSTEP.value:
      print(f'lockstep, forms {"native" if _NATIVE.value else "of this backend"}:')
      for step, record in enumerate(lockstep(config, data, _LOCKSTEP.value, _NATIVE.value), 1):
        worst = sorted(record['gaps'].items(), key=lambda kv: -kv[1])[: max(1, _VERBOSE.value)]
        print(
          f'step {step}: cross-entropy jax {record["jax"]:.5f} torch {record["torch"]:.5f}; '
          f'largest gaps {", ".join(f"{p} {g:.2e}" for p, g in worst)}'
        )
      continue
    runs = load_runs(_RESULTS.value)
    sides = ('jax', 'torch') if _SIDE.value == 'both' else (_SIDE.value,)
    by_side = {}
    for side in sides:
      for seed in map(int, _SEEDS.value):
        key = settings(config, side, seed)
        done = next((r for r in runs if {k: r[k] for k in key} == key), None)
        if done is None:
          fn = run_jax if side == 'jax' else run_torch
          done = {**key, **fn(config, data, seed), 'config': config.to_dict()}
          if _RESULTS.value:
            with open(_RESULTS.value, 'a') as f:
              f.write(json.dumps(done) + '\n')
        by_side.setdefault(side, []).append(done)
    summary[arch] = report(arch, by_side)
  print(json.dumps(summary))


def report(arch: str, by_side: dict) -> dict:
  out = {}
  for side, runs in by_side.items():
    steps = sorted({int(s) for r in runs for s in r['curve']})
    curve = {s: spread([r['curve'][str(s)] for r in runs if str(s) in r['curve']]) for s in steps}
    seconds = [r['train_seconds'] for r in runs]
    out[side] = {
      'seeds': [r['seed'] for r in runs],
      'curve': {str(s): c for s, c in curve.items()},
      'train_seconds': seconds,
    }
    print(f'{arch} {side} (seeds {out[side]["seeds"]}), median [min, max] held-out top-1:')
    for s, c in curve.items():
      print(
        f'  step {s:>5}: {100 * c["median"]:.2f}% [{100 * min(c["values"]):.2f}, '
        f'{100 * max(c["values"]):.2f}] spread {100 * c["spread"]:.2f}'
      )
    print(f'  training seconds per run: {", ".join(f"{t:.0f}" for t in seconds)}')
  if {'jax', 'torch'} <= out.keys():
    out['parity'] = parity(out['jax']['curve'], out['torch']['curve'])
    print(f'{arch} parity: {json.dumps(out["parity"])}')
  return out


def parity(ours: dict, reference: dict) -> dict:
  """The goal of the comparison: at every step both measured, this project's median within the
  reference's seed spread of the reference's median; at the last, this median at least the
  reference's."""
  steps = sorted(set(ours) & set(reference), key=int)
  gaps = {s: ours[s]['median'] - reference[s]['median'] for s in steps}
  within = all(abs(gaps[s]) <= reference[s]['spread'] for s in steps)
  return {
    'median_gap': {s: round(g, 4) for s, g in gaps.items()},
    'within_reference_spread': within,
    'final_at_least_reference': bool(steps) and gaps[steps[-1]] >= 0,
  }


if __name__ == '__main__':
  app.run(main)
