"""The MnasNet search (paper section 4): sample children, proxy-train each, reward, update the policy.

The controller step is the unit of work and of resumption. Step s asks the strategy for
`children_per_step` children (the last step for the rest of `num_children`) from the state
checkpointed after step s-1, evaluates each (accuracy from proxy training, latency from the lookup
table, never measured on a device), tells the strategy their rewards (a child that fits the device
in no way is recorded as 'oom' and left out) and checkpoints the new state with Orbax as step s+1.
Each child reaches `history.jsonl` the moment it is evaluated. A search killed at any moment and
started again with the same command restores the last readable checkpoint, asks again (the
strategy's randomness lives in its state, so it samples the same children), reuses the results the
history already holds for that step and evaluates only the rest: nothing recorded is lost or
recorded twice, and the sequence of children is that of an uninterrupted run. (Exactly so when proxy
training is bit-for-bit repeatable: the child cut short by the kill is trained again, and
cross-device sums on several CPU devices may add in another order, which can move its accuracy by an
example and so the later samples.)

Across hosts every process runs this same loop. The children of a step that still need evaluating
are dealt out round-robin; each process trains its share on its own local devices; the outcomes are
gathered with `process_allgather`, so every process tells its strategy the identical rewards and the
states stay identical, and every process decides from them alike when too many children failed.
Process 0 alone writes the history, the report and the metrics; all processes take part in Orbax's
checkpointing, as Orbax requires.

The target latency T (`config.reward.target_ms`) defaults to the table's latency of mobilenet_v2: the
paper's T = 75 ms is MobileNetV2's latency on its Pixel 1, so the default keeps the paper's meaning on
whatever device the table was profiled on.
"""

from __future__ import annotations

import math
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mnasnet_jax import checkpoints
from mnasnet_jax import controller
from mnasnet_jax import errors
from mnasnet_jax import history as history_lib
from mnasnet_jax import input_pipeline
from mnasnet_jax import latency
from mnasnet_jax import models
from mnasnet_jax import pareto
from mnasnet_jax import reward as reward_lib
from mnasnet_jax import search_space
from mnasnet_jax import train

STATUS_CODES = {'ok': 0, 'failed': 1, 'oom': 2}
REASON_BYTES = 240  # failure reasons travel between processes as fixed-size byte arrays


class TooManyFailures(RuntimeError):
  """`config.search.max_consecutive_failures` children failed in a row: a broken setup."""


def target_latency(reward_config, table) -> float:
  """T in ms: the configured value, or (None) the table's latency of mobilenet_v2."""
  if reward_config.target_ms is not None:
    if reward_config.target_ms <= 0:
      raise errors.UserError(
        f'config.reward.target_ms = {reward_config.target_ms}: expected a '
        "positive latency in milliseconds, or None for the table's "
        'mobilenet_v2'
      )
    return float(reward_config.target_ms)
  return float(table.predict('mobilenet_v2'))


def load_table(name_or_path: str) -> latency.LatencyTable:
  """`config.latency.table`'s table; a path that does not exist is named as the user gave it."""
  try:
    return latency.LatencyTable.load(name_or_path)
  except FileNotFoundError:
    raise errors.UserError(
      f'config.latency.table = {name_or_path!r}: no such file; expected a '
      'shipped table name (mnasnet_jax/latency/tables/) or the path of a '
      'table written by the profile_latency job'
    ) from None


def enable_compilation_cache(search_config, workdir: str) -> None:
  """Every child is a new program; the cache spares recompiling on resume and repeated children.

  The cache lives in `config.search.compilation_cache_dir`, by default `WORKDIR/jax_cache`. It is
  (re)initialised here, so it takes effect even if this process has compiled before.
  """
  if not search_config.compilation_cache:
    return
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  jax.config.update(
    'jax_compilation_cache_dir',
    search_config.compilation_cache_dir or os.path.join(workdir, 'jax_cache'),
  )
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs', search_config.cache_min_compile_seconds
  )
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()


def _float32(x) -> float:
  """Values that cross processes as float32: recorded as such so every process agrees exactly."""
  return float(np.float32(x))


def _decode(reason: np.ndarray) -> str | None:
  """A reason as it crossed processes (REASON_BYTES, zero-padded) back to text."""
  return bytes(reason).rstrip(b'\0').decode('utf-8', 'replace') or None


class Search:
  """One search in one workdir; `run()` goes from wherever the workdir stands to the end.

  Everything the config names is checked before the dataset loads, and the dataset before the
  workdir is touched, so a mistake costs seconds, not a child's training."""

  ACCURACY = pareto.PROXY_ACCURACY  # what a record's accuracy is, for best.md

  def __init__(self, config, workdir: str):
    self.config = config
    self.search = config.search
    self.workdir = workdir
    for key in ('num_children', 'children_per_step'):
      if self.search[key] < 1:
        raise errors.UserError(f'config.search.{key} = {self.search[key]}: expected at least 1')
    self.space = search_space.SearchSpace(config.search_space)
    self.table = load_table(config.latency.table)
    self.target_ms = target_latency(config.reward, self.table)
    reward_lib.exponents(config.reward)  # refuses an unknown kind before any child trains
    self.strategy = controller.create(config.controller, self.space.choices)
    self.data = data = input_pipeline.create_proxy_data(
      config.data, process_index=0, process_count=1
    )
    if (self.table.resolution, self.table.num_classes) != (data.image_size, data.num_classes):
      raise errors.UserError(
        f'latency table {self.table.path} was profiled at {self.table.resolution} px with '
        f'{self.table.num_classes} classes, but the proxy data has {data.image_size} px and '
        f'{data.num_classes} classes: set config.latency.table to a table of the same resolution'
      )
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self.is_writer = self.process_index == 0
    os.makedirs(workdir, exist_ok=True)
    self.num_steps = math.ceil(self.search.num_children / self.search.children_per_step)
    self.history = history_lib.History(
      os.path.join(workdir, 'history.jsonl'), writable=self.is_writer
    )
    self.checkpoints = checkpoints.manager(
      workdir, max_to_keep=self.search.keep_checkpoints, enable_async_checkpointing=False
    )
    self.consecutive_failures = 0
    self.best_reward = -math.inf
    # What a child is trained with alone (the one-shot search's finalists take the same path).
    self.child_proxy, self.child_data = config.proxy, data

  # --- one child ------------------------------------------------------------------------------

  def architecture(self, blocks) -> models.Architecture:
    return models.Architecture(tuple(blocks), stem_filters=self.space.stem_filters)

  def describe(self, trial: int, step: int, tokens) -> dict:
    """What every process can say about a child without training it."""
    return {'trial': trial, 'step': step, **self.architecture_facts(tokens)}

  def architecture_facts(self, tokens) -> dict:
    """The tokens' blocks, table latency and size."""
    blocks = self.space.decode(tokens)
    arch = self.architecture(blocks)
    size = models.summary(arch, resolution=self.data.image_size, num_classes=self.data.num_classes)
    return {
      'tokens': [int(t) for t in tokens],
      'blocks': blocks,
      'latency_ms': float(self.table.predict(arch)),
      'params': size['params'],
      'macs': size['macs'],
    }

  def train_child(self, child: dict) -> dict:
    """Proxy-trains one child; a failure is an outcome to record, not the end of the search."""
    start = time.time()
    outcome = {
      'status': 'ok',
      'reason': None,
      'accuracy': None,
      'compile_seconds': None,
      'train_seconds': None,
    }
    try:
      result = train.proxy_train(
        self.child_proxy,
        self.architecture(child['blocks']),
        self.child_data,
        seed=self.search.train_seed + child['trial'],
        devices=jax.local_devices(),
      )
      outcome.update(
        accuracy=float(result['accuracy']),
        compile_seconds=float(result['compile_seconds']),
        train_seconds=float(result['train_seconds']),
      )
    except train.DoesNotFit as e:
      outcome.update(status='oom', reason=f'DoesNotFit: {e}')
    except train.TrainingDiverged as e:
      outcome.update(status='failed', reason=f'TrainingDiverged: {e}')
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('trial %d failed', child['trial'])
      outcome.update(status='failed', reason=f'{type(e).__name__}: {e}')
    outcome['eval_seconds'] = time.time() - start
    return outcome

  def finish(self, child: dict, outcome: dict, process: int) -> dict:
    """The child's record. One that does not fit ('oom') gets no reward: that is a fact about the
    device's memory, not the architecture's accuracy, and the controller must not learn it."""
    record = dict(child, **outcome, process=process)
    if record['status'] == 'ok':
      record['accuracy'] = _float32(record['accuracy'])
      record['reward'] = _float32(
        reward_lib.compute(
          self.config.reward, record['accuracy'], record['latency_ms'], self.target_ms
        )
      )
    elif record['status'] == 'failed':
      record['reward'] = _float32(self.search.failure_reward)
    else:
      record['reward'] = None
    return record

  # --- one controller step --------------------------------------------------------------------

  def step_size(self, step: int) -> int:
    """Children of controller step `step`: `children_per_step`, the last step the remainder, so
    the search samples exactly `num_children`."""
    return min(
      self.search.children_per_step, self.search.num_children - step * self.search.children_per_step
    )

  def recorded(self, children: list[dict], history) -> tuple[np.ndarray, np.ndarray]:
    """(already recorded?, their rewards; NaN: none) for `children` (one step's), as process 0's
    `history` says."""
    n = len(children)
    step = children[0]['step']
    known = np.zeros(n, np.int32)
    rewards = np.zeros(n, np.float32)
    mismatch = np.zeros(n, np.int32)
    for record in history.step_records(step):
      c = record['trial'] - children[0]['trial']
      if not 0 <= c < n:
        continue
      if record['tokens'] != children[c]['tokens']:
        mismatch[c] = 1
      known[c], rewards[c] = 1, np.nan if record['reward'] is None else record['reward']
    if self.process_count > 1:
      known, rewards, mismatch = (
        np.array(x) for x in multihost_utils.broadcast_one_to_all((known, rewards, mismatch))
      )
    if np.any(mismatch):
      c = int(np.argmax(mismatch))
      raise history_lib.HistoryError(
        f'{history.path}: trial {children[c]["trial"]} of step {step} was recorded with other '
        f'tokens than the strategy, resumed from its checkpoint, samples now '
        f'({children[c]["tokens"]}): this workdir holds another search (other config or seed); '
        'use a new --workdir'
      )
    return known.astype(bool), np.asarray(rewards, np.float32)

  def evaluate_step(self, step: int, tokens: np.ndarray) -> np.ndarray:
    """Rewards of the step's children (NaN: did not fit), each evaluated once across all processes
    and recorded."""
    first = step * self.search.children_per_step
    children = [self.describe(first + c, step, t) for c, t in enumerate(tokens)]
    return self.train_children(children, self.history)

  def train_children(self, children: list[dict], history) -> np.ndarray:
    """Rewards of `children` (one step's; NaN: did not fit), each trained alone once across all
    processes and recorded in `history`, unless it is there already."""
    known, rewards = self.recorded(children, history)
    todo = [c for c in range(len(children)) if not known[c]]
    if len(todo) < len(children):
      logging.info(
        'step %d: %d children already in the history, %d to evaluate',
        children[0]['step'],
        len(children) - len(todo),
        len(todo),
      )
    mine = todo[self.process_index :: self.process_count]
    n = len(children)
    accuracy = np.full(n, np.nan, np.float32)
    status = np.full(n, -1, np.int32)
    seconds = np.zeros((n, 3), np.float32)  # eval, compile, train
    reasons = np.zeros((n, REASON_BYTES), np.uint8)
    for c in mine:
      outcome = self.train_child(children[c])
      record = self.finish(children[c], outcome, self.process_index)
      self.log_child(record)
      history.append(record)  # on disk at once on process 0, in memory elsewhere
      rewards[c] = np.nan if record['reward'] is None else record['reward']
      accuracy[c] = np.nan if outcome['accuracy'] is None else outcome['accuracy']
      status[c] = STATUS_CODES[outcome['status']]
      seconds[c] = [outcome[k] or 0.0 for k in ('eval_seconds', 'compile_seconds', 'train_seconds')]
      reason = (outcome['reason'] or '').encode('utf-8')[:REASON_BYTES]
      reasons[c, : len(reason)] = np.frombuffer(reason, np.uint8)
    if self.process_count > 1:
      self.gather(children, todo, history, rewards, accuracy, status, seconds, reasons)
    self.check_failures(children, todo, status, reasons)
    return rewards

  def gather(self, children, todo, history, rewards, accuracy, status, seconds, reasons):
    """Every process learns every outcome (rewards, status and reasons are filled in for all of
    `todo`); process 0 records the children others trained in `history`."""
    g_rewards, g_accuracy, g_status, g_seconds, g_reasons = multihost_utils.process_allgather(
      (rewards, accuracy, status, seconds, reasons)
    )
    names = {v: k for k, v in STATUS_CODES.items()}
    for i, c in enumerate(todo):
      owner = i % self.process_count
      rewards[c], status[c] = g_rewards[owner, c], g_status[owner, c]
      reasons[c] = g_reasons[owner, c]
      if owner == self.process_index:
        continue
      reason = _decode(g_reasons[owner, c])
      acc = float(g_accuracy[owner, c])
      outcome = {
        'status': names[int(g_status[owner, c])],
        'reason': reason,
        'accuracy': None if math.isnan(acc) else acc,
        'eval_seconds': float(g_seconds[owner, c, 0]),
        'compile_seconds': float(g_seconds[owner, c, 1]) or None,
        'train_seconds': float(g_seconds[owner, c, 2]) or None,
      }
      reward = float(g_rewards[owner, c])
      record = dict(
        children[c], **outcome, reward=None if math.isnan(reward) else reward, process=owner
      )
      history.append(record)
      if self.is_writer:
        self.log_child(record)

  def check_failures(self, children, todo, status, reasons) -> None:
    """Stops the search at `max_consecutive_failures` failed children in a row. Counted from the
    gathered outcomes in trial order, so every process stops at the same child with the same
    message. A child that does not fit neither counts nor resets the count (it says nothing of the
    setup); children taken from the history do not count (they may have failed before the fix
    the user resumed after)."""
    limit = self.search.max_consecutive_failures
    for c in todo:
      if status[c] == STATUS_CODES['ok']:
        self.consecutive_failures = 0
      elif status[c] == STATUS_CODES['failed']:
        self.consecutive_failures += 1
        if limit and self.consecutive_failures >= limit:
          raise TooManyFailures(
            f'{self.consecutive_failures} children failed in a row (last: trial '
            f'{children[c]["trial"]}, {_decode(reasons[c])}); this looks like a broken setup '
            'rather than bad architectures. Every recorded child is kept: fix the cause and run '
            'the same command again to resume.'
          )

  def log_child(self, r: dict) -> None:
    if r['status'] == 'ok':
      logging.info(
        'trial %d (step %d): accuracy %.4f, latency %.3f ms, reward %.4f, %.1f s',
        r['trial'],
        r['step'],
        r['accuracy'],
        r['latency_ms'],
        r['reward'],
        r['eval_seconds'],
      )
    elif r['status'] == 'oom':
      logging.warning(
        "trial %d (step %d) does not fit the device, left out of the controller's update: %s",
        r['trial'],
        r['step'],
        r['reason'],
      )
    else:
      logging.warning('trial %d (step %d) failed: %s', r['trial'], r['step'], r['reason'])

  # --- the loop ---------------------------------------------------------------------------------

  def restore(self, fresh=None):
    """(state, first step to run): the newest readable checkpoint, or `fresh` (by default a fresh
    strategy state; the template of what the checkpoints hold).

    A checkpoint that cannot be read (random bytes from a failing disk or an interrupted copy) is
    reported in one line and removed, and the one before it is tried: the steps after it sample
    the same children again, which the history already holds, so nothing is trained twice. A
    checkpoint is used only if every process reads it, so all resume from the same one."""
    if fresh is None:
      fresh = jax.device_get(self.strategy.init(self.search.seed))
    steps = sorted(self.checkpoints.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state, error = self.checkpoints.restore(step, args=ocp.args.StandardRestore(fresh)), None
      except Exception as e:  # pylint: disable=broad-except  (whatever a damaged file raises)
        state, error = None, f'{type(e).__name__}: {(str(e).strip() or "-").splitlines()[0]}'
      if self.process_count > 1:
        unread = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and np.any(unread):
          error = f'process {int(np.argmax(unread))} cannot read it'
      if error is None:
        logging.info(
          'resumed from the checkpoint after controller step %d (%d children recorded)',
          step,
          len(self.history),
        )
        return jax.device_get(state), step
      logging.warning(
        'checkpoint %d in %s cannot be read (%s); removed it, resuming from %s',
        step,
        self.checkpoints.directory,
        error,
        f'checkpoint {steps[i + 1]}' if i + 1 < len(steps) else 'the start',
      )
      self.checkpoints.delete(step)
    return fresh, 0

  def resume(self):
    """(strategy state, first controller step): where the workdir stands (the one-shot search
    trains its supernet's warm-up here first)."""
    return self.restore()

  def save(self, step: int, state) -> None:
    """Checkpoints the strategy's state after controller step `step` - 1."""
    self.checkpoints.save(step, args=ocp.args.StandardSave(state))

  def conclude(self, state) -> None:
    """What comes between the last controller step and the final report: nothing here, where every
    child was trained alone (the one-shot search trains its finalists)."""
    del state

  def finalists(self) -> list[dict] | None:
    """The records of the children trained alone after the search, for the report (none here)."""
    return None

  def report(self, state) -> None:
    """Writes the report (pareto.py), with the policy's answer of the strategy's `state`."""
    if not self.is_writer:
      return
    answer = self.strategy.most_likely(state)
    c = self.config
    description = (
      f'MnasNet search: {c.data.dataset} {self.data.image_size} px, '
      f'{os.path.basename(self.table.path)}, {c.reward.kind} reward, '
      f'{c.controller.strategy}'
    )
    pareto.write_report(
      self.history.records,
      self.workdir,
      target_ms=self.target_ms,
      top_k=self.search.report_top_k,
      train_config=self.search.train_config,
      description=description,
      accuracy=self.ACCURACY,
      policy_answer=None if answer is None else self.architecture_facts(answer),
      finalists=self.finalists(),
    )

  def run(self):
    """Runs the remaining steps; returns the strategy's final state."""
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

    writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_writer)
    state, start = self.resume()
    logging.info(
      'search: %d steps of %d children (%d to go), T = %.3f ms from %s, %d processes',
      self.num_steps,
      self.search.children_per_step,
      self.num_steps - start,
      self.target_ms,
      self.table.path,
      self.process_count,
    )
    rewards_so_far = [
      r['reward'] for r in self.history.records if r['step'] < start and r['reward'] is not None
    ]
    self.best_reward = max(rewards_so_far, default=-math.inf)
    began = time.time()
    for step in range(start, self.num_steps):
      tokens, state = self.strategy.ask(state, self.step_size(step))
      rewards = self.evaluate_step(step, np.asarray(tokens))
      told = np.isfinite(rewards)  # a child that did not fit has no reward to learn from
      metrics = {}
      if np.any(told):
        state, metrics = self.strategy.tell(state, tokens[told], rewards[told])
        self.best_reward = max(self.best_reward, float(np.max(rewards[told])))
      state = jax.device_get(state)
      self.save(step + 1, state)
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars['best_reward'] = self.best_reward
      if np.any(told):
        scalars['step_max_reward'] = float(np.max(rewards[told]))
        scalars['step_mean_reward'] = float(np.mean(rewards[told]))  # does the policy improve?
      step_records = self.history.step_records(step)
      ok = [r for r in step_records if r['status'] == 'ok']
      if ok:
        scalars.update(
          mean_accuracy=float(np.mean([r['accuracy'] for r in ok])),
          mean_latency_ms=float(np.mean([r['latency_ms'] for r in ok])),
        )
      for status in ('failed', 'oom'):
        scalars[f'{status}_children'] = float(sum(r['status'] == status for r in step_records))
      writer.write_scalars(step + 1, scalars)
      done = step + 1 - start
      eta = (time.time() - began) / done * (self.num_steps - step - 1)
      logging.info(
        'step %d/%d: mean reward %.4f over %d children told, best %.4f; ETA %.0f s',
        step + 1,
        self.num_steps,
        float(np.mean(rewards[told])) if np.any(told) else math.nan,
        int(np.sum(told)),
        self.best_reward,
        eta,
      )
      if self.search.report_every_steps and (step + 1) % self.search.report_every_steps == 0:
        self.report(state)
    writer.flush()
    self.checkpoints.wait_until_finished()
    self.conclude(state)
    self.report(state)
    if self.is_writer:
      logging.info(
        'search done: %d children in %s; report in %s/best.md',
        len(self.history),
        self.history.path,
        self.workdir,
      )
    return state


def run(config, workdir: str, searcher=Search):
  """The 'search' job (`searcher`: oneshot.OneShotSearch for the 'oneshot' job): checks its inputs
  (see Search), then searches."""
  if not workdir:
    raise errors.UserError('the search needs --workdir=DIR (history, checkpoints and report)')
  if '://' in workdir:
    raise errors.UserError(
      f'--workdir={workdir}: expected a directory, not a URL. The search appends each child to '
      'history.jsonl and syncs it to disk at once, which an object store cannot do; on a pod '
      'slice mount the bucket with gcsfuse (or use NFS) at the same path on every host and pass '
      'that path.'
    )
  search = searcher(config, workdir)
  enable_compilation_cache(config.search, workdir)
  return search.run()
