"""Search strategies behind one ask/tell interface: the paper's PPO-trained RNN controller, TuNAS's
REINFORCE on independent per-decision logits, regularised evolution (Real et al. 2019) and random
search.

    strategy = controller.create(config.controller, space.choices)
    state = strategy.init(seed)                            # a pytree of arrays (Orbax saves it)
    tokens, state = strategy.ask(state, num)               # np.int32 [num, len(choices)]
    state, metrics = strategy.tell(state, tokens, rewards)  # metrics: dict of floats
    answer = strategy.most_likely(state)                   # np.int32 [len(choices)], or None

All randomness comes from the key inside `state`, so the same seed and the same rewards give the same
samples, and a restored state goes on exactly as the saved one would have.

The controller (NASNet's, as MnasNet uses it) is a one-layer LSTM that makes one decision per step:
its input is the embedding of the previous decision's choice (a learned start row at step 0), and
each position has its own softmax head sized to that decision's options. It is trained with PPO:
the clipped surrogate on whole-sequence probability ratios, advantage = reward - an exponential moving
average baseline (or, with `top_fraction` < 1, the batch's top children alone, above the lower edge
of that fraction: the risk-seeking policy gradient of Petersen et al. 2021), optionally divided by
the batch's reward spread, an optional entropy bonus, several epochs of Adam minibatch updates per
batch.
`tell` treats its tokens as sampled by the current policy (as after the `ask` that produced them).

Every strategy runs on the CPU backend at 'highest' matmul precision, whatever the default device:
a TPU's default multiplies in bfloat16 passes, so the same state would sample other tokens on a TPU
than on a GPU or CPU, and a search resumed on another platform would disagree with its own history.
The controller is a few thousand multiply-adds a step; the CPU costs it nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnasnet_jax import errors

STRATEGIES = ('ppo', 'reinforce', 'evolution', 'random')
_MASKED = -1e9  # logit of a padding option: probability exactly 0, no NaN in the entropy


@contextlib.contextmanager
def on_cpu():
  """This process's first CPU device as the default device, at 'highest' matmul precision."""
  cpu = jax.local_devices(backend='cpu')[0]
  with jax.default_device(cpu), jax.default_matmul_precision('highest'):
    yield cpu


def _on_cpu(method):
  """A strategy's init, ask or tell run `on_cpu`, its state (a dict of arrays) moved there first."""

  @functools.wraps(method)
  def run(self, state, *args):
    with on_cpu() as cpu:
      return method(self, jax.device_put(state, cpu) if isinstance(state, dict) else state, *args)

  return run


def _uniform_tokens(key, choices: jnp.ndarray, num: int) -> jnp.ndarray:
  u = jax.random.uniform(key, (num, choices.shape[0]))
  return jnp.minimum(jnp.floor(u * choices), choices - 1).astype(jnp.int32)


def _as_batch(tokens, rewards, num_positions):
  tokens = np.asarray(tokens, np.int32)
  rewards = np.asarray(rewards, np.float32)
  if tokens.ndim != 2 or tokens.shape[1] != num_positions:
    raise ValueError(f'expected tokens of shape [num, {num_positions}], got {tokens.shape}')
  if rewards.shape != (tokens.shape[0],):
    raise ValueError(
      f'expected {tokens.shape[0]} rewards (one per sequence), got shape {rewards.shape}'
    )
  if not np.all(np.isfinite(rewards)):
    raise ValueError(f'rewards must be finite, got {rewards}')
  return jnp.asarray(tokens), jnp.asarray(rewards)


def _check_num(num):
  if not isinstance(num, (int, np.integer)) or num < 1:
    raise ValueError(f'num must be a positive integer, got {num!r}')
  return int(num)


# --- the LSTM policy ------------------------------------------------------------------------------


def init_policy(key, choices: Sequence[int], hidden_size: int, init_range: float) -> dict:
  """Embeddings (row 0 starts), LSTM weights, and one zero head per position (a uniform start)."""
  k_embed, k_lstm = jax.random.split(key)
  uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -init_range, init_range)
  return {
    'embedding': uniform(k_embed, (1 + sum(choices), hidden_size)),
    'lstm': {
      'kernel': uniform(k_lstm, (2 * hidden_size, 4 * hidden_size)),
      'bias': jnp.zeros((4 * hidden_size,), jnp.float32),
    },
    'heads': {
      'kernel': jnp.zeros((len(choices), hidden_size, max(choices)), jnp.float32),
      'bias': jnp.zeros((len(choices), max(choices)), jnp.float32),
    },
  }


def _lstm(params, x, h, c):
  gates = jnp.concatenate([x, h], axis=-1) @ params['kernel'] + params['bias']
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _run(params, choices: tuple, temperature: float, num: int, inputs, mode: str):
  """Runs the controller over every position: 'sample' (inputs: a key per position), 'greedy'
  (each position's most likely option; inputs: ignored, one row per position) or 'score' given tokens (inputs: int32
  [T, num]). Returns tokens [num, T], summed log-probs and entropies."""
  offsets = np.concatenate([[1], 1 + np.cumsum(choices)[:-1]]).astype(np.int32)
  valid = np.arange(max(choices))[None, :] < np.asarray(choices)[:, None]
  hidden = params['lstm']['kernel'].shape[1] // 4

  def step(carry, xs):
    h, c, row = carry
    head_kernel, head_bias, head_valid, offset, given = xs
    h, c = _lstm(params['lstm'], params['embedding'][row], h, c)
    logits = (h @ head_kernel + head_bias) / temperature
    log_probs = jax.nn.log_softmax(jnp.where(head_valid, logits, _MASKED))
    if mode == 'sample':
      token = jax.random.categorical(given, log_probs).astype(jnp.int32)
    elif mode == 'greedy':
      token = jnp.argmax(log_probs, axis=1).astype(jnp.int32)
    else:
      token = given
    chosen = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=1)
    return (h, c, offset + token), (token, chosen, entropy)

  zeros = jnp.zeros((num, hidden), jnp.float32)
  init = (zeros, zeros, jnp.zeros((num,), jnp.int32))
  xs = (
    params['heads']['kernel'],
    params['heads']['bias'],
    jnp.asarray(valid),
    jnp.asarray(offsets),
    inputs,
  )
  _, (tokens, log_probs, entropies) = jax.lax.scan(step, init, xs)
  return tokens.T, log_probs.sum(0), entropies.sum(0)


def sample(params, key, choices: tuple, num: int, temperature: float = 1.0):
  """`num` token sequences from the policy: (tokens int32 [num, T], log-probs [num])."""
  keys = jax.random.split(key, len(choices))
  tokens, log_probs, _ = _run(params, tuple(choices), temperature, num, keys, 'sample')
  return tokens, log_probs


def greedy(params, choices: tuple) -> jnp.ndarray:
  """The policy's greedy sequence, int32 [T]: each decision its most likely option after the
  earlier ones."""
  ignored = np.zeros((len(choices), 1), np.int32)
  return _run(params, tuple(choices), 1.0, 1, ignored, 'greedy')[0][0]


def log_prob(params, tokens, choices: tuple, temperature: float = 1.0):
  """Log-probability [num] of each sequence under the policy, and its summed entropy [num]."""
  tokens = jnp.asarray(tokens)
  _, log_probs, entropies = _run(
    params, tuple(choices), temperature, tokens.shape[0], tokens.T, 'score'
  )
  return log_probs, entropies


# --- PPO ------------------------------------------------------------------------------------------


def _ppo_loss(params, tokens, old_log_probs, advantages, weights, choices, config):
  log_probs, entropies = log_prob(params, tokens, choices, config.temperature)
  ratio = jnp.exp(log_probs - old_log_probs)
  clipped = jnp.clip(ratio, 1.0 - config.clip_epsilon, 1.0 + config.clip_epsilon)
  surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
  mean = lambda x: jnp.sum(weights * x) / jnp.maximum(jnp.sum(weights), 1.0)
  loss = -mean(surrogate) - config.entropy_weight * mean(entropies)
  return loss, {
    'approx_kl': mean(old_log_probs - log_probs),
    'clip_fraction': mean((jnp.abs(ratio - 1.0) > config.clip_epsilon).astype(jnp.float32)),
  }


class _Strategy:
  """The ask/tell interface every strategy shares: `_ask_impl(state, num)` and `_tell_impl(state,
  tokens, rewards)` are pure (benchmarks/controller.py scans them), jitted here and run on the CPU
  with the tokens and rewards checked."""

  def __init__(self, choices: Sequence[int]):
    self.choices = tuple(int(c) for c in choices)
    self._ask = jax.jit(self._ask_impl, static_argnums=1)
    self._tell = jax.jit(self._tell_impl)

  @_on_cpu
  def ask(self, state, num: int):
    tokens, state = self._ask(state, _check_num(num))
    return np.array(tokens), state

  @_on_cpu
  def tell(self, state, tokens, rewards):
    tokens, rewards = _as_batch(tokens, rewards, len(self.choices))
    state, metrics = self._tell(state, tokens, rewards)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  @_on_cpu
  def most_likely(self, state) -> np.ndarray | None:
    """The architecture the policy prefers (TuNAS's answer: a policy averages every reward it was
    told, where the best-rewarded child is partly its one measurement's luck); None for a
    strategy without a policy."""
    tokens = self._most_likely(state)
    return None if tokens is None else np.array(tokens, np.int32)

  def _most_likely(self, state):
    del state
    return None


class PPO(_Strategy):
  """The LSTM controller trained with PPO; state: params, opt_state, baseline, key, step."""

  def __init__(self, config, choices: Sequence[int]):
    self.config = config
    super().__init__(choices)
    self.optimizer = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate)
    )

  @_on_cpu
  def init(self, seed: int) -> dict:
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    params = init_policy(init_key, self.choices, self.config.hidden_size, self.config.init_range)
    return {
      'params': params,
      'opt_state': self.optimizer.init(params),
      'baseline': jnp.zeros((), jnp.float32),
      'key': key,
      'step': jnp.zeros((), jnp.int32),
    }

  def _ask_impl(self, state, num):
    key, sample_key = jax.random.split(state['key'])
    tokens, _ = sample(state['params'], sample_key, self.choices, num, self.config.temperature)
    return tokens, {**state, 'key': key}

  def _most_likely(self, state):
    return greedy(state['params'], self.choices)

  def _tell_impl(self, state, tokens, rewards):
    config = self.config
    num = tokens.shape[0]
    old_log_probs, entropies = log_prob(state['params'], tokens, self.choices, config.temperature)
    # The first batch starts the moving average at its own mean.
    baseline = jnp.where(state['step'] == 0, jnp.mean(rewards), state['baseline'])
    if config.top_fraction < 1.0:
      # Risk-seeking policy gradient (Petersen et al. 2021): a search keeps its best children, not
      # its mean one, so learn from the batch's top fraction alone, above its lower edge.
      edge = jnp.quantile(rewards, 1.0 - config.top_fraction)
      advantages, learn = rewards - edge, (rewards >= edge).astype(jnp.float32)
    else:
      advantages, learn = rewards - baseline, jnp.ones_like(rewards)
    if config.normalize_advantages:  # unit scale, so steps do not shrink as rewards converge
      advantages = advantages / (jnp.std(rewards) + 1e-8)
    size = min(config.minibatch_size, num)
    count = -(-num // size)
    key, epochs_key = jax.random.split(state['key'])

    def epoch(carry, epoch_key):
      order = jnp.concatenate(
        [jax.random.permutation(epoch_key, num), jnp.zeros((count * size - num,), jnp.int32)]
      ).reshape(count, size)
      weights = (jnp.arange(count * size) < num).astype(jnp.float32).reshape(count, size)
      weights = weights * learn[order]

      def minibatch(carry, batch):
        params, opt_state = carry
        index, weight = batch
        grads, info = jax.grad(_ppo_loss, has_aux=True)(
          params,
          tokens[index],
          old_log_probs[index],
          advantages[index],
          weight,
          self.choices,
          config,
        )
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), info

      return jax.lax.scan(minibatch, carry, (order, weights))

    (params, opt_state), info = jax.lax.scan(
      epoch, (state['params'], state['opt_state']), jax.random.split(epochs_key, config.epochs)
    )
    new_state = {
      'params': params,
      'opt_state': opt_state,
      'baseline': config.baseline_decay * baseline
      + (1.0 - config.baseline_decay) * jnp.mean(rewards),
      'key': key,
      'step': state['step'] + 1,
    }
    metrics = {
      'mean_reward': jnp.mean(rewards),
      'max_reward': jnp.max(rewards),
      'baseline': new_state['baseline'],
      'entropy': jnp.mean(entropies),
      'approx_kl': info['approx_kl'][-1].mean(),
      'clip_fraction': info['clip_fraction'][-1].mean(),
    }
    return new_state, metrics


# --- REINFORCE with independent logits (TuNAS) ----------------------------------------------------


def _independent_log_probs(logits, choices):
  valid = np.arange(logits.shape[1])[None, :] < np.asarray(choices)[:, None]
  return jax.nn.log_softmax(jnp.where(valid, logits, _MASKED))


class Reinforce(_Strategy):
  """TuNAS's controller (Bender et al. 2020): one independent softmax per decision, no RNN, trained
  by REINFORCE (advantage = reward - a moving-average baseline) with Adam; state: logits,
  opt_state, baseline, key, step. The logits start at 0: every choice equally likely."""

  def __init__(self, config, choices: Sequence[int]):
    self.config = config
    super().__init__(choices)
    self.optimizer = optax.adam(config.learning_rate)

  @_on_cpu
  def init(self, seed: int) -> dict:
    logits = jnp.zeros((len(self.choices), max(self.choices)), jnp.float32)
    return {
      'logits': logits,
      'opt_state': self.optimizer.init(logits),
      'baseline': jnp.zeros((), jnp.float32),
      'key': jax.random.PRNGKey(seed),
      'step': jnp.zeros((), jnp.int32),
    }

  def _ask_impl(self, state, num):
    key, sample_key = jax.random.split(state['key'])
    log_probs = _independent_log_probs(state['logits'], self.choices)
    tokens = jax.random.categorical(sample_key, log_probs, shape=(num, len(self.choices)))
    return tokens.astype(jnp.int32), {**state, 'key': key}

  def _most_likely(self, state):
    return jnp.argmax(_independent_log_probs(state['logits'], self.choices), axis=1)

  def _tell_impl(self, state, tokens, rewards):
    config = self.config
    baseline = jnp.where(state['step'] == 0, jnp.mean(rewards), state['baseline'])
    advantages = rewards - baseline

    def loss_fn(logits):
      log_probs = _independent_log_probs(logits, self.choices)
      chosen = jnp.take_along_axis(log_probs[None], tokens[:, :, None], axis=2)[..., 0].sum(1)
      entropy = -jnp.sum(jnp.exp(log_probs) * log_probs)
      return -jnp.mean(advantages * chosen) - config.entropy_weight * entropy, entropy

    (_, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['logits'])
    updates, opt_state = self.optimizer.update(grads, state['opt_state'], state['logits'])
    new_state = {
      **state,
      'logits': optax.apply_updates(state['logits'], updates),
      'opt_state': opt_state,
      'baseline': config.baseline_decay * baseline
      + (1.0 - config.baseline_decay) * jnp.mean(rewards),
      'step': state['step'] + 1,
    }
    metrics = {
      'mean_reward': jnp.mean(rewards),
      'max_reward': jnp.max(rewards),
      'baseline': new_state['baseline'],
      'entropy': entropy,
    }
    return new_state, metrics


# --- regularised evolution ------------------------------------------------------------------------


class Evolution(_Strategy):
  """Regularised evolution (Real et al. 2019): tournament selection, one-decision mutation, aging.

  The population is a ring buffer of the last `population_size` children told, so the oldest dies
  first. Until it is full, children are uniform random samples.
  """

  def __init__(self, config, choices: Sequence[int]):
    self.config = config
    super().__init__(choices)
    if config.sample_size < 1 or config.population_size < 1:
      raise errors.UserError(
        f'population_size ({config.population_size}) and sample_size '
        f'({config.sample_size}) must be positive'
      )
    if max(self.choices) < 2:
      raise ValueError(f'nothing to mutate: every position has one option ({self.choices})')

  @_on_cpu
  def init(self, seed: int) -> dict:
    size = self.config.population_size
    return {
      'population': jnp.zeros((size, len(self.choices)), jnp.int32),
      'rewards': jnp.zeros((size,), jnp.float32),
      'count': jnp.zeros((), jnp.int32),
      'key': jax.random.PRNGKey(seed),
      'step': jnp.zeros((), jnp.int32),
    }

  def _ask_impl(self, state, num):
    choices = jnp.asarray(self.choices)
    size = self.config.population_size
    key, random_key, tournament_key, position_key, value_key = jax.random.split(state['key'], 5)
    # Algorithm 1 of Real et al.: `sample_size` members drawn uniformly (with replacement).
    contestants = jax.random.randint(tournament_key, (num, self.config.sample_size), 0, size)
    winners = contestants[jnp.arange(num), jnp.argmax(state['rewards'][contestants], axis=1)]
    parents = state['population'][winners]
    # Mutate one decision that has an alternative, to a different option, uniformly.
    can_change = jnp.log((choices > 1).astype(jnp.float32))
    position = jax.random.categorical(position_key, can_change, shape=(num,))
    n = choices[position]
    shift = 1 + jnp.floor(jax.random.uniform(value_key, (num,)) * (n - 1)).astype(jnp.int32)
    shift = jnp.minimum(shift, n - 1)
    rows = jnp.arange(num)
    children = parents.at[rows, position].set((parents[rows, position] + shift) % n)
    random = _uniform_tokens(random_key, choices, num)
    tokens = jnp.where(state['count'] >= size, children, random)
    return tokens, {**state, 'key': key}

  def _tell_impl(self, state, tokens, rewards):
    size = self.config.population_size

    def insert(i, carry):
      population, values, count = carry
      slot = count % size
      return population.at[slot].set(tokens[i]), values.at[slot].set(rewards[i]), count + 1

    population, values, count = jax.lax.fori_loop(
      0, tokens.shape[0], insert, (state['population'], state['rewards'], state['count'])
    )
    alive = jnp.arange(size) < count
    new_state = {
      **state,
      'population': population,
      'rewards': values,
      'count': count,
      'step': state['step'] + 1,
    }
    metrics = {
      'mean_reward': jnp.mean(rewards),
      'max_reward': jnp.max(rewards),
      'population_mean_reward': jnp.sum(jnp.where(alive, values, 0.0)) / jnp.sum(alive),
      'population_best_reward': jnp.max(jnp.where(alive, values, -jnp.inf)),
    }
    return new_state, metrics


# --- random search --------------------------------------------------------------------------------


class RandomSearch(_Strategy):
  """Uniform samples from the space: the baseline every search must beat."""

  def __init__(self, config, choices: Sequence[int]):
    del config
    super().__init__(choices)

  @_on_cpu
  def init(self, seed: int) -> dict:
    return {
      'key': jax.random.PRNGKey(seed),
      'step': jnp.zeros((), jnp.int32),
      'best_reward': jnp.full((), -jnp.inf, jnp.float32),
    }

  def _ask_impl(self, state, num):
    key, sample_key = jax.random.split(state['key'])
    return _uniform_tokens(sample_key, jnp.asarray(self.choices), num), {**state, 'key': key}

  def _tell_impl(self, state, tokens, rewards):
    del tokens  # nothing to learn
    best = jnp.maximum(state['best_reward'], jnp.max(rewards))
    state = {**state, 'best_reward': best, 'step': state['step'] + 1}
    return state, {
      'mean_reward': jnp.mean(rewards),
      'max_reward': jnp.max(rewards),
      'best_reward': best,
      'entropy': jnp.float32(sum(math.log(c) for c in self.choices)),
    }


def create(config, choices: Sequence[int]):
  """The strategy `config.strategy` names, configured by its section of `config`."""
  choices = tuple(int(c) for c in choices)
  if not choices or min(choices) < 1:
    raise ValueError(f'every position needs at least one option, got choices {choices}')
  if config.strategy == 'ppo':
    return PPO(config.ppo, choices)
  if config.strategy == 'reinforce':
    return Reinforce(config.reinforce, choices)
  if config.strategy == 'evolution':
    return Evolution(config.evolution, choices)
  if config.strategy == 'random':
    return RandomSearch(config, choices)
  raise errors.UserError(f'unknown strategy {config.strategy!r}: expected one of {STRATEGIES}')
