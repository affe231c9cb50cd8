import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnasnet_jax import controller
from mnasnet_jax import errors
from mnasnet_jax.configs.search import get_config

CHOICES = (3, 4, 1, 3, 2)  # a one-option position too: masked head, never mutated
BATCH = 8  # one batch size throughout: each new shape is a new compilation


def make(strategy, choices=CHOICES, **overrides):
  config = get_config().controller
  config.strategy = strategy
  config.ppo.hidden_size = 16
  config.ppo.learning_rate = 0.01
  config.ppo.minibatch_size = BATCH
  for section, values in overrides.items():
    for k, v in values.items():
      config[section][k] = v
  return controller.create(config, choices)


@pytest.fixture(scope='module')
def ppo():
  return make('ppo')


@pytest.fixture(scope='module')
def evolution():
  return make('evolution', evolution={'population_size': BATCH, 'sample_size': 64})


def test_initial_policy_is_uniform_and_sampling_scores_agree(ppo):
  state = ppo.init(0)
  tokens, log_probs = controller.sample(state['params'], state['key'], CHOICES, BATCH)
  expected = -sum(np.log(CHOICES))
  np.testing.assert_allclose(log_probs, expected, rtol=1e-5)
  again, entropies = controller.log_prob(state['params'], tokens, CHOICES)
  np.testing.assert_allclose(again, log_probs, rtol=1e-5)
  np.testing.assert_allclose(entropies, -expected, rtol=1e-5)
  assert tokens.dtype == np.int32 and np.all(tokens < np.array(CHOICES)) and np.all(tokens >= 0)


@pytest.mark.parametrize('strategy', controller.STRATEGIES)
def test_same_seed_same_samples(strategy, ppo, evolution):
  strategy = {'ppo': ppo, 'evolution': evolution}.get(strategy) or make(strategy)

  def run(seed):
    state = strategy.init(seed)
    asked = []
    for _ in range(3):
      tokens, state = strategy.ask(state, BATCH)
      asked.append(tokens)
      state, _ = strategy.tell(state, tokens, (tokens == 1).mean(1))
    return np.stack(asked)

  first = run(0)
  assert first.shape == (3, BATCH, len(CHOICES)) and first.dtype == np.int32
  np.testing.assert_array_equal(first, run(0))
  assert not np.array_equal(first, run(1))


def test_policy_answer_is_each_decisions_most_likely_option(ppo, evolution):
  """PPO's answer is the sequence sampling at a temperature near 0 draws (each option the most
  likely after the earlier ones); REINFORCE's each row's largest logit; none without a policy."""
  state = ppo.init(3)
  for _ in range(3):  # a policy no longer uniform
    tokens, state = ppo.ask(state, BATCH)
    state, _ = ppo.tell(state, tokens, (tokens == 2).mean(1))
  answer = ppo.most_likely(state)
  assert answer.shape == (len(CHOICES),) and answer.dtype == np.int32
  cold, _ = controller.sample(state['params'], state['key'], CHOICES, 8, temperature=1e-4)
  np.testing.assert_array_equal(cold, np.tile(answer, (8, 1)))
  assert (answer == 2).sum() > (np.asarray(CHOICES) > 2).sum() / 2  # it learnt the rewarded 2s
  reinforce = make('reinforce')
  state = reinforce.init(0)
  state['logits'] = np.random.default_rng(0).normal(size=state['logits'].shape)
  expected = [int(np.argmax(row[:n])) for row, n in zip(state['logits'], CHOICES)]
  np.testing.assert_array_equal(reinforce.most_likely(state), expected)
  assert evolution.most_likely(evolution.init(0)) is None
  assert make('random').most_likely(make('random').init(0)) is None


def test_ppo_update_raises_the_probability_of_a_rewarded_sequence(ppo):
  state = ppo.init(0)
  tokens, state = ppo.ask(state, BATCH)
  target = np.array([2, 3, 0, 0, 1], np.int32)
  assert not (tokens[1:] == target).all(1).any()
  tokens[0] = target
  rewards = np.where(np.arange(len(tokens)) == 0, 1.0, 0.0)
  before, _ = controller.log_prob(state['params'], tokens, CHOICES)
  state, metrics = ppo.tell(state, tokens, rewards)
  after, _ = controller.log_prob(state['params'], tokens, CHOICES)
  assert after[0] > before[0] + 0.05
  assert np.mean(after[1:]) < np.mean(before[1:])
  # The first batch starts the baseline at its mean; then EMA with decay 0.9 toward the same mean.
  np.testing.assert_allclose(metrics['baseline'], rewards.mean(), rtol=1e-6)
  assert 0 < metrics['entropy'] <= sum(np.log(CHOICES)) + 1e-4
  assert int(state['step']) == 1


def test_ppo_learns_a_separable_problem(ppo):
  state = ppo.init(3)
  target = np.array([2, 3, 0, 0, 1])
  for _ in range(40):
    tokens, state = ppo.ask(state, BATCH)
    state, metrics = ppo.tell(state, tokens, (tokens == target).mean(1))
  assert metrics['mean_reward'] > 0.8  # uniform sampling averages 0.37
  assert metrics['entropy'] < 0.5 * sum(np.log(CHOICES))


def test_ppo_top_fraction_learns_from_the_best_children_alone():
  # Top quarter of 8: the 2 above the 0.75 quantile, which lies between the 6th and 7th rewards.
  # Rewards that differ only below the 6th give the same update; moving the top one changes it.
  strategy = make('ppo', ppo={'top_fraction': 0.25, 'normalize_advantages': False})
  state = strategy.init(0)
  tokens, state = strategy.ask(state, BATCH)
  rewards = np.linspace(0.1, 0.8, BATCH)
  changed = rewards.copy()
  changed[:5] = [0.3, 0.0, 0.2, 0.05, 0.15]
  after = [strategy.tell(state, tokens, r)[0]['params'] for r in (rewards, changed)]
  jax.tree.map(np.testing.assert_array_equal, *after)
  rewards[-1] = 2.0
  moved = strategy.tell(state, tokens, rewards)[0]['params']
  assert not np.allclose(moved['heads']['bias'], after[0]['heads']['bias'])


def test_evolution_fills_then_mutates_the_tournament_winner_then_ages(evolution):
  size = BATCH
  state = evolution.init(0)
  founders, state = evolution.ask(state, size)
  rewards = np.arange(size, dtype=np.float32)
  state, metrics = evolution.tell(state, founders, rewards)
  assert metrics['population_best_reward'] == size - 1
  # A tournament of 64 from 8 all but surely holds the best, and its child differs in one decision.
  children = []
  for _ in range(8):
    batch, state = evolution.ask(state, size)
    children.append(batch)
  children = np.concatenate(children)
  differences = (children != founders[-1]).sum(1)
  assert np.all(differences == 1)
  changed = (children != founders[-1]).any(0)
  np.testing.assert_array_equal(changed, np.array(CHOICES) > 1)  # all that can change, sometimes
  # Aging: the oldest dies first, whatever its reward.
  state, _ = evolution.tell(state, children[:size], -np.ones(size))
  state, _ = evolution.tell(state, children[size : 2 * size], np.arange(size) + 10.0)
  population = np.asarray(state['population'])
  np.testing.assert_array_equal(population, children[size : 2 * size])
  assert int(state['count']) == 3 * size


def test_random_search_is_uniform():
  random = make('random')
  state = random.init(0)
  tokens, state = random.ask(state, 6000)
  for p, c in enumerate(CHOICES):
    counts = np.bincount(tokens[:, p], minlength=c)
    assert len(counts) == c
    np.testing.assert_allclose(counts / 6000, 1 / c, atol=0.03)
  state, metrics = random.tell(state, tokens[:3], np.array([0.1, 0.5, 0.2]))
  assert metrics['best_reward'] == pytest.approx(0.5)
  np.testing.assert_allclose(metrics['entropy'], sum(np.log(CHOICES)))


def test_strategies_run_on_the_cpu_at_highest_precision(ppo, evolution):
  """Whatever the default device and its matmul precision: same tokens, state on the CPU."""
  cpu = jax.local_devices(backend='cpu')[0]
  other = jax.devices()[5]  # conftest's 8 CPU devices
  for strategy in (ppo, evolution, make('random')):
    expected, _ = strategy.ask(strategy.init(0), BATCH)
    with jax.default_device(other), jax.default_matmul_precision('bfloat16'):
      tokens, moved = strategy.ask(jax.device_put(strategy.init(0), other), BATCH)
      # A smaller batch (the children that fit) is told as well; PPO compiles it once more.
      told, _ = strategy.tell(moved, tokens[:3], (tokens[:3] == 1).mean(1))
    np.testing.assert_array_equal(tokens, expected)
    assert {d for leaf in jax.tree_util.tree_leaves((moved, told)) for d in leaf.devices()} == {cpu}
    assert int(told['step']) == 1
  state = ppo.init(0)
  with controller.on_cpu():
    lowered = jax.jit(controller.sample, static_argnums=(2, 3)).lower(
      state['params'], state['key'], CHOICES, 4
    )
  assert 'precision = [HIGHEST, HIGHEST]' in lowered.as_text()


def test_orbax_round_trip(ppo, evolution, tmp_path):
  strategies = {'ppo': ppo, 'evolution': evolution, 'random': make('random')}
  states = {}
  for name, strategy in strategies.items():
    state = strategy.init(5)
    for _ in range(2):
      tokens, state = strategy.ask(state, BATCH)
      state, _ = strategy.tell(state, tokens, (tokens == 0).mean(1))
    states[name] = state
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'states', states)
  checkpointer.wait_until_finished()
  abstract = jax.tree_util.tree_map(
    ocp.utils.to_shape_dtype_struct, {name: s.init(0) for name, s in strategies.items()}
  )
  restored = checkpointer.restore(tmp_path / 'states', abstract)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(states)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(states)):
    np.testing.assert_array_equal(a, b)
  for name, strategy in strategies.items():
    expected, _ = strategy.ask(states[name], BATCH)
    got, _ = strategy.ask(restored[name], BATCH)
    np.testing.assert_array_equal(got, expected)


def test_bad_inputs(ppo):
  state = ppo.init(0)
  with pytest.raises(ValueError, match=r'shape \[num, 5\]'):
    ppo.tell(state, np.zeros((4, 3)), np.zeros(4))
  with pytest.raises(ValueError, match='expected 4 rewards'):
    ppo.tell(state, np.zeros((4, 5)), np.zeros(3))
  with pytest.raises(ValueError, match='finite'):
    ppo.tell(state, np.zeros((2, 5)), np.array([0.1, np.nan]))
  with pytest.raises(ValueError, match='num must be a positive integer'):
    ppo.ask(state, 0)
  with pytest.raises(errors.UserError, match="unknown strategy 'annealing'"):
    make('annealing')
  with pytest.raises(errors.UserError, match=r'sample_size \(0\) must be positive'):
    make('evolution', evolution={'population_size': 8, 'sample_size': 0})
