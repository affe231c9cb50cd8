"""Does the local proxy rank children as full training does? Kendall tau and Spearman on real runs.

    python benchmarks/proxy_ranking.py --workdir=/tmp/proxy_ranking [--num_archs=12]
        [--variants=local,ends_at_peak] [--proxy_seeds=1] [--full_variants=train_local]
        [--full_seeds=1] [--phases=proxy,full] [--config.proxy.X=Y]

A search is only as good as the agreement between a child's proxy accuracy (what the controller
is told) and the accuracy it reaches when trained in full (what the user gets). This measures it on
the local task: `--num_archs` architectures of configs/search.py:local's space, spread in latency (the
table's latencies of uniform samples, taken at evenly spaced quantiles), each

- scored by the local proxy (`train.proxy_train` with the search config's proxy section, on the
  search split: the proxy-training part, evaluated on the held-out part), once per proxy variant
  and seed (`--proxy_seeds`: averaging seeds shows how much of the disagreement is seed noise, and
  a proxy's first seed against its second how much of its ranking is the architectures');
- trained with configs/train.py:local (`train.train_and_evaluate`: all of Fashion-MNIST train,
  evaluated on its 10,000 test images), in WORKDIR/full/N (further seeds in WORKDIR/full/N_seedS,
  other FULL_VARIANTS in WORKDIR/full/VARIANT_N...), so an interrupted training resumes from its
  checkpoint; with `--full_seeds=2` or more, a full accuracy is the mean of its seeds, and the full
  trainings' first seeds against their second show how steady the ranking they give is. With two
  or more full variants recorded, they are also pooled: an architecture's full accuracy is then the
  mean of all its trainings, the init range being a nuisance as the seed is.

Every result is appended to WORKDIR/results.jsonl the moment it exists, and a rerun skips what is
there, so the measurement resumes where it stopped (runs with another --num_archs or --arch_seed need
another workdir). Whatever is complete is summarised at the end of every run: for each proxy
variant, Kendall tau and Spearman between proxy and full accuracy and between proxy and full
reward (both rewards with the table's latency and the search's T), over the architectures that have
both, and the proxy against itself; then full training against itself and what the full
measurement costs here and on ImageNet; all of it against each full-training variant recorded. The
last line printed is one JSON object.

The variants (VARIANTS, overrides of the proxy section) are the changes to measure within the local
search's time budget: proxy steps, learning rate, BN re-estimation, held-out images scored.
Measured 2026-12-05/06 (12 architectures, 3 proxy seeds each, 2 full seeds; README, "Proxy
ranking"): the proxy until then (`ends_at_peak`) ended its 100 steps at its peak rate, and its first
seed ranked the 12 against its second at Kendall -0.24 (per-architecture spread between seeds 11
points, between architectures' means 7); the shipped one decays the rate 3% a step from the first
(`local`, peak 0.008 at batch 64) at the same cost: against itself 0.58 (spreads 2 and 4 points), at
peak 0.004 (`lr0.016`) 0.35, and with its classifier started in ImageNet's range (`imagenet_init`)
0.31. Full training with the official range (`official_init`) ranked 9 of the 12 against its second
seed at Kendall 0.11; started in ImageNet's range, as configs/train.py:local now is, at 0.53 (all 12),
and the shipped proxy ranks them against it at 0.55, `ends_at_peak` at 0.24.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np
import scipy.stats

from mnasnet_jax import input_pipeline
from mnasnet_jax import models
from mnasnet_jax import reward
from mnasnet_jax import search as search_lib
from mnasnet_jax import search_space
from mnasnet_jax import train
from mnasnet_jax.configs import search as search_configs
from mnasnet_jax.configs import train as train_configs

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  os.path.join(os.path.dirname(__file__), '..', 'configs', 'search.py') + ':local',
  'The search config whose space, latency table, reward and proxy are measured.',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where results.jsonl and the full trainings go.')
_NUM_ARCHS = flags.DEFINE_integer('num_archs', 12, 'Architectures measured, spread in latency.')
_ARCH_SEED = flags.DEFINE_integer('arch_seed', 0, 'Seed of the uniform samples they come from.')
_VARIANTS = flags.DEFINE_list('variants', ['local'], 'Proxy variants to score (VARIANTS).')
_PHASES = flags.DEFINE_list('phases', ['proxy', 'full'], 'proxy, full or both, in that order.')
_PROXY_SEEDS = flags.DEFINE_integer(
  'proxy_seeds', 1, 'Proxy trainings per architecture and variant; their accuracies are averaged.'
)
_FULL_SEEDS = flags.DEFINE_integer(
  'full_seeds', 1, 'Full trainings per architecture; their accuracies are averaged.'
)
_FULL_VARIANTS = flags.DEFINE_list(
  'full_variants', ['train_local'], 'Full-training variants to run (FULL_VARIANTS).'
)
_FULL_STEPS = flags.DEFINE_integer(
  'full_steps', 0, "Steps of each full training; 0: configs/train.py:local's own (10 epochs)."
)

# The local proxy until 2026-12-06: the recipe's 0.1-epoch warm-up and decay every 0.5 epochs, so
# its 100 steps ended at the peak rate, 0.016 per 256 images.
ENDS_AT_PEAK = {'warmup_epochs': 0.1, 'lr_decay_epochs': 0.5, 'base_learning_rate': 0.016}
# Overrides of config.proxy; 'local' is the search's proxy as configured.
VARIANTS = {
  'local': {},
  'lr0.016': {'base_learning_rate': 0.016},
  # The local recipe's classifier range (ImageNet's), not the official rule's for 10 classes.
  'imagenet_init': {
    'classifier_init_range': train_configs.get_config('local').classifier_init_range
  },
  'ends_at_peak': ENDS_AT_PEAK,
  'ends_at_peak_steps300': {**ENDS_AT_PEAK, 'num_steps': 300},
  'ends_at_peak_lr0.008': {**ENDS_AT_PEAK, 'base_learning_rate': 0.008},
  'ends_at_peak_lr0.032': {**ENDS_AT_PEAK, 'base_learning_rate': 0.032},
  'ends_at_peak_no_bn_reestimation': {**ENDS_AT_PEAK, 'bn_recalibration_batches': 0},
  'ends_at_peak_eval10000': {**ENDS_AT_PEAK, 'eval_examples': 10_000},
}
# Overrides of configs/train.py:local; 'train_local' is it as configured (ImageNet's classifier range
# since 2026-12-06), 'official_init' the official rule's range, as it was until then.
FULL_VARIANTS = {'train_local': {}, 'official_init': {'classifier_init_range': None}}
# The paper's search: about 8,000 children of 5 ImageNet epochs in 4.5 days on 64 TPUv2 (paper,
# section 5), which prices an ImageNet epoch in TPUv2-hours.
PAPER_CHILDREN, PAPER_EPOCHS, PAPER_DEVICE_HOURS = 8000, 5.0, 4.5 * 24 * 64


def spread_in_latency(space, table, count: int, seed: int, pool: int = 20_000):
  """Token rows of `count` distinct architectures whose latencies sit at evenly spaced quantiles
  of `pool` uniform samples (the latency range a search meets, not its extremes)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, space.choices, (pool, len(space.choices)))
  latency = table.predict_tokens(space, tokens)
  order = np.argsort(latency, kind='stable')
  picks = order[((np.arange(count) + 0.5) / count * pool).astype(int)]
  return tokens[picks], latency[picks]


def rank_agreement(x, y) -> dict:
  """Kendall tau (b) and Spearman rho of two paired samples."""
  return {
    'kendall_tau': float(scipy.stats.kendalltau(x, y).statistic),
    'spearman': float(scipy.stats.spearmanr(x, y).statistic),
    'n': len(x),
  }


def seeds(first: int, count: int) -> range:
  """`count` training seeds: `first`, plus 1000 for each further one. An architecture's proxies
  start at its index, its full trainings at configs/train.py's seed 0."""
  return range(first, first + 1000 * count, 1000)


def first_seed(phase: str, index: int) -> int:
  return index if phase == 'proxy' else 0


def run_key(entry: dict) -> tuple:
  """What identifies a result for resuming; one recorded before seeds were ran with its phase's
  first seed."""
  phase, index = entry['phase'], entry['index']
  return phase, entry['variant'], index, entry.get('seed', first_seed(phase, index))


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def by_seed(results: list[dict], phase: str, variants) -> dict:
  """{index: {(variant, seed): result}} of one phase and the named variants."""
  out = {}
  for r in results:
    if r['phase'] == phase and r['variant'] in variants:
      out.setdefault(r['index'], {})[r['variant'], run_key(r)[3]] = r
  return out


def mean_accuracy(runs: dict) -> dict:
  """{index: its runs' mean accuracy} of `by_seed`'s {index: {(variant, seed): result}}."""
  return {i: float(np.mean([r['accuracy'] for r in s.values()])) for i, s in runs.items()}


def against_itself(results: list[dict], phase: str, variants) -> dict | None:
  """A phase's first seeds against its second ones (each the mean over the variants that have
  both), over the architectures that have both (None under three): how much of the ranking is
  the architectures' and not the seeds'; for full training, about the most a proxy can show."""
  halves = ([], [])
  for i, runs in sorted(by_seed(results, phase, variants).items()):
    pairs = [[runs.get((v, s)) for s in seeds(first_seed(phase, i), 2)] for v in variants]
    pairs = [p for p in pairs if all(p)]
    if pairs:
      for k, half in enumerate(halves):
        half.append(np.mean([p[k]['accuracy'] for p in pairs]))
  return rank_agreement(*halves) if len(halves[0]) >= 3 else None


def summarise(results: list[dict], target_ms: float, reward_config, full_variants) -> dict:
  """Each proxy variant's agreement with full training (each architecture's mean over
  `full_variants`' trainings), and with itself."""
  full = mean_accuracy(by_seed(results, 'full', full_variants))
  latency_ms = {r['index']: r['latency_ms'] for r in results}
  out = {}
  for name in sorted({r['variant'] for r in results if r['phase'] == 'proxy'}):
    runs = by_seed(results, 'proxy', (name,))
    proxy = mean_accuracy(runs)
    both = sorted(set(proxy) & set(full))
    seconds = [r['seconds'] for s in runs.values() for r in s.values()]
    entry = {
      'proxies': len(proxy),
      'proxy_seeds': len(seconds) / len(proxy),
      'proxy_seconds_each': float(np.mean(seconds)),
      'against_itself': against_itself(results, 'proxy', (name,)),
    }
    if len(both) >= 3:
      latency = np.array([latency_ms[i] for i in both])
      acc_proxy = np.array([proxy[i] for i in both])
      acc_full = np.array([full[i] for i in both])
      rewards = [
        np.asarray(reward.compute(reward_config, a, latency, target_ms), np.float64)
        for a in (acc_proxy, acc_full)
      ]
      entry['accuracy'] = rank_agreement(acc_proxy, acc_full)
      entry['reward'] = rank_agreement(*rewards)
    out[name] = entry
  return out


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  config = _CONFIG.value
  for flag, known in ((_VARIANTS, VARIANTS), (_FULL_VARIANTS, FULL_VARIANTS)):
    unknown = [v for v in flag.value if v not in known]
    if unknown:
      raise app.UsageError(f'unknown --{flag.name} {unknown}: expected some of {sorted(known)}')
  os.makedirs(_WORKDIR.value, exist_ok=True)
  # Each architecture's seeds and variants train the same programs: compiled once, as the search's.
  search_lib.enable_compilation_cache(config.search, _WORKDIR.value)
  path = os.path.join(_WORKDIR.value, 'results.jsonl')
  space = search_space.SearchSpace(config.search_space)
  table = search_lib.load_table(config.latency.table)
  target_ms = search_lib.target_latency(config.reward, table)
  tokens, latencies = spread_in_latency(space, table, _NUM_ARCHS.value, _ARCH_SEED.value)
  archs = [space.decode(t) for t in tokens]
  done = {run_key(r) for r in read_results(path)}

  def measure(phase, name, index, seed, run):
    """Records `run()`'s accuracy as `phase`/`name`'s of architecture `index` at `seed`, unless it
    is recorded already."""
    if run_key({'phase': phase, 'variant': name, 'index': index, 'seed': seed}) in done:
      return
    started = time.time()
    result = run()
    entry = {'index': index, 'blocks': archs[index], 'latency_ms': float(latencies[index])}
    entry.update(phase=phase, variant=name, seed=seed, accuracy=float(result['accuracy']))
    entry['seconds'] = time.time() - started
    if 'compile_seconds' in result:
      entry['compile_seconds'] = float(result['compile_seconds'])
    with open(path, 'a') as f:
      f.write(json.dumps(entry) + '\n')
    logging.info('%s', entry)

  if 'proxy' in _PHASES.value:
    data = input_pipeline.create_proxy_data(config.data)
    for name in _VARIANTS.value:
      proxy = config.proxy.copy_and_resolve_references()
      proxy.update(VARIANTS[name])
      for i, blocks in enumerate(archs):
        arch = models.Architecture(tuple(blocks), stem_filters=space.stem_filters)
        for seed in seeds(first_seed('proxy', i), _PROXY_SEEDS.value):
          measure('proxy', name, i, seed, lambda: train.proxy_train(proxy, arch, data, seed=seed))
  if 'full' in _PHASES.value:
    for name in _FULL_VARIANTS.value:
      for seed in seeds(first_seed('full', 0), _FULL_SEEDS.value):
        for i, blocks in enumerate(archs):
          train_config = train_configs.get_config('local')
          train_config.update(FULL_VARIANTS[name])
          train_config.arch = ','.join(blocks)
          train_config.seed = seed
          if _FULL_STEPS.value:
            train_config.num_steps = _FULL_STEPS.value
          run = str(i) if seed == first_seed('full', i) else f'{i}_seed{seed}'
          workdir = os.path.join(
            _WORKDIR.value, 'full', run if name == 'train_local' else f'{name}_{run}'
          )
          measure('full', name, i, seed, lambda: train.train_and_evaluate(train_config, workdir))

  results = read_results(path)
  report = {}
  trained = sorted({r['variant'] for r in results if r['phase'] == 'full'})
  # Each variant alone, then (with two or more) every full training pooled: the init range and the
  # seed both nuisances, each architecture's mean of all its trainings the steadier ground truth.
  grounds = {name: (name,) for name in trained}
  if len(trained) > 1:
    grounds['pooled'] = tuple(trained)
  for full_name, variants in grounds.items():
    full = [r for r in results if r['phase'] == 'full' and r['variant'] in variants]
    summary = summarise(results, target_ms, config.reward, variants)
    print(f'against full training {full_name} ({"+".join(variants)}):')
    for name, entry in summary.items():
      figures = ''.join(
        f'; {what.replace("_", " ")}: Kendall tau {entry[what]["kendall_tau"]:.3f}, Spearman '
        f'{entry[what]["spearman"]:.3f} (n={entry[what]["n"]})'
        for what in ('accuracy', 'reward', 'against_itself')
        if entry.get(what)
      )
      print(
        f'  proxy {name}: {entry["proxies"]} scored ({entry["proxy_seeds"]:g} seeds each), '
        f'{entry["proxy_seconds_each"]:.0f} s each{figures}'
      )
    seconds = float(np.mean([r['seconds'] for r in full]))
    print(
      f'  {len({r["index"] for r in full})} of {_NUM_ARCHS.value} trained in full ({len(full)} '
      f'trainings), {seconds:.0f} s each (on this machine, as loaded as it was)'
    )
    ceiling = against_itself(results, 'full', variants)
    if ceiling:
      print(
        f'  {full_name} against itself (seeds 0 and 1000): Kendall tau '
        f'{ceiling["kendall_tau"]:.3f}, Spearman {ceiling["spearman"]:.3f} (n={ceiling["n"]}): '
        'how steady the ranking of half its trainings is'
      )
    report[full_name] = {
      'variants': summary,
      'trained': len(full),
      'against_itself': ceiling,
      'seconds_each': seconds,
    }
  # The same measurement on ImageNet: each architecture's 5-epoch proxy plus its full training.
  proxy_epochs = search_configs.get_config().proxy.num_epochs
  full_epochs = train_configs.get_config().num_epochs
  epochs = _NUM_ARCHS.value * (proxy_epochs + full_epochs)
  device_hours = epochs * PAPER_DEVICE_HOURS / (PAPER_CHILDREN * PAPER_EPOCHS)
  print(
    f'on ImageNet: {_NUM_ARCHS.value} x ({proxy_epochs:g} + {full_epochs:g}) = '
    f"{epochs:g} ImageNet epochs, about {device_hours:,.0f} TPUv2-device-hours at the paper's "
    'search rate'
  )
  print(
    json.dumps(
      {
        'num_archs': _NUM_ARCHS.value,
        'target_ms': target_ms,
        'full': report,
        'imagenet_epochs': epochs,
        'imagenet_tpuv2_device_hours': device_hours,
        'devices': str(jax.devices()[0]),
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
