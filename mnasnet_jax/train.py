"""Data-parallel training with the official MnasNet recipe, and the proxy training of the search.

The train and eval steps are written per device, with named-axis collectives over
`platform.BATCH_AXIS` (gradients and metrics averaged with `lax.pmean`; BatchNorm averages its batch
statistics itself through the model's `bn_axis_name`), as a pmapped step is written, and run as
`jax.jit(jax.shard_map(step))` over a one-axis mesh of the devices. The recipe (paper section 6,
the official mnasnet_main.py): TF-style RMSProp, the warmup + staircase schedule, L2 on every
variable but BN's, label smoothing, dropout, and an exponential moving average of the weights and BN
statistics used for evaluation.

Two entry points: `proxy_train` (train one child on the search's proxy split and return its
held-out accuracy) and `train_and_evaluate` (the 'train' job: checkpointed, resumable, reported).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnasnet_jax import errors
from mnasnet_jax import input_pipeline
from mnasnet_jax import models
from mnasnet_jax import platform
from mnasnet_jax.optim import learning_rate_schedule, rmsprop_tf  # noqa: F401  (the recipe's API)

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
  ema_params: Any       # None when the config's ema_decay is 0
  ema_batch_stats: Any
  rng: jax.Array


# --- the recipe -------------------------------------------------------------------------------------

def num_steps(config, steps_per_epoch: int) -> int:
  """`config.num_steps` when set (> 0), else `config.num_epochs` epochs; loops only count steps."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def create_model(config, arch, num_classes: int) -> models.MnasNet:
  """The model with BN over the global batch at `config.bn_momentum`. A short proxy run
  re-estimates its statistics after training instead (`recalibrate_batch_stats`)."""
  return models.create(arch, num_classes=num_classes, depth_multiplier=config.depth_multiplier,
                       dropout_rate=config.dropout_rate, depthwise=config.depthwise,
                       conv=config.conv, dtype=config.dtype, bn_axis_name=AXIS,
                       bn_momentum=config.bn_momentum)


def create_optimizer(config, steps_per_epoch: int):
  """(RMSProp-TF transformation, its learning-rate schedule) for `config.batch_size` images a step."""
  schedule = learning_rate_schedule(config.base_learning_rate, config.batch_size, steps_per_epoch,
                                    config.warmup_epochs, config.lr_decay_rate,
                                    config.lr_decay_epochs)
  tx = rmsprop_tf(schedule, config.rmsprop_decay, config.momentum, config.rmsprop_epsilon)
  return tx, schedule


def create_state(model, tx, image_size: int, ema: bool, seed: int) -> TrainState:
  """Initial state on the host; `replicate` places it on the mesh."""
  init_key, rng = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
  variables = jax.jit(model.init)(init_key, jnp.zeros((1, image_size, image_size, 3)))
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params),
                    # Copies: the train step donates the state, and no buffer may be given twice.
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else None,
                    rng=jax.random.key_data(rng))


def weight_penalty(params, batch_stats):
  """sum(w**2) / 2 (TF's l2_loss) over every parameter but BatchNorm's scale and offset; a module
  is a BatchNorm exactly when it keeps batch statistics."""
  bn_modules = {path[:-1] for path in flax.traverse_util.flatten_dict(batch_stats)}
  return sum(0.5 * jnp.sum(jnp.square(w)) for path, w in
             flax.traverse_util.flatten_dict(params).items() if path[:-1] not in bn_modules)


def cross_entropy(logits, labels, smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(decay: float, step):
  """TF's ExponentialMovingAverage with num_updates: min(decay, (1 + n) / (10 + n))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1 + step) / (10 + step))


# --- per-device steps -----------------------------------------------------------------------------

def train_step(state: TrainState, images, labels, *, model, tx, schedule, config):
  """One step on this device's part of the batch; collectives make it the global batch's step."""
  key = jax.random.wrap_key_data(state.rng, impl=RNG_IMPL)
  dropout_key = jax.random.fold_in(jax.random.fold_in(key, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key})
    ce = jnp.mean(cross_entropy(logits, labels, config.label_smoothing))
    loss = ce + config.weight_decay * weight_penalty(params, state.batch_stats)
    return loss, (logits, updates['batch_stats'], ce)

  (loss, (logits, batch_stats, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if config.ema_decay:
    decay = ema_decay_at(config.ema_decay, step)
    average = lambda old, new: decay * old + (1 - decay) * new
    ema_params = jax.tree.map(average, ema_params, params)
    ema_batch_stats = jax.tree.map(average, ema_batch_stats, batch_stats)
  metrics = lax.pmean({'loss': loss, 'cross_entropy': ce,
                       'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}, AXIS)
  metrics['learning_rate'] = schedule(state.step)
  new_state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                            ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def batch_stats_step(variables, images, *, model):
  """The BatchNorm statistics of one global batch under `variables` = (params, batch_stats): `model`
  has BN momentum 0, so the 'running' statistics it returns are the batch's own (averaged over
  devices by BN's axis)."""
  params, batch_stats = variables
  _, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                           mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
  return updates['batch_stats']


def eval_step(state: TrainState, images, labels, mask, *, model, use_ema: bool):
  """Sums over the global batch (padding masked out): top-1 and top-5 hits, loss, count."""
  variables = ({'params': state.ema_params, 'batch_stats': state.ema_batch_stats} if use_ema else
               {'params': state.params, 'batch_stats': state.batch_stats})
  logits = model.apply(variables, images, train=False)
  top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
  sums = {'top1': jnp.sum((top5[:, 0] == labels) * mask),
          'top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
          'loss': jnp.sum(cross_entropy(logits, labels, 0.0) * mask),
          'count': jnp.sum(mask)}
  return lax.psum(sums, AXIS)


def data_parallel(step_fn, mesh, num_batch_args: int, donate_state: bool = False):
  """jit(shard_map(step_fn)): the state replicated, the batch arguments split over the mesh.

  check_vma is off because the step is written as for pmap: its gradients are this device's, and
  its explicit pmean makes them global (with the check on, JAX would sum them itself)."""
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(),) + (P(AXIS),) * num_batch_args,
                          out_specs=P(), check_vma=False)
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
    raise errors.UserError(f'batch size {batch_size}: expected a multiple of the {mesh.size} '
                           'devices')
  return batch_size // process_count


def recalibrate_batch_stats(stats_fn, state: TrainState, batches, num_batches: int, mesh,
                            use_ema: bool) -> TrainState:
  """The evaluated weights' BN statistics re-estimated as the mean over `num_batches` training
  batches. A short proxy run ends with weights still moving fast, which its running averages lag
  behind (seen: a child at 47% held-out top-1 with batch statistics scored 12% with its running
  ones); recalibrating, as one-shot NAS does, measures the trained weights as they are."""
  variables = ((state.ema_params, state.ema_batch_stats) if use_ema else
               (state.params, state.batch_stats))
  total = None
  for _ in range(num_batches):
    images, _ = shard_batch(mesh, *next(batches))
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
  return {'accuracy': float(totals['top1']) / count, 'top5': float(totals['top5']) / count,
          'loss': float(totals['loss']) / count, 'examples': int(totals['count'])}


def _steps(config, model, tx, schedule, mesh):
  train_fn = data_parallel(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                             config=config), mesh, 2, donate_state=True)
  eval_fn = data_parallel(functools.partial(eval_step, model=model,
                                            use_ema=bool(config.ema_decay)), mesh, 3)
  return train_fn, eval_fn


def _check_finite(loss, step):
  if not np.isfinite(loss):
    raise TrainingDiverged(f'training loss became {loss} at step {step}')


# --- the search's proxy training ----------------------------------------------------------------

def proxy_train(config, arch, data: input_pipeline.Data, seed: int = 0, devices=None) -> dict:
  """Trains one child on the proxy-training part and measures top-1 on the held-out part.

  `config` is the search config's `proxy` section. Returns {'accuracy', 'top5', 'compile_seconds',
  'train_seconds', 'eval_seconds', 'steps', 'final_loss'}; raises TrainingDiverged on a non-finite
  loss. Each child compiles its initialisation, its train step, its eval step and, when
  `config.bn_recalibration_batches` is set, the forward pass that re-estimates BN statistics before
  evaluation; they compile concurrently (XLA compiles outside the GIL).
  """
  mesh = platform.data_mesh(jax.local_devices() if devices is None else devices)
  local_batch = check_batch(config.batch_size, mesh, 1)
  eval_batch = check_batch(config.eval_batch_size, mesh, 1)
  steps_per_epoch = data.num_train // data.process_count // local_batch
  total_steps = num_steps(config, steps_per_epoch)
  recalibration = config.bn_recalibration_batches
  use_ema = bool(config.ema_decay)
  model = create_model(config, arch, data.num_classes)
  tx, schedule = create_optimizer(config, steps_per_epoch)

  start = time.perf_counter()
  # Every program is lowered from shapes alone, so the state's initialisation (itself a compiled
  # program) and the compiles all run at once.
  make_state = functools.partial(create_state, model, tx, data.image_size, use_ema, seed)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=NamedSharding(mesh, P())),
                          jax.eval_shape(make_state))
  size = (data.image_size, data.image_size, 3)
  split = NamedSharding(mesh, P(AXIS))
  train_shapes, eval_shapes = ([jax.ShapeDtypeStruct((batch,) + s, d, sharding=split)
                                for s, d in ((size, jnp.float32), ((), jnp.int32), ((), jnp.float32))]
                               for batch in (local_batch, eval_batch))
  train_fn, eval_fn = _steps(config, model, tx, schedule, mesh)
  programs = {'state': lambda: replicate(make_state(), mesh),
              'train': lambda: train_fn.lower(abstract, *train_shapes[:2]).compile(),
              'eval': lambda: eval_fn.lower(abstract, *eval_shapes).compile()}
  if recalibration:
    stats_fn = data_parallel(functools.partial(batch_stats_step,
                                               model=model.clone(bn_momentum=0.0)), mesh, 1)
    programs['stats'] = lambda: stats_fn.lower((abstract.params, abstract.batch_stats),
                                               train_shapes[0]).compile()
  with concurrent.futures.ThreadPoolExecutor(len(programs)) as pool:
    compiled = dict(zip(programs, pool.map(lambda run: run(), programs.values())))
  state = compiled.pop('state')
  batches = data.train_batches(local_batch, seed)
  compile_seconds = time.perf_counter() - start

  start = time.perf_counter()
  losses = []
  for step in range(total_steps):
    state, metrics = compiled['train'](state, *shard_batch(mesh, *next(batches)))
    losses.append(metrics['loss'])
    if (step + 1) % config.check_every_steps == 0 or step + 1 == total_steps:
      _check_finite(float(losses[-1]), step + 1)
  final_loss = float(np.mean(jax.device_get(losses[-config.check_every_steps:])))
  _check_finite(final_loss, total_steps)
  train_seconds = time.perf_counter() - start

  start = time.perf_counter()
  if recalibration:
    state = recalibrate_batch_stats(compiled['stats'], state, batches, recalibration, mesh, use_ema)
  result = evaluate(compiled['eval'], state, data, eval_batch, mesh, config.eval_examples)
  eval_seconds = time.perf_counter() - start
  return {'accuracy': result['accuracy'], 'top5': result['top5'],
          'compile_seconds': compile_seconds, 'train_seconds': train_seconds,
          'eval_seconds': eval_seconds, 'steps': total_steps, 'final_loss': final_loss}


# --- the 'train' job ------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config.arch` on `config.data` with checkpoints in `workdir`; a restarted job resumes
  from the latest checkpoint (same step, optimizer and EMA state, same data order on in-memory
  datasets). Returns the final evaluation."""
  import orbax.checkpoint as ocp
  from clu import metric_writers
  from clu import periodic_actions

  if not workdir:
    raise errors.UserError('the train job needs --workdir=DIR for its checkpoints and metrics')
  workdir = os.path.abspath(workdir)
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = platform.data_mesh()
  local_batch = check_batch(config.batch_size, mesh, process_count)
  eval_batch = check_batch(config.eval_batch_size, mesh, process_count)
  arch = models.architecture(config.arch)  # a malformed block string fails before the data loads
  data = input_pipeline.create(config.data, config.data.split, process_index, process_count)
  steps_per_epoch = data.num_train // config.batch_size
  total_steps = num_steps(config, steps_per_epoch)
  model = create_model(config, arch, data.num_classes)
  tx, schedule = create_optimizer(config, steps_per_epoch)
  state = replicate(create_state(model, tx, data.image_size, bool(config.ema_decay), config.seed),
                    mesh)
  train_fn, eval_fn = _steps(config, model, tx, schedule, mesh)

  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoints_to_keep,
                                           save_interval_steps=config.checkpoint_every_steps))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
  start_step = int(state.step)
  writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
  logging.info('%s: %d params, %d steps (%d per epoch) of %d images, from step %d',
               config.arch, models.count_params(state.params), total_steps, steps_per_epoch,
               config.batch_size, start_step)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
  batches = data.train_batches(local_batch, config.seed, start_step)
  history = []
  result = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = train_fn(state, *shard_batch(mesh, *next(batches)))
      history.append(metrics)
      progress(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        summary = {f'train_{k}': float(np.mean(v)) for k, v in
                   jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *history)).items()}
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


def restore_variables(workdir: str, use_ema: bool = True) -> dict:
  """The Flax variables ({'params', 'batch_stats'}) of a 'train' job's latest checkpoint; its EMA
  weights and statistics when it keeps them and `use_ema`."""
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise errors.UserError(f'no training checkpoint in {directory}: expected the --workdir of a '
                           f'configs/train.py run (run it with --workdir={workdir} first)')
  state = manager.restore(step, args=ocp.args.StandardRestore())
  ema = use_ema and state.get('ema_params') is not None
  return {'params': state['ema_params' if ema else 'params'],
          'batch_stats': state['ema_batch_stats' if ema else 'batch_stats']}
