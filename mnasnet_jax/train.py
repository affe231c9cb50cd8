"""Data-parallel training with the official MnasNet recipe, and the proxy training of the search.

The train and eval steps are written per device, with named-axis collectives over
`platform.BATCH_AXIS` (gradients and metrics averaged with `lax.pmean`; BatchNorm shares its
statistics over its groups of images itself through the model's `bn_axis_name`, bn_groups.py), as a
pmapped step is written, and run as `jax.jit(jax.shard_map(step))` over a one-axis mesh of the
devices. A device whose part of the batch does not fit its memory runs it as micro-batches with
the same result (`fit_train_step`, memory.py). The recipe (paper section 6, the official
mnasnet_main.py): TF-style RMSProp, the warmup + staircase schedule, L2 on every variable but BN's,
label smoothing, dropout, and an exponential moving average of the weights and BN statistics used
for evaluation.

Two entry points: `proxy_train` (train one child on the search's proxy split and return its
held-out accuracy) and `train_and_evaluate` (the 'train' job: checkpointed, resumable, reported).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from mnasnet_jax import bn_groups
from mnasnet_jax import errors
from mnasnet_jax import input_pipeline
from mnasnet_jax import memory
from mnasnet_jax import models
from mnasnet_jax import platform
from mnasnet_jax import pretrained
from mnasnet_jax.memory import DoesNotFit  # noqa: F401  (the search records it as 'oom')
from mnasnet_jax.optim import learning_rate_schedule  # noqa: F401  (the recipe's API)
from mnasnet_jax.optim import rmsprop_tf  # noqa: F401  (the recipe's API)

AXIS = platform.BATCH_AXIS
# XLA:CPU compiles threefry's many rounds slowly (a child's init took 1.6x as long); 'rbg' keys
# are fast to compile everywhere. Keys are stored as raw uint32 data so Orbax saves them plainly.
RNG_IMPL = 'rbg'


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None when the config's ema_decay is 0
  ema_batch_stats: Any
  rng: jax.Array


# --- the recipe -------------------------------------------------------------------------------------


def num_steps(config, steps_per_epoch: float) -> int:
  """`config.num_steps` when set (> 0), else `config.num_epochs` epochs of the float
  `steps_per_epoch`, truncated as mnasnet_main.py's int(num_epochs * steps_per_epoch) (350 epochs
  at batch 4096: 109,474 steps); loops only count steps."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(1, int(config.num_epochs * steps_per_epoch))


def model_def(config, arch, num_classes: int) -> pretrained.ModelDef:
  """The function the config's keys describe: `arch` at `config.depth_multiplier`, padded as
  `config.padding`, with BN epsilon `config.bn_epsilon`."""
  return pretrained.ModelDef(
    models.architecture(arch),
    config.depth_multiplier,
    config.padding,
    config.bn_epsilon,
    num_classes,
  )


def create_model(
  config, arch, num_classes: int, definition: pretrained.ModelDef | None = None
) -> models.MnasNet:
  """The model (`definition`, else the config's `model_def`) with BN statistics over groups of
  `config.bn_group_size` images of the global batch (bn_groups.py), running averages at
  `config.bn_momentum` (a short proxy run re-estimates them after training instead:
  `recalibrate_batch_stats`), and the architecture's own dropout unless `config.dropout_rate` sets
  one."""
  definition = definition or model_def(config, arch, num_classes)
  return definition.create(
    dropout_rate=config.dropout_rate,
    depthwise=config.depthwise,
    conv=config.conv,
    dtype=config.dtype,
    bn_axis_name=AXIS,
    bn_momentum=config.bn_momentum,
    bn_group_size=config.bn_group_size,
    classifier_init_range=config.classifier_init_range,
  )


def create_optimizer(config, steps_per_epoch: float):
  """(RMSProp-TF transformation, its learning-rate schedule) for `config.batch_size` images a step."""
  schedule = learning_rate_schedule(
    config.base_learning_rate,
    config.batch_size,
    steps_per_epoch,
    config.warmup_epochs,
    config.lr_decay_rate,
    config.lr_decay_epochs,
  )
  tx = rmsprop_tf(schedule, config.rmsprop_decay, config.momentum, config.rmsprop_epsilon)
  return tx, schedule


def create_state(
  model, tx, image_size: int, ema: bool, seed: int, mesh=None, initial=None
) -> TrainState:
  """Initial state, computed where it lives: replicated on `mesh` (else on the default device) by
  one jitted program, which every process runs alike, so no host copy is placed and none is checked
  across hosts. `initial` ({variable path: array}, from `initial_variables`) replaces the fresh
  values of the variables it names. The seed enters as data, so one program (and one entry of
  the compilation cache) serves every seed, with the values a constant seed gives."""

  def init(initial, seed):
    init_key, rng = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
    variables = model.init(init_key, jnp.zeros((1, image_size, image_size, 3)))
    variables = flax.traverse_util.unflatten_dict(
      {**flax.traverse_util.flatten_dict(variables), **initial}
    )
    params, batch_stats = variables['params'], variables['batch_stats']
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      # Copies: the train step donates the state, and no buffer may be given twice.
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else None,
      rng=jax.random.key_data(rng),
    )

  return jax.jit(init, out_shardings=None if mesh is None else NamedSharding(mesh, P()))(
    initial or {}, seed
  )


def initial_variables(model, image_size: int, loaded, where: str, new_classifier: bool = True):
  """{path: array} of `loaded` variables that `model` starts from: all of them, but (when
  `new_classifier`) a classifier for another number of classes, which starts afresh (fine-tuning
  on another task). Any other difference is a UserError naming the variable and both shapes."""
  shapes = flax.traverse_util.flatten_dict(
    models.variable_shapes(model, (1, image_size, image_size, 3))
  )
  flat = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(loaded)))
  taken = {}
  for path, shape in shapes.items():
    value = flat.get(path)
    if value is not None and value.shape == shape.shape:
      taken[path] = value
    elif new_classifier and path[:2] == ('params', 'classifier') and value is not None:
      logging.info(
        '%s: a new classifier %s (the checkpoint has %s)', where, shape.shape, value.shape
      )
    elif value is None:
      raise errors.UserError(
        f'{where} has no variable {"/".join(path)} (expected shape {shape.shape} for the model)'
      )
    else:
      raise errors.UserError(
        f'{where}: variable {"/".join(path)} has shape {value.shape}, expected {shape.shape} '
        'for the model'
      )
  extra = sorted(set(flat) - set(shapes))
  if extra:
    raise errors.UserError(
      f'{where}: variable {"/".join(extra[0])} of shape {flat[extra[0]].shape} has no place in '
      'the model'
    )
  return taken


def weight_penalty(params, batch_stats):
  """sum(w**2) / 2 (TF's l2_loss) over every parameter but BatchNorm's scale and offset; a module
  is a BatchNorm exactly when it keeps batch statistics."""
  bn_modules = {path[:-1] for path in flax.traverse_util.flatten_dict(batch_stats)}
  return sum(
    0.5 * jnp.sum(jnp.square(w))
    for path, w in flax.traverse_util.flatten_dict(params).items()
    if path[:-1] not in bn_modules
  )


def cross_entropy(logits, labels, smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(decay: float, step):
  """TF's ExponentialMovingAverage with num_updates: min(decay, (1 + n) / (10 + n))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1 + step) / (10 + step))


# --- per-device steps -----------------------------------------------------------------------------


def normalise(images, image_stats):
  """uint8 images as the model sees them, (x - mean) / std per channel in float32, computed on the
  device: batches cross from the host as uint8, a quarter of float32's bytes. `image_stats` is the
  data's (mean, std); None takes `images` as already normalised floats."""
  if image_stats is None:
    return images
  mean, std = (jnp.asarray(x, jnp.float32) for x in image_stats)
  return (images.astype(jnp.float32) - mean) / std


def accumulate(fn, images, labels, key, micro_batch: int | None):
  """The mean of `fn(images, labels, key)` over micro-batches of `micro_batch` images (None: the
  whole batch), one after another in a scan so the compiled step holds one micro-batch's
  activations; micro-batch i draws its randomness from fold_in(key, i)."""
  batch = images.shape[0]
  if micro_batch is None or micro_batch == batch:
    return fn(images, labels, key)
  if micro_batch < 1 or batch % micro_batch:
    raise ValueError(
      f'micro-batch {micro_batch}: expected a divisor of the {batch} images on each device'
    )
  count = batch // micro_batch
  split = lambda x: x.reshape((count, micro_batch) + x.shape[1:])

  def add(total, inputs):
    i, images, labels = inputs
    return jax.tree.map(jnp.add, total, fn(images, labels, jax.random.fold_in(key, i))), None

  shapes = jax.eval_shape(fn, split(images)[0], split(labels)[0], key)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = lax.scan(add, zeros, (jnp.arange(count), split(images), split(labels)))
  return jax.tree.map(lambda x: x / count, total)


def train_step(
  state: TrainState,
  images,
  labels,
  *,
  model,
  tx,
  schedule,
  config,
  micro_batch: int | None = None,
  image_stats=None,
):
  """One step on this device's part of the batch; collectives make it the global batch's step.

  With `micro_batch` (memory.fit's choice) the device's images run that many at a time, all on the
  same weights: their gradients, losses and BN running-average updates (linear in the batch
  statistics) are averaged, so the step is the one on the whole batch wherever BN's groups lie
  within micro-batches. Each micro-batch draws its own dropout mask.
  """
  key = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
  dropout_key = jax.random.fold_in(jax.random.fold_in(key, state.step), lax.axis_index(AXIS))

  def gradients(images, labels, dropout_key):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        normalise(images, image_stats),
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': dropout_key},
      )
      ce = jnp.mean(cross_entropy(logits, labels, config.label_smoothing))
      loss = ce + config.weight_decay * weight_penalty(params, state.batch_stats)
      return loss, (updates['batch_stats'], ce, jnp.mean(jnp.argmax(logits, -1) == labels))

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return (loss, *aux), grads

  ((loss, batch_stats, ce, accuracy), grads) = accumulate(
    gradients, images, labels, dropout_key, micro_batch
  )
  metrics = lax.pmean({'loss': loss, 'cross_entropy': ce, 'accuracy': accuracy}, AXIS)
  metrics['learning_rate'] = schedule(state.step)
  return apply_gradients(state, lax.pmean(grads, AXIS), batch_stats, tx=tx, config=config), metrics


def apply_gradients(state: TrainState, grads, batch_stats, *, tx, config) -> TrainState:
  """The optimizer's update with the global batch's gradients, then the EMA of weights and BN
  statistics: the end of every job's training step (classification, detection)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if config.ema_decay:
    decay = ema_decay_at(config.ema_decay, step)
    average = lambda old, new: decay * old + (1 - decay) * new
    ema_params = jax.tree.map(average, ema_params, params)
    ema_batch_stats = jax.tree.map(average, ema_batch_stats, batch_stats)
  return state.replace(
    step=step,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    ema_params=ema_params,
    ema_batch_stats=ema_batch_stats,
  )


def batch_stats_step(variables, images, *, model, image_stats=None):
  """The BatchNorm statistics of one global batch under `variables` = (params, batch_stats): `model`
  has BN momentum 0, so the 'running' statistics it returns are the batch's own (averaged over
  devices by BN's axis)."""
  params, batch_stats = variables
  _, updates = model.apply(
    {'params': params, 'batch_stats': batch_stats},
    normalise(images, image_stats),
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': jax.random.key(0)},
  )
  return updates['batch_stats']


def batch_stats_program(model, mesh, image_stats=None):
  """The data-parallel batch_stats_step of `model` (whose BN momentum must be 0), as
  recalibrate_batch_stats takes it."""
  return data_parallel(
    functools.partial(batch_stats_step, model=model, image_stats=image_stats), mesh, 1
  )


def eval_step(state: TrainState, images, labels, mask, *, model, use_ema: bool, image_stats=None):
  """Sums over the global batch (padding masked out): top-1 and top-5 hits, loss, count."""
  variables = (
    {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
    if use_ema
    else {'params': state.params, 'batch_stats': state.batch_stats}
  )
  logits = model.apply(variables, normalise(images, image_stats), train=False)
  top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
  sums = {
    'top1': jnp.sum((top5[:, 0] == labels) * mask),
    'top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
    'loss': jnp.sum(cross_entropy(logits, labels, 0.0) * mask),
    'count': jnp.sum(mask),
  }
  return lax.psum(sums, AXIS)


def data_parallel(step_fn, mesh, num_batch_args: int, donate_state: bool = False):
  """jit(shard_map(step_fn)): the state replicated, the batch arguments split over the mesh.

  check_vma is off because the step is written as for pmap: its gradients are this device's, and
  its explicit pmean makes them global (with the check on, JAX would sum them itself)."""
  sharded = jax.shard_map(
    step_fn,
    mesh=mesh,
    in_specs=(P(),) + (P(AXIS),) * num_batch_args,
    out_specs=P(),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=(0,) if donate_state else ())


def replicate(tree, mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(mesh, *arrays):
  """This process's rows of the global batch, laid out over the mesh's devices."""
  sharding = NamedSharding(mesh, P(AXIS))
  return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def check_batch(batch_size: int, mesh, process_count: int) -> int:
  """This process's part of a global `batch_size`; it must split evenly over the devices."""
  if batch_size % mesh.size:
    raise errors.UserError(
      f'batch size {batch_size}: expected a multiple of the {mesh.size} devices'
    )
  return batch_size // process_count


def eval_batch_part(batch_size: int, mesh, process_count: int) -> int:
  """This process's part of the global eval batch: `batch_size` rounded up to a multiple of the
  devices. Evaluation pads its last batch and masks the padding out, so a few more padded rows
  change no result, and no eval batch a user picks has to divide the device count (500 on 8)."""
  if batch_size < 1:
    raise errors.UserError(f'eval batch size {batch_size}: expected a positive number of images')
  return -(-batch_size // mesh.size) * mesh.size // process_count


def recalibrate_batch_stats(
  stats_fn, state: TrainState, batches, num_batches: int, mesh, use_ema: bool
) -> TrainState:
  """The evaluated weights' BN statistics re-estimated as the mean over `num_batches` training
  batches. A short proxy run ends with weights still moving fast, which its running averages lag
  behind (seen: a child at 47% held-out top-1 with batch statistics scored 12% with its running
  ones); recalibrating, as one-shot NAS does, measures the trained weights as they are."""
  variables = (
    (state.ema_params, state.ema_batch_stats) if use_ema else (state.params, state.batch_stats)
  )
  total = None
  for _ in range(num_batches):
    (images,) = shard_batch(mesh, next(batches)[0])
    batch = stats_fn(variables, images)
    total = batch if total is None else jax.tree.map(jnp.add, total, batch)
  mean = jax.tree.map(lambda x: x / num_batches, total)
  return state.replace(**{'ema_batch_stats' if use_ema else 'batch_stats': mean})


def evaluate(eval_fn, state, data, batch_size: int, mesh, limit=None) -> dict[str, float]:
  totals = None
  for batch in data.eval_batches(batch_size, limit):
    sums = eval_fn(state, *shard_batch(mesh, *batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {
    'accuracy': float(totals['top1']) / count,
    'top5': float(totals['top5']) / count,
    'loss': float(totals['loss']) / count,
    'examples': int(totals['count']),
  }


def train_program(
  config, model, tx, schedule, mesh, micro_batch=None, image_stats=None, step=None, batch_args=2
):
  """The data-parallel `step` (train_step, or one taking its keywords with more batch arguments
  before the images, as the one-shot search's: `batch_args` in all), the state donated."""
  return data_parallel(
    functools.partial(
      step or train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      config=config,
      micro_batch=micro_batch,
      image_stats=image_stats,
    ),
    mesh,
    batch_args,
    donate_state=True,
  )


def eval_program(config, model, mesh, image_stats=None):
  """The data-parallel eval_step (on the EMA weights when `config` keeps them)."""
  return data_parallel(
    functools.partial(
      eval_step, model=model, use_ema=bool(config.ema_decay), image_stats=image_stats
    ),
    mesh,
    3,
  )


def abstract_state(make_state, mesh):
  """The shapes of `make_state()`'s state, replicated on `mesh`: what programs are lowered for
  before any state exists."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
    jax.eval_shape(make_state),
  )


def batch_shapes(mesh, batch: int, image_size: int, masked: bool = False):
  """The shapes of a global batch as the steps take it, split over `mesh`: uint8 images, int32
  labels and, when `masked`, evaluation's float32 mask of its padding."""
  parts = [((batch, image_size, image_size, 3), jnp.uint8), ((batch,), jnp.int32)]
  parts += [((batch,), jnp.float32)] * masked
  split = NamedSharding(mesh, P(AXIS))
  return [jax.ShapeDtypeStruct(shape, dtype, sharding=split) for shape, dtype in parts]


def micro_batch_options(per_device: int, devices: int, group_size: int | None):
  """(micro_batch, remat) for memory.fit, best first: the device's whole batch, then micro-batches
  holding whole BN groups of the whole batch's, then the same with each MnasLayer rematerialised
  (its activations recomputed in the backward pass), then smaller ones, whose groups span devices
  or shrink."""
  whole = bn_groups.grouping(per_device, devices, group_size)
  sizes = [m for m in range(per_device, 0, -1) if per_device % m == 0]
  exact = [
    m for m in sizes if m == per_device or (whole.devices_per_group == 1 and m % whole.images == 0)
  ]
  return [(m, False) for m in exact] + [(m, True) for m in sizes]


def fit_train_step(
  config, model, tx, schedule, mesh, state_shapes, batch_shapes, image_stats=None, step=None
) -> memory.Fit:
  """The train step compiled for `batch_shapes`, with the largest micro-batch that fits each
  device's memory (`config.device_memory_gib`, else what the device reports; no limit on CPU,
  which reports none); memory.DoesNotFit when none fits. BN groups smaller than
  `config.bn_group_size` (a micro-batch too small to hold one) are logged as a warning. `step`
  is train_program's; the images are `batch_shapes[-2]`."""
  per_device = batch_shapes[-2].shape[0] // mesh.size

  def compile_step(micro_batch, remat):
    program = train_program(
      config,
      model.clone(remat=remat),
      tx,
      schedule,
      mesh,
      micro_batch,
      image_stats,
      step,
      len(batch_shapes),
    )
    return program.lower(state_shapes, *batch_shapes).compile()

  budget = memory.budget_bytes(config.device_memory_gib, mesh.local_devices[0])
  fitted = memory.fit(
    compile_step,
    micro_batch_options(per_device, mesh.size, model.bn_group_size),
    budget,
    what=f'the train step of {per_device} images per device',
  )
  whole, chosen = (
    bn_groups.grouping(m, mesh.size, model.bn_group_size) for m in (per_device, fitted.micro_batch)
  )
  if chosen.images != whole.images:
    logging.warning(
      'BatchNorm statistics over %d images instead of %d: only micro-batches of %d '
      'of the %d images per device fit %.2f GiB',
      chosen.images,
      whole.images,
      fitted.micro_batch,
      per_device,
      budget / memory.GIB,
    )
  return fitted


def _check_finite(loss, step):
  if not np.isfinite(loss):
    raise TrainingDiverged(f'training loss became {loss} at step {step}')


# --- the search's proxy training ----------------------------------------------------------------


def proxy_train(config, arch, data: input_pipeline.Data, seed: int = 0, devices=None) -> dict:
  """Trains one child on the proxy-training part and measures top-1 on the held-out part.

  `config` is the search config's `proxy` section. Returns {'accuracy', 'top5', 'compile_seconds',
  'train_seconds', 'eval_seconds', 'steps', 'final_loss', 'micro_batch', 'remat'}; raises
  TrainingDiverged on a non-finite loss, DoesNotFit when the train step fits no micro-batch in the
  devices' memory (fit_train_step). Each child compiles its initialisation, its train step, its
  eval step and, when `config.bn_recalibration_batches` is set, the forward pass that re-estimates
  BN statistics before evaluation; they compile concurrently (XLA compiles outside the GIL).
  """
  mesh = platform.data_mesh(jax.local_devices() if devices is None else devices)
  local_batch = check_batch(config.batch_size, mesh, 1)
  eval_batch = eval_batch_part(config.eval_batch_size, mesh, 1)
  steps_per_epoch = data.num_train / data.process_count / local_batch
  total_steps = num_steps(config, steps_per_epoch)
  recalibration = config.bn_recalibration_batches
  use_ema = bool(config.ema_decay)
  model = create_model(config, arch, data.num_classes)
  tx, schedule = create_optimizer(config, steps_per_epoch)

  start = time.perf_counter()
  # Every program is lowered from shapes alone, so the state's initialisation (itself a compiled
  # program) and the compiles all run at once.
  make_state = functools.partial(create_state, model, tx, data.image_size, use_ema, seed, mesh)
  abstract = abstract_state(make_state, mesh)
  train_shapes = batch_shapes(mesh, local_batch, data.image_size)
  eval_shapes = batch_shapes(mesh, eval_batch, data.image_size, masked=True)
  image_stats = (data.mean, data.std)
  eval_fn = eval_program(config, model, mesh, image_stats)
  programs = {
    'state': make_state,
    'train': lambda: fit_train_step(
      config, model, tx, schedule, mesh, abstract, train_shapes, image_stats
    ),
    'eval': lambda: eval_fn.lower(abstract, *eval_shapes).compile(),
  }
  if recalibration:
    stats_fn = batch_stats_program(model.clone(bn_momentum=0.0), mesh, image_stats)
    programs['stats'] = lambda: stats_fn.lower(
      (abstract.params, abstract.batch_stats), train_shapes[0]
    ).compile()
  with concurrent.futures.ThreadPoolExecutor(len(programs)) as pool:
    compiled = dict(zip(programs, pool.map(lambda run: run(), programs.values())))
  state = compiled.pop('state')
  batches = data.train_batches(local_batch, seed)
  compile_seconds = time.perf_counter() - start

  start = time.perf_counter()
  losses = []
  with memory.out_of_memory_does_not_fit('the train step'):
    for step in range(total_steps):
      state, metrics = compiled['train'].compiled(state, *shard_batch(mesh, *next(batches)))
      losses.append(metrics['loss'])
      if (step + 1) % config.check_every_steps == 0 or step + 1 == total_steps:
        _check_finite(float(losses[-1]), step + 1)
    final_loss = float(np.mean(jax.device_get(losses[-config.check_every_steps :])))
  _check_finite(final_loss, total_steps)
  train_seconds = time.perf_counter() - start

  start = time.perf_counter()
  if recalibration:
    state = recalibrate_batch_stats(compiled['stats'], state, batches, recalibration, mesh, use_ema)
  result = evaluate(compiled['eval'], state, data, eval_batch, mesh, config.eval_examples)
  eval_seconds = time.perf_counter() - start
  return {
    'accuracy': result['accuracy'],
    'top5': result['top5'],
    'compile_seconds': compile_seconds,
    'train_seconds': train_seconds,
    'eval_seconds': eval_seconds,
    'steps': total_steps,
    'final_loss': final_loss,
    'micro_batch': compiled['train'].micro_batch,
    'remat': compiled['train'].remat,
  }


# --- the 'train' job ------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config.arch` on `config.data` with checkpoints in `workdir`; a restarted job resumes
  from the latest checkpoint (same step, optimizer and EMA state, same data order on in-memory
  datasets). `config.init_from` (a train workdir or a timm/torchvision weights file) starts it from
  those weights and that checkpoint's model (`start_from`). Returns the final evaluation."""
  from clu import metric_writers
  from clu import periodic_actions
  import orbax.checkpoint as ocp

  from mnasnet_jax import checkpoints

  if not workdir:
    raise errors.UserError('the train job needs --workdir=DIR for its checkpoints and metrics')
  workdir = os.path.abspath(workdir)
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = platform.data_mesh()
  local_batch = check_batch(config.batch_size, mesh, process_count)
  eval_batch = eval_batch_part(config.eval_batch_size, mesh, process_count)
  arch = models.architecture(config.arch)  # a malformed block string fails before the data loads
  # So does a missing or unreadable init_from (read even when the run resumes from its own).
  init_checkpoint = (
    load_checkpoint(config.init_from, config.source_model) if config.init_from else None
  )
  data = input_pipeline.create(config.data, config.data.split, process_index, process_count)
  steps_per_epoch = data.num_train / config.batch_size  # a float, as the official code's
  total_steps = num_steps(config, steps_per_epoch)
  manager = checkpoints.manager(
    workdir,
    max_to_keep=config.checkpoints_to_keep,
    save_interval_steps=config.checkpoint_every_steps,
  )
  definition, loaded = start_from(
    config, workdir, arch, data.num_classes, manager.latest_step() is not None, init_checkpoint
  )
  if process_index == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MODEL_FILE), 'w') as f:
      f.write(definition.to_json())
  model = create_model(config, arch, data.num_classes, definition)
  tx, schedule = create_optimizer(config, steps_per_epoch)
  initial = None
  if loaded is not None:
    initial = initial_variables(model, data.image_size, loaded, config.init_from)
  state = create_state(
    model, tx, data.image_size, bool(config.ema_decay), config.seed, mesh, initial
  )
  image_stats = (data.mean, data.std)
  eval_fn = eval_program(config, model, mesh, image_stats)
  train_fn = fit_train_step(
    config,
    model,
    tx,
    schedule,
    mesh,
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state),
    batch_shapes(mesh, config.batch_size, data.image_size),
    image_stats,
  ).compiled

  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
  start_step = int(state.step)
  writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0)
  if start_step == 0:
    writer.write_hparams(
      {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    )
  logging.info(
    '%s: %d params, %d steps (%.3f per epoch) of %d images, from step %d',
    config.arch,
    models.count_params(state.params),
    total_steps,
    steps_per_epoch,
    config.batch_size,
    start_step,
  )
  progress = periodic_actions.ReportProgress(
    num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
  )
  batches = data.train_batches(local_batch, config.seed, start_step)
  history = []
  result = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      with memory.out_of_memory_does_not_fit(f'step {step}'):
        state, metrics = train_fn(state, *shard_batch(mesh, *next(batches)))
      history.append(metrics)
      progress(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        summary = {
          f'train_{k}': float(np.mean(v))
          for k, v in jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *history)).items()
        }
        _check_finite(summary['train_loss'], step)
        writer.write_scalars(step, summary)
        history = []
      if step % config.eval_every_steps == 0 or step == total_steps:
        result = evaluate(eval_fn, state, data, eval_batch, mesh, config.eval_examples)
        writer.write_scalars(step, {f'eval_{k}': v for k, v in result.items()})
        logging.info('step %d: eval %s', step, result)
      manager.save(step, args=ocp.args.StandardSave(state), force=step == total_steps)
  finally:
    manager.wait_until_finished()
    writer.flush()
  return result


def run(config, workdir):
  """The 'train' job (mnasnet_jax/main.py)."""
  train_and_evaluate(config, workdir)


MODEL_FILE = 'model.json'  # a train workdir's ModelDef: what its checkpoints' weights compute


def start_from(config, workdir: str, arch, num_classes: int, resumed: bool, checkpoint):
  """(ModelDef, variables or None) of a train job: a resumed run's own model (its model.json,
  Orbax restores the weights); else the model of `checkpoint` (config.init_from's) with the data's
  classes, and its weights; else the config's model, initialised afresh."""
  path = os.path.join(workdir, MODEL_FILE)
  if resumed and os.path.isfile(path):
    with open(path) as f:
      return pretrained.ModelDef.from_json(f.read()), None
  if resumed or checkpoint is None:
    return model_def(config, arch, num_classes), None
  if checkpoint.model is None:
    return model_def(config, arch, num_classes), checkpoint.variables
  definition = dataclasses.replace(checkpoint.model, num_classes=num_classes)
  logging.info('starting from %s: %s', config.init_from, definition)
  return definition, checkpoint.variables


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  variables: dict  # {'params', 'batch_stats'}
  model: pretrained.ModelDef | None  # None: a workdir that does not name it (the config's)


def load_checkpoint(path: str, source_model: str | None = None, use_ema: bool = True):
  """The Checkpoint of a 'train' job's workdir (its latest checkpoint, EMA weights when
  `use_ema` and kept; the model its model.json names) or of a timm or torchvision weights file
  (pretrained.import_file: the file's source model, `source_model` or identified)."""
  if os.path.isdir(path):
    model_path = os.path.join(path, MODEL_FILE)
    model = None
    if os.path.isfile(model_path):
      with open(model_path) as f:
        model = pretrained.ModelDef.from_json(f.read())
    return Checkpoint(restore_variables(path, use_ema), model)
  if not os.path.exists(path):
    raise errors.UserError(
      f'checkpoint {path!r} does not exist: expected the --workdir of a configs/train.py run or '
      'a timm or torchvision .safetensors or .pth file'
    )
  name, model, variables = pretrained.import_file(path, source_model)
  logging.info('imported %s as %s', path, name)
  return Checkpoint(variables, model)


def restore_variables(workdir: str, use_ema: bool = True) -> dict:
  """The Flax variables ({'params', 'batch_stats'}) of a 'train' job's latest checkpoint; its EMA
  weights and statistics when it keeps them and `use_ema`. They are restored replicated over this
  job's devices, whatever devices and hosts saved them (a checkpoint's own sharding names devices
  another job's processes may not have)."""
  import orbax.checkpoint as ocp

  from mnasnet_jax import checkpoints

  manager = checkpoints.manager(workdir, item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  if step is None:
    raise errors.UserError(
      f'no training checkpoint in {manager.directory}: expected the --workdir of a '
      f'configs/train.py run (run it with --workdir={workdir} first)'
    )
  replicated = NamedSharding(platform.data_mesh(), P())
  target = jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
    manager.item_metadata(step),
  )
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  ema = use_ema and state.get('ema_params') is not None
  return {
    'params': state['ema_params' if ema else 'params'],
    'batch_stats': state['ema_batch_stats' if ema else 'batch_stats'],
  }
