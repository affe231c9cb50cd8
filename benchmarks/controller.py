"""Sample efficiency of the search strategies, asked for children as the search asks for them, on two
surrogate problems over the default space.

    python benchmarks/controller.py [--samples=5000] [--seeds=5] [--batches=64,4,1]
        [--strategies=ppo,evolution,random] [--surrogates=neighbours,all_pairs]
        [--config.controller.ppo.X=Y]

Every child of a search costs a proxy training, and the search asks its strategy for
`children_per_step` children at a time (64 by default, 4 locally) and trains them in parallel
before it tells their rewards: the number of children a strategy needs, asked in those batches, is
the search's cost. Each strategy is run here for the same budget and seeds in batches of 64, 4 and
1 (the last for reference); all the seeds of one strategy and batch run as one jitted, vmapped scan
of ask -> surrogate reward -> tell, the strategies' own jitted ask and tell inside it.

The problem: the default search space (7 blocks x 432 choices) at 224 px, rewarded by the paper's
soft reward ACC * (LAT / T)^-0.07. LAT is proportional to the exact multiply-adds of the decoded
network (the same per-layer cost as `models.summary`, checked against it here), scaled so that
mobilenet_v2 takes T = 75 ms. ACC is a fixed, deterministic stand-in for proxy accuracy with the
shape real searches see: each block adds capacity with diminishing returns (a log of its
multiply-adds, so more layers, width and expansion help less and less), each block has its own
taste in conv op, kernel, SE and skip (seeded tables), removing a block costs accuracy, and adjacent
blocks interact (a seeded table over the (conv op, kernel) pairs of neighbours).

`neighbours`: that accuracy. It is a sum of per-block and neighbour terms and the reward grows with
ACC and falls with multiply-adds, so the exact optimum is found by dynamic programming over the
blocks, keeping for each state (width leaving the block, its conv op and kernel) the Pareto front
of (ACC so far, multiply-adds so far). The optimum's tokens are scored again by the plain
evaluator: both must agree.
`all_pairs`: the same plus a seeded (conv op, kernel) interaction between every two blocks that are
not neighbours (15 more tables), so that no strategy is favoured by near-additivity. No dynamic
programme applies; its reference optimum is the best of 20 long runs (4 x --samples each) of the
strategy that does best here, regularised evolution asked one child at a time, each run's best then
improved by block-wise coordinate ascent (every one of a block's 432 choices, block after block,
until no block changes). The same procedure on `neighbours` is checked against the exact optimum.

Reported per surrogate, strategy and batch, median [min, max] over seeds: samples until the best
reward seen is within 1% and within 0.5% of the optimum (never: counted as infinite; the median is
'never' when over half the seeds never get there), and the best reward / optimum after 500, 1,000,
2,000 and all samples. The last line printed is one JSON object.

Measured 2026-12-02 on this 2-core VM shared with other helpers' jobs (load average 15-20, so the
seconds printed are not figures), 5,000 samples, 5 seeds; samples to within 1% and 0.5%, median
[min, max], 'never' = not within 5,000; then best reward / optimum after 1,000, 2,000 and 5,000
samples, median.

PPO at batch 64 on `neighbours`, one change at a time from the previous defaults:
- previous defaults (lr 2e-3, 2 epochs of minibatches of 32, moving-average baseline 0.9, entropy
  1e-4, raw advantages): 2,307 [1,784, 3,259]; 0.5%: 4,136 (2 seeds never); 0.9732, 0.9895, 0.9957.
- advantages divided by the batch's reward spread: 2,204 [2,076, 2,282]; 3,992 (1 never); 0.9707,
  0.9866, 0.9958: next to no effect.
- that, with lr 5e-3 and 4 epochs (four times the movement per batch): within 1% on 1 seed of 5
  (2,549); 0.9627, 0.9793, 0.9875: the policy collapses early onto a worse network.
- advantages normalised and only each batch's top quarter learnt from (top_fraction 0.25, the
  risk-seeking policy gradient): 1,298 [1,049, 1,546]; 1,624 (2 never); 0.9828, 0.9958, 0.9995.
  A search keeps its best child, not its mean one; learning from the best quarter chases the
  maximum. These were the defaults of 2026-12-02.
- regularised evolution at batch 64, for comparison: 1,534 [1,287, never] (1 never); 0.5%: never
  (2 of 5 within); 0.9825, 0.9908, 0.9915.
On `all_pairs` at batch 64 (reference 0.84197): PPO with those defaults 1,503 [1,280, 1,618],
every seed within 1%; 0.9812, 0.9931, 0.9941. Evolution 1,385 [919, never] (2 of 5 never); 0.9793,
0.9929, 0.9933. The previous PPO defaults were not run on it.
At batch 4 those defaults do poorly (a top quarter of 4 is one child): `neighbours` never [2,432,
never], 0.9866 at 5,000; `all_pairs` 2,997 [1,964, never], 0.9909.

PPO at batch 64 again, 2026-12-05 on a quiet 2-core AMD EPYC VM, 10 seeds, one change set at a time
from the 2026-12-02 defaults; samples to within 1% (median, seeds never within), to 0.5%, on
`neighbours` then `all_pairs` (0.5% on `all_pairs`: never for every variant):
- the 2026-12-02 defaults: 1,284 (0), 1,744 (4 never); 1,487 (0).
- top_fraction 0.125 (5 seeds): 1,014, 1,640; 3,130 (1 of 5 never). 0.375 (5 seeds): 1,316; 1,605.
- entropy weight 1e-3 (5 seeds): 1,157, 1,477; 1,555 (1 of 5). 0 (5 seeds): 1,298; 1,503.
- lr 1.5e-3 (5 seeds): 1,391; 2,004 (1 of 5). lr 2.5e-3 (5 seeds): 1,280; 1,466 (1 of 5). lr 3e-3:
  1,072 (0), 1,623 (3); 1,398 (1). lr 4e-3 (5 seeds): 1,151; 1,274.
- 3 epochs: 1,034 (0), 1,376 (1); 1,459 (2). lr 3e-3 and 3 epochs: 1,000 (0), 1,506 (1); 1,242 (2).
  lr 2.5e-3 and 3 epochs: 1,044 (0), 1,386 (2); 1,254 (3). lr 3e-3, 3 epochs, minibatches of 64
  (5 seeds): 1,110; never.
- **lr 3e-3, 3 epochs, entropy 1e-3: 964 (0), 1,269 (0); 1,254 (1)**; with entropy 3e-3: 1,042 (0),
  1,204 (2); 1,322 (0); with lr 4e-3: 930 (1), 1,520 (3); 1,123 (1).
- regularised evolution: 1,450 (2), 2,851 (4); 1,408 (3).
The bold row is the default now (configs/search.py). Faster updates alone (more epochs, a larger lr)
collapse the policy on some seeds of `all_pairs`; the larger entropy bonus keeps them from it. On 20
seeds (10-19 not used in choosing): `neighbours` 1,016 (0 never) against evolution's 1,520 (5);
`all_pairs` 1,176 (1) against 1,556 (9); seeds 10-19 alone 1,088 and 1,127 (0 never each) against
2,669 (3) and never (6). The 2026-12-02 defaults: 1,223 and 1,531 (0 never) on those 20 seeds.

PPO at batch 4 (the local search's), 2026-12-05 on a 2-core AMD EPYC VM, one change set at a time
from the 2026-12-02 defaults, `neighbours`, to within 1% and 0.5%, then best / optimum after 1,000 and
5,000 samples, median:
- lr 5e-4: 1,117 [767, never]; 4,217; 0.9853, 0.9959.
- lr 5e-4, top_fraction 0.5: 1,271 [679, 1,518]; 1,743; 0.9818, 0.9958.
- lr 1.25e-4: 2,206 [1,767, 3,253]; 3,472; 0.9616, 0.9960.
- top_fraction 1.0 and raw advantages (every child of the batch learnt from, no division by the
  spread of four rewards), lr 1e-3: 1,576 [642, never]; never; 0.9864, 0.9922. lr 2.5e-4: 964
  [737, 1,652]; 1,604; 0.9903, 0.9960. **lr 5e-4: 864 [554, 893]; 1,207 [1,042, 1,899], every
  seed; 0.9938, 0.9960**, against evolution's 674 [373, never] and never (4 of 5 seeds within 1%,
  2 within 0.5%), 0.9910, 0.9911. On `all_pairs`: 1,164 [633, never] (4 of 5 within 1%); never
  within 0.5%; 0.9881, 0.9934, against evolution's 4,725 [785, never] (3 of 5); 0.9879, 0.9924.
  The last are `configs/search.py:local`'s PPO settings; with the batch-64 defaults' 3 epochs and
  entropy 1e-3, which `:local` inherits, over 10 seeds: `neighbours` 837 (0 never) against 851 with
  2 epochs and entropy 1e-4; `all_pairs` 833 (1 never) against 1,272 (3); evolution 1,458 (4) and
  3,443 (4). At batch 1 with them (5 seeds): 785 [283, 938] and 831 [636, 891], every seed, against
  evolution's 643 (1 never) and 599. Reproduce with
  `--batches=4 --config.controller.ppo.learning_rate=5e-4 --config.controller.ppo.top_fraction=1.0
  --config.controller.ppo.normalize_advantages=False` (the `:local` config itself would also change
  the space the surrogates are built on).
The other strategies at every batch: README.md's table.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mnasnet_jax import blocks
from mnasnet_jax import controller
from mnasnet_jax import models
from mnasnet_jax import reward
from mnasnet_jax import search_space

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  os.path.join(os.path.dirname(__file__), '..', 'configs', 'search.py'),
  'The search config: its search_space, controller and reward sections are used.',
)
_SAMPLES = flags.DEFINE_integer('samples', 5000, 'Samples per run.')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Runs (seeds) per strategy and batch.')
_STRATEGIES = flags.DEFINE_list('strategies', list(controller.STRATEGIES), 'Strategies to run.')
_BATCHES = flags.DEFINE_list('batches', ['64', '4', '1'], 'Children per ask (and tell).')
_SURROGATES = flags.DEFINE_list('surrogates', ['neighbours', 'all_pairs'], 'Problems to run.')
_REFERENCE = flags.DEFINE_integer(
  'reference_samples', None, "Samples of each long run giving all_pairs' reference; 4 x samples."
)
_REFERENCE_SEEDS = flags.DEFINE_integer('reference_seeds', 20, 'Long runs giving that reference.')
_PROBLEM_SEED = flags.DEFINE_integer('problem_seed', 0, 'Seed of the surrogate accuracy tables.')
_UNIFORM = flags.DEFINE_integer(
  'uniform_draws', 1_000_000, 'Uniform samples scored to measure the fraction within 1%.'
)

RESOLUTION = 224
NUM_CLASSES = 1000
TARGET_MS = 75.0
# The stand-in accuracy: base + per block CAPACITY * log(macs / base block's macs) + seeded tastes.
BASE_ACCURACY = 0.72
CAPACITY = 0.008
TASTE = 0.004  # standard deviation of each block's conv-op, kernel, SE and skip preferences
NEIGHBOURS = 0.004  # standard deviation of the adjacent-block (conv op, kernel) interaction
PAIRS = 0.002  # that of every other pair's (all_pairs): 15 tables, together 1.6x the neighbours'
REMOVAL = 0.02  # mean accuracy lost by removing a block
WITHIN = (0.01, 0.005)  # relative distances to the optimum that count
MARKS = (500, 1000, 2000)  # best reward after this many samples (and after all)


class Surrogate:
  """Per-block tables over (choice, input width): multiply-adds, stand-in accuracy, output width;
  with `all_pairs`, also a seeded interaction of every two blocks that are not neighbours."""

  def __init__(self, space, seed: int, all_pairs: bool = False):
    self.space = space
    self.all_pairs = all_pairs
    positions = len(search_space.DECISIONS)
    self.radix = np.asarray(space.choices[:positions])
    if any(
      tuple(space.choices[k : k + positions]) != tuple(self.radix)
      for k in range(0, len(space.choices), positions)
    ) or len(space.searched) != len(space.base):
      raise ValueError('the benchmark needs every block searched with the same choices')
    rng = np.random.default_rng(seed)
    num_choices = int(np.prod(self.radix))
    codes = np.arange(num_choices)
    decisions = np.stack(np.unravel_index(codes, self.radix), 1)  # [choices, 6]
    self.decisions = decisions
    self.features = decisions[:, 0] * self.radix[1] + decisions[:, 1]  # (conv op, kernel)
    num_features = int(self.radix[0] * self.radix[1])
    resolutions = space.block_resolutions(RESOLUTION)
    base_tokens = np.zeros(len(space.choices), np.int64)
    self.widths, self.macs, self.quality, self.out_width = [], [], [], []
    self.neighbours = []
    for b in range(len(space.base)):
      widths = sorted({c.in_filters for c in space.block_candidates(b)})
      base_macs = self._block_macs(space.base[b].replace(in_filters=widths[0]), resolutions[b])
      op, kernel, se, skip = (rng.normal(0, TASTE, self.radix[k]) for k in range(4))
      removal = REMOVAL * rng.uniform(0.5, 1.5)
      macs = np.zeros((num_choices, len(widths)))
      quality = np.zeros((num_choices, len(widths)))
      out_width = np.zeros((num_choices, len(widths)), np.int64)
      for c in codes:
        tokens = base_tokens.copy()
        tokens[b * positions : (b + 1) * positions] = decisions[c]
        block = blocks.decode(space.decode(tokens)[b])
        d = decisions[c]
        for j, w in enumerate(widths):
          block = block.replace(in_filters=w)
          layers = blocks.layers([block], w, resolutions[b])
          macs[c, j] = sum(models.layer_cost(layer)[1] for layer in layers)
          out_width[c, j] = block.out_filters if layers else w
          if not layers:
            quality[c, j] = -removal
          else:
            residual = np.mean([layer.residual for layer in layers])
            quality[c, j] = (
              CAPACITY * np.log(macs[c, j] / base_macs)
              + op[d[0]]
              + kernel[d[1]]
              + se[d[2]]
              + skip[d[3]] * residual
            )
      self.widths.append(np.asarray(widths))
      self.macs.append(macs)
      self.quality.append(quality)
      self.out_width.append(out_width)
      self.neighbours.append(rng.normal(0, NEIGHBOURS, (num_features, num_features)) if b else None)
    stem = space.stem_filters
    self.fixed_macs = (
      27 * stem * blocks.same_output_size(RESOLUTION, 2) ** 2 + models.HEAD_FILTERS * NUM_CLASSES
    )
    self.final_resolution = blocks.same_output_size(resolutions[-1], space.base[-1].stride)
    self.mobilenet_macs = models.summary(
      'mobilenet_v2', resolution=RESOLUTION, num_classes=NUM_CLASSES
    )['macs']
    self.strides = np.cumprod(np.concatenate([self.radix[1:], [1]])[::-1])[::-1]  # row-major code
    # Every block b gets a table with each block a < b - 1 (their neighbour terms stay as above);
    # from their own generator, so both surrogates share every other table.
    pairs_rng = np.random.default_rng([seed, 1])
    num_blocks = len(space.base)
    self.pairs = [
      [(a, pairs_rng.normal(0, PAIRS, (num_features, num_features))) for a in range(b - 1)]
      if all_pairs
      else []
      for b in range(num_blocks)
    ]

  @staticmethod
  def _block_macs(block, resolution):
    return sum(
      models.layer_cost(layer)[1] for layer in blocks.layers([block], block.in_filters, resolution)
    )

  def head_macs(self, width):
    return width * models.HEAD_FILTERS * self.final_resolution**2

  def latency_ms(self, macs):
    return TARGET_MS * macs / self.mobilenet_macs

  def evaluate(self, tokens, xp=np):
    """(accuracy, multiply-adds) of token sequences [N, T], in NumPy (xp=np, float64) or traced in
    JAX (xp=jnp, float32)."""
    tokens = xp.asarray(tokens)
    n = tokens.shape[0]
    positions = len(self.radix)
    width = xp.full(n, self.space.stem_filters)
    accuracy = xp.full(n, BASE_ACCURACY)
    macs = xp.full(n, float(self.fixed_macs))
    features = xp.asarray(self.features)
    codes = []
    for b in range(len(self.macs)):
      code = tokens[:, b * positions : (b + 1) * positions] @ xp.asarray(self.strides)
      column = xp.searchsorted(xp.asarray(self.widths[b]), width)
      accuracy += xp.asarray(self.quality[b])[code, column]
      macs += xp.asarray(self.macs[b])[code, column]
      if codes:
        accuracy += xp.asarray(self.neighbours[b])[features[codes[-1]], features[code]]
      for a, table in self.pairs[b]:
        accuracy += xp.asarray(table)[features[codes[a]], features[code]]
      width = xp.asarray(self.out_width[b])[code, column]
      codes.append(code)
    return accuracy, macs + self.head_macs(width)

  def optimum(self, reward_fn):
    """The exact best reward and its tokens, by dynamic programming over Pareto fronts (only for
    the neighbours-only accuracy, a sum of per-block and neighbour terms)."""
    assert not self.all_pairs, 'no dynamic programme for interactions beyond neighbours'
    fronts = {
      (self.space.stem_filters, -1): (
        np.array([BASE_ACCURACY]),
        np.array([float(self.fixed_macs)]),
        None,
      )
    }
    history = []
    for b in range(len(self.macs)):
      candidates = {}
      for key_index, ((width, feature), (acc, macs, _)) in enumerate(fronts.items()):
        column = int(np.searchsorted(self.widths[b], width))
        gain = self.quality[b][:, column].copy()
        if feature >= 0:
          gain += self.neighbours[b][feature, self.features]
        cost = self.macs[b][:, column]
        out = self.out_width[b][:, column]
        for new_key in set(zip(out.tolist(), self.features.tolist())):
          group = np.flatnonzero((out == new_key[0]) & (self.features == new_key[1]))
          group = group[_pareto(gain[group], cost[group])]
          new_acc = (acc[:, None] + gain[group][None]).ravel()
          new_macs = (macs[:, None] + cost[group][None]).ravel()
          point = np.repeat(np.arange(len(acc)), len(group))
          choice = np.tile(group, len(acc))
          candidates.setdefault(new_key, []).append(
            (new_acc, new_macs, np.full(len(point), key_index), point, choice)
          )
      keys = list(fronts)
      fronts, back = {}, {}
      for new_key, parts in candidates.items():
        acc, macs, key_index, point, choice = (np.concatenate(x) for x in zip(*parts))
        keep = _pareto(acc, macs)
        fronts[new_key] = (acc[keep], macs[keep], None)
        back[new_key] = ([keys[k] for k in key_index[keep]], point[keep], choice[keep])
      history.append(back)
      points = sum(len(f[0]) for f in fronts.values())
      print(f'  optimum: block {b}: {len(fronts)} states, {points} Pareto points', flush=True)
    best = (-np.inf, None, None)
    for key, (acc, macs, _) in fronts.items():
      rewards = reward_fn(acc, macs + self.head_macs(key[0]))
      i = int(np.argmax(rewards))
      if rewards[i] > best[0]:
        best = (float(rewards[i]), key, i)
    value, key, index = best
    codes = []
    for back in reversed(history):
      previous_keys, points, choices = back[key]
      codes.append(int(choices[index]))
      key, index = previous_keys[index], int(points[index])
    tokens = np.concatenate([self.decisions[c] for c in reversed(codes)])
    return value, tokens


def _pareto(value, cost):
  """Indices of the points no other point beats (higher value at no higher cost)."""
  order = np.lexsort((-value, cost))
  best_before = np.maximum.accumulate(np.concatenate([[-np.inf], value[order][:-1]]))
  return order[value[order] > best_before]


def search(strategy, score, seeds, samples, batch):
  """Every seed's search in one jitted, vmapped scan: rewards [seeds, samples] in the order asked,
  and each seed's best tokens. `score` maps tokens [N, T] to rewards [N], traced."""
  ask, tell = strategy._ask_impl, strategy._tell_impl  # pure: traced into the one scan
  rounds = -(-samples // batch)  # the last round's extra samples are cut from the rewards

  def one(carry, _):
    state, best, best_tokens = carry
    tokens, state = ask(state, batch)
    rewards = score(tokens)
    state, _ = tell(state, tokens, rewards)
    i = jnp.argmax(rewards)
    better = rewards[i] > best
    carry = (state, jnp.where(better, rewards[i], best), jnp.where(better, tokens[i], best_tokens))
    return carry, rewards

  def run(state):
    init = (state, jnp.float32(-jnp.inf), jnp.zeros(len(strategy.choices), jnp.int32))
    (_, _, best_tokens), rewards = jax.lax.scan(one, init, length=rounds)
    return rewards.reshape(-1)[:samples], best_tokens

  states = [strategy.init(s) for s in seeds]
  with controller.on_cpu():
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    rewards, best_tokens = jax.jit(jax.vmap(run))(stacked)
  return np.asarray(rewards, np.float64), np.asarray(best_tokens)


def coordinate_ascent(surrogate, reward_fn, tokens):
  """Improves `tokens` one block at a time (every choice of that block, the others fixed) until no
  block changes; returns (reward, tokens)."""
  positions = len(surrogate.radix)
  tokens = np.array(tokens)
  best = float(reward_fn(*surrogate.evaluate(tokens[None]))[0])
  changed = True
  while changed:
    changed = False
    for b in range(len(surrogate.macs)):
      trial = np.repeat(tokens[None], len(surrogate.decisions), 0)
      trial[:, b * positions : (b + 1) * positions] = surrogate.decisions
      rewards = reward_fn(*surrogate.evaluate(trial))
      i = int(np.argmax(rewards))
      if rewards[i] > best * (1 + 1e-12):
        best, tokens, changed = float(rewards[i]), trial[i], True
  return best, tokens


def long_run_reference(surrogate, config, space, reward_fn, score, samples, seeds):
  """The best of long runs of evolution asked one child at a time (the best strategy here), each
  run's best polished by coordinate ascent: (reward, tokens)."""
  config.controller.strategy = 'evolution'
  strategy = controller.create(config.controller, space.choices)
  rewards, tokens = search(strategy, score, seeds, samples, 1)
  polished = [coordinate_ascent(surrogate, reward_fn, t) for t in tokens]
  print(
    f'  reference: {len(seeds)} runs of evolution, {samples} samples each: best '
    f'{rewards.max():.5f}, after coordinate ascent {max(p[0] for p in polished):.5f} (runs: '
    + ', '.join(f'{p[0]:.5f}' for p in polished)
    + ')',
    flush=True,
  )
  return max(polished, key=lambda p: p[0])


def summarise(rewards, optimum, samples):
  """Median [min, max] over seeds of the samples to within each of WITHIN and of the best reward /
  optimum at each of MARKS (and at the end)."""
  running = np.maximum.accumulate(rewards, axis=1)
  out = {}
  for within in WITHIN:
    hit = running >= optimum * (1 - within)
    counts = [int(np.argmax(h)) + 1 if h.any() else None for h in hit]
    finite = [np.inf if c is None else c for c in counts]
    median = float(np.median(finite))
    out[f'samples_to_within_{within:g}'] = {
      'median': int(round(median)) if np.isfinite(median) else None,
      'per_seed': counts,
    }
  for mark in [m for m in MARKS if m < samples] + [samples]:
    fraction = running[:, mark - 1] / optimum
    out[f'best_at_{mark}'] = {
      'median': float(np.median(fraction)),
      'min': float(fraction.min()),
      'max': float(fraction.max()),
    }
  return out


def _count(entry):
  per_seed = [np.inf if c is None else c for c in entry['per_seed']]
  median = 'never' if entry['median'] is None else str(entry['median'])
  span = ', '.join(
    'never' if not np.isfinite(c) else str(c) for c in (min(per_seed), max(per_seed))
  )
  return f'{median} [{span}]'


def print_table(name, optimum, results, samples):
  marks = [m for m in MARKS if m < samples] + [samples]
  print(f'\n{name}: optimum {optimum:.5f}; median [min, max] over seeds')
  header = ['strategy', 'batch'] + [f'to {w:.1%}' for w in WITHIN] + [f'@{m}' for m in marks]
  print(' | '.join(header))
  for strategy, by_batch in results.items():
    for batch, r in by_batch.items():
      cells = [strategy, str(batch)] + [_count(r[f'samples_to_within_{w:g}']) for w in WITHIN]
      for m in marks:
        e = r[f'best_at_{m}']
        cells.append(f'{e["median"]:.4f} [{e["min"]:.4f}, {e["max"]:.4f}]')
      print(' | '.join(cells), flush=True)


def check_macs(surrogate, space):
  """Two paths must agree: the tables' multiply-adds and models.summary of the decoded network."""
  rng = np.random.default_rng(123)
  check = np.stack([rng.integers(0, c, 5) for c in space.choices], 1)
  _, table_macs = surrogate.evaluate(check)
  for tokens, macs in zip(check, table_macs):
    exact = models.summary(space.decode(tokens), resolution=RESOLUTION, num_classes=NUM_CLASSES)
    assert exact['macs'] == int(macs), (space.decode(tokens), exact['macs'], macs)


def problem(config, space, kind):
  """(surrogate, float64 reward of (accuracy, macs), traced reward of tokens)."""
  surrogate = Surrogate(space, _PROBLEM_SEED.value, all_pairs=kind == 'all_pairs')

  def reward_fn(accuracy, macs):
    latency = surrogate.latency_ms(np.asarray(macs, np.float64))
    return np.asarray(reward.compute(config.reward, accuracy, latency, TARGET_MS), np.float64)

  def score(tokens):
    accuracy, macs = surrogate.evaluate(tokens, jnp)
    return reward.compute(config.reward, accuracy, surrogate.latency_ms(macs), TARGET_MS)

  # The traced evaluator against the NumPy one.
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, space.choices, (256, len(space.choices)))
  with controller.on_cpu():
    traced = np.asarray(jax.jit(score)(tokens), np.float64)
  np.testing.assert_allclose(traced, reward_fn(*surrogate.evaluate(tokens)), rtol=1e-5)
  return surrogate, reward_fn, score


def main(argv):
  del argv
  config = _CONFIG.value
  space = search_space.SearchSpace(config.search_space)
  samples, seeds = _SAMPLES.value, list(range(_SEEDS.value))
  reference_samples = _REFERENCE.value or 4 * samples
  batches = [int(b) for b in _BATCHES.value]
  everything = {'samples': samples, 'seeds': len(seeds), 'ppo': config.controller.ppo.to_dict()}
  for kind in _SURROGATES.value:
    started = time.time()
    surrogate, reward_fn, score = problem(config, space, kind)
    check_macs(surrogate, space)
    reference, reference_tokens = long_run_reference(
      surrogate, config, space, reward_fn, score, reference_samples, range(_REFERENCE_SEEDS.value)
    )
    if kind == 'neighbours':
      optimum, best_tokens = surrogate.optimum(reward_fn)
      again = float(reward_fn(*surrogate.evaluate(best_tokens[None]))[0])
      assert abs(again - optimum) < 1e-9, (again, optimum)
      assert reference <= optimum * (1 + 1e-6), (reference, optimum)
      how = 'exact (dynamic programming)'
      print(f'  the long-run reference would be {reference / optimum:.6f} of it', flush=True)
      everything['neighbours_long_run_reference_fraction'] = reference / optimum
    else:
      optimum, best_tokens = reference, reference_tokens
      how = f'best of long runs ({reference_samples} samples) polished by coordinate ascent'
    accuracy, macs = surrogate.evaluate(best_tokens[None])
    print(
      f'{kind}: optimum {optimum:.5f}, {how} (accuracy {accuracy[0]:.4f}, '
      f'{surrogate.latency_ms(macs)[0]:.1f} ms, {macs[0] / 1e6:.0f}M mult-adds), '
      f'{time.time() - started:.1f}s:\n  {space.decode(best_tokens)}',
      flush=True,
    )
    # Random search is memoryless: its samples to 1% are geometric in the fraction p of the space
    # within 1%, median ln 2 / p. With no hit in N uniform draws, p < 3 / N (95%).
    rng = np.random.default_rng(123)
    draws = max(1, _UNIFORM.value // 100_000)
    uniform = np.concatenate(
      [
        reward_fn(
          *surrogate.evaluate(rng.integers(0, space.choices, (100_000, len(space.choices))))
        )
        for _ in range(draws)
      ]
    )
    hits = int(np.sum(uniform >= optimum * (1 - WITHIN[0])))
    random_median = np.log(2) / (max(hits, 3) / len(uniform))
    print(
      f'  {len(uniform)} uniform samples: mean {uniform.mean() / optimum:.4f} of the optimum, best '
      f'{uniform.max() / optimum:.4f}; {hits} within 1%: random search needs a median of '
      f'{"over " if hits < 3 else ""}{random_median:.3g} samples',
      flush=True,
    )
    results = {}
    for name in _STRATEGIES.value:
      config.controller.strategy = name
      strategy = controller.create(config.controller, space.choices)
      results[name] = {}
      for batch in batches:
        started = time.time()
        rewards, _ = search(strategy, score, seeds, samples, batch)
        above = int(np.sum(rewards.max(1) > optimum * (1 + 1e-6)))
        assert not above or kind != 'neighbours', f'{name} above the exact optimum: a DP bug'
        if above:
          print(f'  {name} batch {batch}: {above} seeds beat the reference', flush=True)
        results[name][batch] = summarise(rewards, optimum, samples)
        results[name][batch]['seconds'] = time.time() - started
        print_table(kind, optimum, {name: {batch: results[name][batch]}}, samples)
        print(f'  ({time.time() - started:.1f}s)', flush=True)
    print_table(kind, optimum, results, samples)
    everything[kind] = {
      'optimum': optimum,
      'optimum_from': how,
      'random_median_samples_from_uniform_draws': float(random_median),
      'results': results,
    }
  print(json.dumps(everything))


if __name__ == '__main__':
  app.run(main)
