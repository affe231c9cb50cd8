"""The search on shared weights (TuNAS, Bender et al. CVPR 2020): one supernet trained once instead
of a proxy training per child. `python launch/main.py --config=configs/search.py:oneshot[_local]`.

The supernet (supernet.py) first trains `config.oneshot.warmup_steps` steps on architectures drawn
from the space, so that every option's weights are trained before any is judged: at first mostly
the largest child, then uniformly (`config.oneshot.largest_first_steps`). Then each child the
strategy samples (PPO's LSTM, REINFORCE's independent logits, evolution) trains the shared
weights for `config.oneshot.train_steps_per_child` steps as itself, and its reward is the
shared weights' top-1 on `config.oneshot.eval_batches` held-out batches (BatchNorm statistics of
each batch itself: the running ones average over every child trained) with the latency table's
latency, by reward.py's rewards. After `children_per_step` children the strategy is told their
rewards, as in the multi-trial search, whose loop, history, TensorBoard scalars, Pareto report and
`best.md` (whose commands retrain a child standalone from scratch) this search shares
(search.Search).

The answer. TuNAS answers the architecture the policy ends preferring, not the best-rewarded child,
whose reward is one noisy batch's. But shared weights judge how good trained shared weights are,
not how fast a child trains from scratch, which is what the multi-trial search's proxy rewards
(README, "Search on shared weights"). So the search ends with `config.oneshot.finalists`
children, the policy's answer first, then the next distinct children the strategy samples, each
trained alone as the multi-trial search trains a child (`config.oneshot.finalist_proxy`, its
proxy recipe), recorded in `finalists.jsonl`; the best of them by reward is the answer (best.md's
first), as DARTS (Liu et al. 2019) picks among its four searches' cells by a short training from
scratch.

Every supernet step runs data-parallel over all devices of all processes, with train.py's step,
recipe and mesh; every process computes every reward alike (a global batch), and process 0 writes.
Checkpoints (Orbax) hold the supernet, the strategy and the supernet step, which fixes the data's
position (the training batches are a function of the step): during the warm-up every
`checkpoint_every_steps` steps, then after each controller step. A search killed at any moment and
run again resumes from the last checkpoint, trains the children of the unfinished controller step
again (so the supernet is what an uninterrupted run has) and takes the rewards already in the
history for those it recorded. The finalists resume as the children of a step do.
"""

from __future__ import annotations

import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

from mnasnet_jax import errors
from mnasnet_jax import history as history_lib
from mnasnet_jax import input_pipeline
from mnasnet_jax import memory
from mnasnet_jax import platform
from mnasnet_jax import search
from mnasnet_jax import supernet
from mnasnet_jax import train


def train_step(state, tokens, images, labels, *, model, **kwargs):
  """train.train_step of the supernet `model` as the child `tokens` (one row per device, all
  alike) selects."""
  return train.train_step(state, images, labels, model=supernet.Child(model, tokens[0]), **kwargs)


def reward_step(state, tokens, images, labels, mask, *, net, image_stats):
  """train.eval_step's sums for the child `tokens` selects, on BN statistics of `images` itself."""
  child = supernet.Child(net, tokens[0])
  stats = train.batch_stats_step(
    (state.params, state.batch_stats),
    images,
    model=child.clone(bn_momentum=0.0),
    image_stats=image_stats,
  )
  return train.eval_step(
    state.replace(batch_stats=stats),
    images,
    labels,
    mask,
    model=child,
    use_ema=False,
    image_stats=image_stats,
  )


def warmup_tokens(space, seed: int, step: int, largest_first_steps: int) -> np.ndarray:
  """The warm-up's child of supernet step `step`, a function of (seed, step) alone: drawn
  uniformly, except that over the first `largest_first_steps` each decision takes its largest
  option (search_space.largest) with a probability falling linearly from 1 to 0. TuNAS's filter
  and op warm-up, as choices: the shared weights first learn as one wide network, and the
  children inside it later (README, "Search on shared weights")."""
  rng = np.random.default_rng((seed, step))
  tokens = np.array([rng.integers(n) for n in space.choices], np.int32)
  if step < largest_first_steps:
    largest = rng.random(len(tokens)) < 1.0 - step / largest_first_steps
    tokens = np.where(largest, space.largest(), tokens).astype(np.int32)
  return tokens


def finalist_tokens(strategy, state, num: int) -> list[np.ndarray]:
  """Up to `num` distinct children: the policy's answer, where the strategy has a policy, then
  those the strategy samples next from its final `state` (as many as it gives in 4 * `num`
  samples: a policy that has settled gives fewer)."""
  answer = strategy.most_likely(state)
  found = [] if answer is None else [answer]
  sampled, _ = strategy.ask(state, 4 * num)
  for tokens in sampled:
    if len(found) < num and not any(np.array_equal(tokens, f) for f in found):
      found.append(np.asarray(tokens, np.int32))
  return found


def step_number(step: int) -> np.ndarray:
  """A step as checkpoints hold it: a 0-d array (Orbax restores no NumPy scalar, np.int32(0): a
  template holding one fails as if the checkpoint were unreadable)."""
  return np.asarray(step, np.int32)


class OneShotSearch(search.Search):
  """search.Search with the children's proxy trainings replaced by one supernet's training."""

  ACCURACY = (
    'top-1 of the shared weights on held-out batches (at the supernet step history.jsonl gives), '
    'not of the child trained alone'
  )

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self.oneshot = o = config.oneshot
    for key in ('train_steps_per_child', 'eval_batches', 'checkpoint_every_steps'):
      if o[key] < 1:
        raise errors.UserError(f'config.oneshot.{key} = {o[key]}: expected at least 1')
    for key in ('warmup_steps', 'largest_first_steps', 'finalists'):
      if o[key] < 0:
        raise errors.UserError(f'config.oneshot.{key} = {o[key]}: expected >= 0')
    if config.proxy.ema_decay:
      raise errors.UserError(
        f'config.proxy.ema_decay = {config.proxy.ema_decay}: the one-shot search keeps no '
        'moving average (the shared weights serve another child every step); expected 0'
      )
    # The finalists train as the multi-trial search's children do (on the whole data, as set).
    self.child_proxy = o.finalist_proxy
    self.finalist_history = history_lib.History(
      os.path.join(workdir, 'finalists.jsonl'), writable=self.is_writer
    )
    if self.process_count > 1:  # one data-parallel training: each process reads its own part
      self.data = input_pipeline.create_proxy_data(
        config.data, self.process_index, self.process_count
      )
    self.mesh = platform.data_mesh(jax.devices())
    proxy = config.proxy
    self.local_batch = train.check_batch(proxy.batch_size, self.mesh, self.process_count)
    eval_batch = train.eval_batch_part(o.eval_batch_size, self.mesh, self.process_count)
    steps_per_epoch = self.data.num_train / self.process_count / self.local_batch
    self.total_steps = o.warmup_steps + self.search.num_children * o.train_steps_per_child
    self.net = supernet.create(proxy, self.space, self.data.num_classes)
    self.tx, self.schedule = train.create_optimizer(proxy, steps_per_epoch)
    image_stats = (self.data.mean, self.data.std)
    self.reward_fn = train.data_parallel(
      functools.partial(reward_step, net=self.net, image_stats=image_stats), self.mesh, 4
    )
    self.make_state = functools.partial(
      train.create_state,
      supernet.Child(self.net, jnp.zeros(len(self.space.choices), jnp.int32)),
      self.tx,
      self.data.image_size,
      False,
      self.search.train_seed,
      self.mesh,
    )
    # The held-out batches the rewards are measured on; child `trial` takes the next
    # `eval_batches` of them, cycling.
    self.held_out = list(self.data.eval_batches(eval_batch, o.eval_examples))
    self.state = None
    self.supernet_step = 0
    self.batches = None
    self.train_fn = None

  def fit_train_step(self):
    """The supernet's train step, compiled with the largest micro-batch that fits each device
    (train.fit_train_step, as a child's proxy training); one that fits none stops the search."""
    tokens = jax.ShapeDtypeStruct(
      (self.mesh.size, len(self.space.choices)),
      jnp.int32,
      sharding=NamedSharding(self.mesh, P(platform.BATCH_AXIS)),
    )
    batch = train.batch_shapes(self.mesh, self.config.proxy.batch_size, self.data.image_size)
    try:
      fitted = train.fit_train_step(
        self.config.proxy,
        self.net,
        self.tx,
        self.schedule,
        self.mesh,
        train.abstract_state(self.make_state, self.mesh),
        [tokens, *batch],
        (self.data.mean, self.data.std),
        step=train_step,
      )
    except memory.DoesNotFit as e:
      raise errors.UserError(f'the supernet: {e}') from None
    return fitted.compiled

  # --- the supernet ---------------------------------------------------------------------------

  def device_tokens(self, tokens) -> np.ndarray:
    """One child's tokens as this process's rows of the [devices, P] array the steps take."""
    return np.tile(np.asarray(tokens, np.int32), (self.mesh.local_mesh.size, 1))

  def train_on(self, tokens, steps: int) -> float:
    """`steps` supernet steps as the child `tokens`; returns the last step's loss."""
    rows = self.device_tokens(tokens)
    for _ in range(steps):
      images, labels = next(self.batches)
      self.state, metrics = self.train_fn(
        self.state, *train.shard_batch(self.mesh, rows, images, labels)
      )
      self.supernet_step += 1
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise train.TrainingDiverged(
        f'supernet training loss became {loss} at step {self.supernet_step}'
      )
    return loss

  def shared_accuracy(self, trial: int, tokens, num_batches: int | None = None) -> float:
    """Top-1 of the shared weights as child `tokens` on its `num_batches` (by default
    `config.oneshot.eval_batches`) held-out batches."""
    rows = self.device_tokens(tokens)
    totals = None
    n = num_batches or self.oneshot.eval_batches
    for j in range(n):
      batch = self.held_out[(trial * n + j) % len(self.held_out)]
      sums = self.reward_fn(self.state, *train.shard_batch(self.mesh, rows, *batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return float(totals['top1']) / max(float(totals['count']), 1.0)

  # --- checkpoints ----------------------------------------------------------------------------

  def checkpoint(self, controller_state, controller_step: int) -> None:
    """Saves supernet, strategy and position under the supernet step."""
    item = {
      'controller': jax.device_get(controller_state),
      'controller_step': step_number(controller_step),
      'supernet_step': step_number(self.supernet_step),
      'supernet': self.state,
    }
    self.checkpoints.save(self.supernet_step, args=ocp.args.StandardSave(item))

  def save(self, step: int, state) -> None:
    self.checkpoint(state, step)

  def resume(self):
    """Restores the newest checkpoint (or starts afresh), finishes the warm-up, and returns the
    strategy's state and the controller step to run."""
    started = time.perf_counter()
    self.train_fn = self.train_fn or self.fit_train_step()
    self.state = self.make_state()
    fresh = {
      'controller': jax.device_get(self.strategy.init(self.search.seed)),
      'controller_step': step_number(0),
      'supernet_step': step_number(0),
      'supernet': self.state,
    }
    restored, _ = self.restore(fresh)
    self.state = train.replicate(restored['supernet'], self.mesh)
    self.supernet_step = int(restored['supernet_step'])
    controller_step = int(restored['controller_step'])
    self.batches = self.data.train_batches(
      self.local_batch, self.search.train_seed, start_step=self.supernet_step
    )
    logging.info(
      'supernet at step %d of %d (%d warm-up), controller step %d; %.1f s to set up',
      self.supernet_step,
      self.total_steps,
      self.oneshot.warmup_steps,
      controller_step,
      time.perf_counter() - started,
    )
    began = time.perf_counter()
    while self.supernet_step < self.oneshot.warmup_steps:
      loss = self.train_on(
        warmup_tokens(
          self.space, self.search.seed, self.supernet_step, self.oneshot.largest_first_steps
        ),
        1,
      )
      if self.supernet_step % self.oneshot.checkpoint_every_steps == 0 or (
        self.supernet_step == self.oneshot.warmup_steps
      ):
        self.checkpoint(restored['controller'], 0)
        logging.info(
          'warm-up step %d/%d: loss %.4f, %.2f s a step',
          self.supernet_step,
          self.oneshot.warmup_steps,
          loss,
          (time.perf_counter() - began) / self.supernet_step,
        )
    return restored['controller'], controller_step

  # --- one controller step ----------------------------------------------------------------------

  def evaluate_step(self, step: int, tokens: np.ndarray) -> np.ndarray:
    """Each child trains the supernet as itself, then is rewarded on held-out batches; children the
    history holds are trained again (the supernet after a resume is an uninterrupted run's) but
    not measured again."""
    first = step * self.search.children_per_step
    children = [self.describe(first + c, step, t) for c, t in enumerate(tokens)]
    known, rewards = self.recorded(children, self.history)
    for c, child in enumerate(children):
      start = time.perf_counter()
      self.train_on(child['tokens'], self.oneshot.train_steps_per_child)
      if known[c]:
        continue
      trained = time.perf_counter()
      accuracy = self.shared_accuracy(child['trial'], child['tokens'])
      outcome = {
        'status': 'ok',
        'reason': None,
        'accuracy': accuracy,
        'compile_seconds': None,
        'train_seconds': trained - start,
        'eval_seconds': time.perf_counter() - start,
        'supernet_step': self.supernet_step,
      }
      record = self.finish(child, outcome, self.process_index)
      self.log_child(record)
      self.history.append(record)
      rewards[c] = record['reward']
    return rewards

  # --- the answer -------------------------------------------------------------------------------

  def conclude(self, state) -> None:
    """Trains the finalists of the strategy's final `state` alone (module docstring)."""
    num = self.oneshot.finalists
    if not num:
      return
    tokens = finalist_tokens(self.strategy, state, num)
    logging.info(
      'finalists: %d children, each trained alone as the multi-trial search trains one; the best '
      'by reward is the answer',
      len(tokens),
    )
    children = [self.describe(trial, self.num_steps, t) for trial, t in enumerate(tokens)]
    self.train_children(children, self.finalist_history)

  def finalists(self) -> list[dict] | None:
    return self.finalist_history.records if self.oneshot.finalists else None


def run(config, workdir: str):
  """The 'oneshot' job: search.run's checks, then the search on shared weights."""
  return search.run(config, workdir, OneShotSearch)
