"""Evidence for the search on shared weights (oneshot.py) on the local configuration.

    python benchmarks/oneshot.py --workdir=/tmp/oneshot_bench [--multi_trial=/tmp/mnasnet_search]
        [--num_archs=20] [--reward=multi_trial|shipped] [--skip_search] [--seeds=3]
        [--search_seed=0] [--fastest_of=20000]

1. Runs `configs/search.py:oneshot_local` in WORKDIR/search (or resumes it; it is resumable), by
   default with the multi-trial search's reward (`--reward`), timing its wall clock, and reports
   the latency it converges to (mean of the last quarter of children's table latencies) against T.
2. Rank correlation: `--num_archs` architectures drawn uniformly (seeded) are measured twice: the
   shared weights' top-1 on all the one-shot search's held-out images, and top-1 of the same
   architecture proxy-trained standalone with the multi-trial local search's recipe
   (`configs/search.py:local`'s proxy, the same held-out images). Prints Kendall's tau and
   Spearman's rho between the two.
3. The answer: the one-shot search's answer (the best of its finalists, trained alone in the
   search) and, for comparison, its policy's answer (the controller's most likely architecture,
   TuNAS's) and best-rewarded child (`--best_rewarded`), each proxy-trained standalone with the
   multi-trial search's budget under `--seeds` seeds (0, 1, ...), and their rewards under the
   multi-trial search's reward. Against `--multi_trial`'s history (a workdir of
   `configs/search.py:local`) when given: its best reward over all its children, and over those it
   finished within the one-shot search's wall time (its children's times summed; run it with
   enough `--config.search.num_children` to reach it), and that best child retrained under the
   same seeds. A child's reward in the search is one training, and the best of many is the
   luckiest: the same architecture under other seeds scores some points lower (README, "Search on
   shared weights"), so the answers are compared retrained alike, by their mean reward. A control
   is retrained alike: the fastest of `--fastest_of` architectures drawn uniformly, what a search
   knowing only the latency table would answer.

4. `--imagenet_cost`: the ImageNet configurations' cost, from step times measured here at 224 px
   (`--cost_batch` images a step, the CPU's forms): the multi-trial search's proxy trainings of
   `--cost_children` children drawn uniformly from its space against the one-shot search's
   supernet steps and reward passes as the same children, both as configured (configs/search.py
   and :oneshot); the measured ratio scales the paper's 4.5 days on 64 TPUv2 (section 5) into
   TPUv2-hours. Only the ratio is measured, on a CPU, not on a TPU.

Standalone trainings take about 20 s each on an idle 2-core VM (compile most of it), so
`--num_archs=20` adds about 7 minutes, and three answers under 3 seeds 3 more. Each standalone
result is kept in WORKDIR/standalone.jsonl and reused when the benchmark runs again. The last line
is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from mnasnet_jax import allocator  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/oneshot_bench', 'Where the search and results go.')
_MULTI = flags.DEFINE_string('multi_trial', None, 'Workdir of a configs/search.py:local search.')
_NUM = flags.DEFINE_integer('num_archs', 20, 'Architectures for the rank correlation.')
_SKIP = flags.DEFINE_bool('skip_search', False, 'Use the search in WORKDIR/search as it stands.')
_SEED = flags.DEFINE_integer('seed', 1, 'Seed of the uniformly drawn architectures.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Training seeds each answer is retrained under.')
_BEST_REWARDED = flags.DEFINE_bool(
  'best_rewarded', True, "Retrain the search's best-rewarded child too."
)
_SEARCH_SEED = flags.DEFINE_integer(
  'search_seed', 0, "The one-shot search's config.search.seed and train_seed."
)
_FASTEST = flags.DEFINE_integer(
  'fastest_of',
  20_000,
  'A control retrained like the answers: the fastest of this many architectures drawn uniformly '
  '(a search that reads the latency table alone); 0: none.',
)
_REWARD = flags.DEFINE_enum(
  'reward',
  'multi_trial',
  ['multi_trial', 'shipped'],
  "The one-shot search's reward: the multi-trial search's (both then maximise the reward they "
  "are compared on) or :oneshot_local's own (TuNAS's absolute).",
)
_COST = flags.DEFINE_bool('imagenet_cost', False, "Only: estimate the ImageNet searches' cost.")
_COST_BATCH = flags.DEFINE_integer('cost_batch', 8, 'Images per timed step at 224 px.')
_COST_CHILDREN = flags.DEFINE_integer(
  'cost_children', 3, 'Children timed for the multi-trial cost.'
)
_COST_STEPS = flags.DEFINE_integer('cost_steps', 5, 'Timed steps of each program (after one).')
# The paper's search: about 8,000 children in 4.5 days on 64 TPUv2 (section 5).
PAPER_TPU_HOURS = 4.5 * 24 * 64


def seconds_per_image(program, state, args, batch: int):
  """(median seconds per image of `program(state, *args)` over the timed steps after a first, the
  state it ends with: a program returning (state, ...) gets each call's state, donated or not)."""
  import jax

  times = []
  for _ in range(_COST_STEPS.value + 1):
    start = time.perf_counter()
    state = jax.block_until_ready(program(state, *args))[0]
    times.append(time.perf_counter() - start)
  return float(np.median(times[1:])) / batch, state


def imagenet_cost() -> dict:
  """The one-shot ImageNet search's cost against the multi-trial one's, by measured step times."""
  import functools

  import jax
  import jax.numpy as jnp

  from mnasnet_jax import input_pipeline
  from mnasnet_jax import oneshot
  from mnasnet_jax import platform
  from mnasnet_jax import search_space
  from mnasnet_jax import supernet
  from mnasnet_jax import train
  from mnasnet_jax.configs import search as search_config

  multi, single = search_config.get_config(), search_config.get_config('oneshot')
  space = search_space.SearchSpace(multi.search_space)
  mesh = platform.data_mesh(jax.local_devices()[:1])
  batch, size = _COST_BATCH.value, 224
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 1000, (batch,)).astype(np.int32)
  stats = (np.full(3, 120.0, np.float32), np.full(3, 60.0, np.float32))
  data = train.shard_batch(mesh, images, labels)

  def program_and_state(config, model, state_model=None, step=None, extra_args=0):
    """`model`'s train step (`step`, taking `extra_args` batch arguments first) and a fresh state."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch
    tx, schedule = train.create_optimizer(config, 300.0)
    state = train.create_state(state_model or model, tx, size, bool(config.ema_decay), 0, mesh)
    program = train.train_program(
      config, model, tx, schedule, mesh, None, stats, step, 2 + extra_args
    )
    return program, state

  drawn = [[int(rng.integers(n)) for n in space.choices] for _ in range(_COST_CHILDREN.value)]
  children = []
  for tokens in drawn:
    model = train.create_model(multi.proxy, space.decode(tokens), 1000)
    children.append(seconds_per_image(*program_and_state(multi.proxy, model), data, batch)[0])
    logging.info('child %d: %.4f s an image', len(children), children[-1])
  # The supernet as each of the same children: a step runs the child's ops (supernet.switch).
  net = supernet.create(single.proxy, space, 1000)
  first = supernet.Child(net, jnp.zeros(len(space.choices), jnp.int32))
  program, state = program_and_state(single.proxy, net, first, oneshot.train_step, 1)
  reward = train.data_parallel(
    functools.partial(oneshot.reward_step, net=net, image_stats=stats), mesh, 4
  )
  mask = train.shard_batch(mesh, np.ones(batch, np.float32))
  trains, rewards = [], []
  for tokens in drawn:
    (rows,) = train.shard_batch(mesh, np.asarray([tokens], np.int32))
    seconds, state = seconds_per_image(program, state, (rows, *data), batch)
    trains.append(seconds)
    rewards.append(
      seconds_per_image(lambda s, *a: (s, reward(s, *a)), state, (rows, *data, *mask), batch)[0]
    )
  super_train, super_reward = float(np.mean(trains)), float(np.mean(rewards))
  logging.info('supernet: %.4f s an image training, %.4f rewarding', super_train, super_reward)

  train_images = input_pipeline.IMAGENET_SIZES['train'] - multi.data.holdout
  child_seconds = float(np.mean(children))
  multi_images = multi.search.num_children * multi.proxy.num_epochs * train_images
  o = single.oneshot
  supernet_images = single.proxy.batch_size * (
    o.warmup_steps + single.search.num_children * o.train_steps_per_child
  )
  reward_images = single.search.num_children * o.eval_batches * o.eval_batch_size
  finalist_images = o.finalists * o.finalist_proxy.num_epochs * train_images
  multi_seconds = multi_images * child_seconds
  single_seconds = (
    supernet_images * super_train + reward_images * super_reward + finalist_images * child_seconds
  )
  ratio = single_seconds / multi_seconds
  return {
    'cost_batch': batch,
    'child_seconds_per_image': [round(c, 5) for c in children],
    'supernet_train_seconds_per_image': [round(t, 5) for t in trains],
    'supernet_reward_seconds_per_image': [round(r, 5) for r in rewards],
    'multi_trial_images': multi_images,
    'oneshot_supernet_images': supernet_images,
    'oneshot_epochs': round(supernet_images / train_images, 1),
    'oneshot_reward_images': reward_images,
    'oneshot_finalist_images': finalist_images,
    'cost_ratio': round(ratio, 5),
    'paper_tpuv2_hours': PAPER_TPU_HOURS,
    'oneshot_tpuv2_hours_estimate': round(ratio * PAPER_TPU_HOURS, 1),
  }


def standalone_accuracy(cache_path, config, arch_blocks, data, key, seed=0):
  """Top-1 of `arch_blocks` proxy-trained standalone with `seed` (cached in `cache_path` by `key`
  and the seed)."""
  from mnasnet_jax import models
  from mnasnet_jax import train

  done = {}
  if os.path.exists(cache_path):
    for line in open(cache_path):
      record = json.loads(line)
      done[record['key']] = record
  key = f'{key}-seed{seed}'
  if key in done:
    return done[key]['accuracy']
  arch = models.Architecture(tuple(arch_blocks), stem_filters=config.search_space.stem_filters)
  result = train.proxy_train(config.proxy, arch, data, seed=seed)
  with open(cache_path, 'a') as f:
    f.write(json.dumps({'key': key, 'blocks': list(arch_blocks), **result}) + '\n')
  return result['accuracy']


def multi_trial(workdir: str, seconds: float | None) -> dict:
  """The multi-trial search's best reward: over all its children, and over those it finished
  within `seconds` (its children's own times summed in trial order: the equal wall time)."""
  from mnasnet_jax import history

  records = sorted(history.read(os.path.join(workdir, 'history.jsonl')), key=lambda r: r['trial'])
  elapsed = np.cumsum([r['eval_seconds'] for r in records])
  rewarded = [r for r in records if r['reward']]
  by_reward = lambda r: r['reward']
  result = {
    'multi_trial_children': len(records),
    'multi_trial_seconds': round(float(elapsed[-1]), 1),
    'multi_trial_best_reward': max(rewarded, key=by_reward)['reward'],
  }
  if seconds is not None:
    within = [r for r, t in zip(records, elapsed) if t <= seconds and r['reward']]
    result['multi_trial_children_at_equal_time'] = len(within)
    if elapsed[-1] < seconds:
      logging.warning('the multi-trial search took %.0f s, less than %.0f s', elapsed[-1], seconds)
    if within:
      rewarded = within
      best = max(within, key=by_reward)
      result.update(
        multi_trial_best_reward_at_equal_time=best['reward'],
        multi_trial_best_at_equal_time=[best['accuracy'], best['latency_ms']],
      )
  result['multi_trial_best_blocks'] = max(rewarded, key=by_reward)['blocks']
  return result


def fastest_drawn(searcher, num: int) -> list[str]:
  """The blocks of the lowest table latency among `num` architectures drawn uniformly (seed 0)."""
  rng = np.random.default_rng(0)
  space = searcher.space
  draws = (space.decode([int(rng.integers(n)) for n in space.choices]) for _ in range(num))
  return min(draws, key=lambda blocks: searcher.table.predict(searcher.architecture(blocks)))


def retrained(cache_path, config, blocks, data, name, latency_ms, target_ms) -> dict:
  """`blocks` proxy-trained standalone under seeds 0 .. --seeds - 1: accuracies and rewards under
  `config`'s reward, and their means."""
  from mnasnet_jax import reward as reward_lib

  accuracies = [
    standalone_accuracy(cache_path, config, blocks, data, f'arch-{list(blocks)}', seed)
    for seed in range(_SEEDS.value)
  ]
  rewards = [float(reward_lib.compute(config.reward, a, latency_ms, target_ms)) for a in accuracies]
  logging.info('%s: standalone %s, rewards %s', name, accuracies, rewards)
  return {
    f'{name}_latency_ms': latency_ms,
    f'{name}_standalone_accuracy': [round(a, 4) for a in accuracies],
    f'{name}_standalone_reward': [round(r, 4) for r in rewards],
    f'{name}_mean_reward': round(float(np.mean(rewards)), 4),
  }


def main(argv):
  del argv
  import jax
  from scipy import stats

  from mnasnet_jax import history
  from mnasnet_jax import oneshot
  from mnasnet_jax import search
  from mnasnet_jax.configs import search as search_config

  if _COST.value:
    print(json.dumps(imagenet_cost()))
    return
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  config = search_config.get_config('oneshot_local')
  multi = search_config.get_config('local')
  if _REWARD.value == 'multi_trial':
    config.reward = multi.reward
  config.search.seed = config.search.train_seed = _SEARCH_SEED.value
  search_dir = os.path.join(workdir, 'search')
  result = {'devices': jax.device_count(), 'cpu_count': os.cpu_count()}
  timing = os.path.join(workdir, 'search_seconds.json')  # a search's own, not a resumed one's
  if not _SKIP.value:
    start = time.time()
    oneshot.run(config, search_dir)
    with open(timing, 'w') as f:
      json.dump(round(time.time() - start, 1), f)
  if os.path.exists(timing):
    with open(timing) as f:
      result['search_wall_seconds'] = json.load(f)
  records = [r for r in history.read(os.path.join(search_dir, 'history.jsonl')) if r['reward']]
  searcher = oneshot.OneShotSearch(config, search_dir)
  strategy_state, _ = searcher.resume()  # the finished supernet and controller
  quarter = records[-max(1, len(records) // 4) :]
  result.update(
    children=len(records),
    target_ms=searcher.target_ms,
    converged_latency_ms=float(np.mean([r['latency_ms'] for r in quarter])),
    first_quarter_latency_ms=float(
      np.mean([r['latency_ms'] for r in records[: max(1, len(records) // 4)]])
    ),
  )

  data = searcher.data
  cache_path = os.path.join(workdir, 'standalone.jsonl')
  all_batches = len(searcher.held_out)
  rng = np.random.default_rng(_SEED.value)
  shared, alone = [], []
  for i in range(_NUM.value):
    tokens = [int(rng.integers(n)) for n in searcher.space.choices]
    blocks = searcher.space.decode(tokens)
    shared.append(searcher.shared_accuracy(0, tokens, all_batches))
    alone.append(standalone_accuracy(cache_path, multi, blocks, data, f'uniform-{i}-{tokens}'))
    logging.info('arch %d: shared %.4f, standalone %.4f', i, shared[-1], alone[-1])
  if len(shared) >= 2:
    result['kendall_tau'] = float(stats.kendalltau(shared, alone).statistic)
    result['spearman'] = float(stats.spearmanr(shared, alone).statistic)
    result['shared_accuracy'] = [round(a, 4) for a in shared]
    result['standalone_accuracy'] = [round(a, 4) for a in alone]

  target = search.target_latency(multi.reward, searcher.table)
  best = max(records, key=lambda r: r['reward'])
  result.update(best_trial=best['trial'], best_shared_accuracy=best['accuracy'])
  answer = searcher.strategy.most_likely(strategy_state)
  answers = {}
  with open(os.path.join(search_dir, 'pareto.json')) as f:
    finalists = json.load(f).get('finalists')
  if finalists:  # by reward, the answer first
    answers['answer'] = finalists[0]['blocks']
    result['finalist_rewards'] = [round(r['reward'], 4) for r in finalists]
  if answer is not None:
    answers['policy_answer'] = searcher.space.decode(answer)
  if _BEST_REWARDED.value:
    answers['best_rewarded'] = best['blocks']
  if _MULTI.value:
    result.update(multi_trial(_MULTI.value, result.get('search_wall_seconds')))
    answers['multi_trial_best'] = result.pop('multi_trial_best_blocks')
  if _FASTEST.value:
    answers['fastest_drawn'] = fastest_drawn(searcher, _FASTEST.value)
  for name, blocks in answers.items():
    result[f'{name}_blocks'] = blocks
    latency_ms = float(searcher.table.predict(searcher.architecture(blocks)))
    result.update(retrained(cache_path, multi, blocks, data, name, latency_ms, target))
  if _MULTI.value:
    for name in ('answer', 'policy_answer'):
      if name in answers:
        result[f'{name}_reaches_multi_trial'] = bool(
          result[f'{name}_mean_reward'] >= result['multi_trial_best_mean_reward']
        )
  print(json.dumps(result))


if __name__ == '__main__':
  allocator.use_tcmalloc()
  app.run(main)
