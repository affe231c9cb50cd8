"""Evidence for the search on shared weights (oneshot.py) on the local configuration.

    python benchmarks/oneshot.py --workdir=/tmp/oneshot_bench [--multi_trial=/tmp/mnasnet_search]
        [--num_archs=20] [--skip_search]

1. Runs `configs/search.py:oneshot_local` in WORKDIR/search (or resumes it; it is resumable), timing
   its wall clock, and reports the latency it converges to (mean of the last quarter of children's
   table latencies) against T.
2. Rank correlation: `--num_archs` architectures drawn uniformly (seeded) are measured twice: the
   shared weights' top-1 on all the one-shot search's held-out images, and top-1 of the same
   architecture proxy-trained standalone with the multi-trial local search's recipe
   (`configs/search.py:local`'s proxy, the same held-out images). Prints Kendall's tau and
   Spearman's rho between the two.
3. The answer: the one-shot search's best child (by its reward) proxy-trained standalone with the
   multi-trial search's budget, and its reward under the multi-trial search's reward, against the
   best reward in `--multi_trial`'s history (a workdir of `configs/search.py:local`) when given.

Standalone trainings take about 20 s each on an idle 2-core VM (compile most of it), so
`--num_archs=20` adds about 7 minutes. Each standalone result is kept in
WORKDIR/standalone.jsonl and reused when the benchmark runs again. The last line is one JSON object.
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


def standalone_accuracy(cache_path, config, arch_blocks, data, key):
  """Top-1 of `arch_blocks` proxy-trained standalone (cached in `cache_path` by `key`)."""
  from mnasnet_jax import models
  from mnasnet_jax import train

  done = {}
  if os.path.exists(cache_path):
    for line in open(cache_path):
      record = json.loads(line)
      done[record['key']] = record
  if key in done:
    return done[key]['accuracy']
  arch = models.Architecture(tuple(arch_blocks), stem_filters=config.search_space.stem_filters)
  result = train.proxy_train(config.proxy, arch, data, seed=config.search.train_seed)
  with open(cache_path, 'a') as f:
    f.write(json.dumps({'key': key, 'blocks': list(arch_blocks), **result}) + '\n')
  return result['accuracy']


def main(argv):
  del argv
  import jax
  from scipy import stats

  from mnasnet_jax import history
  from mnasnet_jax import oneshot
  from mnasnet_jax import reward as reward_lib
  from mnasnet_jax.configs import search as search_config

  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  config = search_config.get_config('oneshot_local')
  search_dir = os.path.join(workdir, 'search')
  result = {'devices': jax.device_count(), 'cpu_count': os.cpu_count()}
  if not _SKIP.value:
    start = time.time()
    oneshot.run(config, search_dir)
    result['search_wall_seconds'] = round(time.time() - start, 1)
  records = [r for r in history.read(os.path.join(search_dir, 'history.jsonl')) if r['reward']]
  searcher = oneshot.OneShotSearch(config, search_dir)
  searcher.resume()  # the finished supernet from its last checkpoint
  quarter = records[-max(1, len(records) // 4) :]
  result.update(
    children=len(records),
    target_ms=searcher.target_ms,
    converged_latency_ms=float(np.mean([r['latency_ms'] for r in quarter])),
    first_quarter_latency_ms=float(
      np.mean([r['latency_ms'] for r in records[: max(1, len(records) // 4)]])
    ),
  )

  multi = search_config.get_config('local')
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

  best = max(records, key=lambda r: r['reward'])
  accuracy = standalone_accuracy(cache_path, multi, best['blocks'], data, f'best-{best["tokens"]}')
  target = searcher.target_ms if multi.reward.target_ms is None else multi.reward.target_ms
  result.update(
    best_trial=best['trial'],
    best_blocks=best['blocks'],
    best_latency_ms=best['latency_ms'],
    best_shared_accuracy=best['accuracy'],
    best_standalone_accuracy=accuracy,
    best_standalone_reward=float(
      reward_lib.compute(multi.reward, accuracy, best['latency_ms'], target)
    ),
  )
  if _MULTI.value:
    multi_records = history.read(os.path.join(_MULTI.value, 'history.jsonl'))
    result['multi_trial_best_reward'] = max(r['reward'] for r in multi_records if r['reward'])
  print(json.dumps(result))


if __name__ == '__main__':
  allocator.use_tcmalloc()
  app.run(main)
