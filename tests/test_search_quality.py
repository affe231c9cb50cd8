"""Search-quality reporting: the mean reward per controller step in best.md, and the proxy-ranking
benchmark's statistics and choice of architectures."""

import numpy as np

from mnasnet_jax import pareto
from mnasnet_jax import search
from mnasnet_jax import search_space
from mnasnet_jax.configs import search as search_config


def _record(trial, step, reward, status='ok'):
  return {
    'trial': trial,
    'step': step,
    'tokens': [trial],
    'blocks': ['r1_k3_s11_e6_i16_o16'],
    'accuracy': None if status != 'ok' else 0.5,
    'latency_ms': 1.0,
    'reward': reward,
    'params': 1,
    'macs': 1,
    'status': status,
  }


def test_mean_reward_per_step_in_best_md(tmp_path):
  # Step 0: 0.2 and 0.4; step 1: 0.6 and a failure at reward 0 (told); step 2: 0.9 and an oom child
  # (no reward, not told): means 0.3, 0.3, 0.9.
  records = [
    _record(0, 0, 0.2),
    _record(1, 0, 0.4),
    _record(2, 1, 0.6),
    _record(3, 1, 0.0, 'failed'),
    _record(4, 2, 0.9),
    _record(5, 2, None, 'oom'),
  ]
  means = pareto.mean_reward_per_step(records)
  assert [s for s, _ in means] == [0, 1, 2]
  np.testing.assert_allclose([m for _, m in means], [0.3, 0.3, 0.9])
  path = tmp_path / 'best.md'
  pareto.write_best(
    records, str(path), target_ms=1.0, top_k=2, train_config='configs/train.py', description='t'
  )
  assert (
    'Mean reward per controller step: 0.3000, 0.3000, 0.9000 (first 1 steps 0.3000, last 2 0.6000).'
    in path.read_text()
  )


def test_proxy_ranking_statistics_and_spread(benchmark_module):
  ranking = benchmark_module('proxy_ranking')
  # By hand: one discordant pair of six, Kendall 4/6; rank differences 0, 1, 1, 0, Spearman 1 - 12/60.
  got = ranking.rank_agreement([1, 2, 3, 4], [10, 30, 20, 40])
  np.testing.assert_allclose([got['kendall_tau'], got['spearman']], [4 / 6, 0.8])
  assert ranking.rank_agreement([1, 2, 3], [3, 2, 1])['kendall_tau'] == -1.0
  config = search_config.get_config('local')
  space = search_space.SearchSpace(config.search_space)
  table = search.load_table(config.latency.table)
  tokens, latency = ranking.spread_in_latency(space, table, 12, seed=0, pool=2000)
  assert tokens.shape == (12, len(space.choices)) and len({tuple(t) for t in tokens}) == 12
  np.testing.assert_allclose(latency, table.predict_tokens(space, tokens))
  assert np.all(np.diff(latency) > 0)
  # Evenly spaced quantiles of the pool: the picks span most of its range.
  pool = table.predict_tokens(
    space, np.random.default_rng(0).integers(0, space.choices, (2000, len(space.choices)))
  )
  assert latency[0] < np.quantile(pool, 0.1) and latency[-1] > np.quantile(pool, 0.9)


def test_proxy_ranking_averages_each_architectures_seeds(benchmark_module):
  ranking = benchmark_module('proxy_ranking')
  config = search_config.get_config('local')

  def result(phase, index, accuracy, seed=None):
    entry = {'phase': phase, 'index': index, 'accuracy': accuracy, 'latency_ms': 0.3, 'seconds': 1}
    entry['variant'] = 'local' if phase == 'proxy' else 'train_local'
    return entry if seed is None else {**entry, 'seed': seed}

  alone = ('train_local',)
  full = [result('full', i, a) for i, a in enumerate([0.1, 0.2, 0.3])]
  # First seeds rank the three backwards; the second seeds' means put them in order.
  first = [result('proxy', i, a) for i, a in enumerate([0.3, 0.2, 0.1])]
  second = [result('proxy', i, a, 1000 + i) for i, a in enumerate([0.0, 0.3, 0.6])]
  one = ranking.summarise(full + first, 0.3, config.reward, alone)['local']
  two = ranking.summarise(full + first + second, 0.3, config.reward, alone)['local']
  assert one['accuracy']['kendall_tau'] == -1.0 and one['proxy_seeds'] == 1
  assert two['accuracy']['kendall_tau'] == 1.0 and two['proxy_seeds'] == 2
  # Full trainings average their seeds too, and against each other they are the ceiling.
  assert two['against_itself']['kendall_tau'] == -1.0 and one['against_itself'] is None
  assert ranking.against_itself(full + first + second, 'full', alone) is None
  again = [result('full', i, a, 1000) for i, a in enumerate([0.5, 0.0, 0.1])]
  ceiling = ranking.against_itself(full + again, 'full', alone)
  np.testing.assert_allclose(ceiling['kendall_tau'], -1 / 3)
  # Proxies in the order of the full means (0.3, 0.1, 0.2), not of the first full seed's.
  proxies = [result('proxy', i, a) for i, a in enumerate([0.9, 0.1, 0.5])]
  averaged = ranking.summarise(full + again + proxies, 0.3, config.reward, alone)['local']
  assert averaged['accuracy']['kendall_tau'] == 1.0
  # Pooled over full variants: each architecture's mean of all its trainings (0.2, 0.27, 0.15), its
  # halves by seed each the mean over the variants with both seeds ((0.1, 0.2, 0.15) against
  # (0.5, 0.0, 0.15)).
  official = [
    dict(result('full', i, a, seed), variant='official_init')
    for i, a, seed in ((0, 0.0, 0), (1, 0.6, 0), (2, 0.0, 0), (2, 0.2, 1000))
  ]
  proxies = [result('proxy', i, a) for i, a in enumerate([0.2, 0.3, 0.1])]
  both = ('train_local', 'official_init')
  for variants, tau in ((alone, -1 / 3), (both, 1.0)):
    entry = ranking.summarise(full + again + official + proxies, 0.3, config.reward, variants)
    np.testing.assert_allclose(entry['local']['accuracy']['kendall_tau'], tau)
  assert ranking.against_itself(full + again + official, 'full', both)['kendall_tau'] == -1.0
