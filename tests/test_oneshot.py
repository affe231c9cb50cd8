"""The search on shared weights, in process, on 8 devices (conftest.py): the tiny space of
test_search.py, synthetic 16 px data, a few supernet steps per child."""

import copy
import json
import os

import jax
import numpy as np
import pytest
import test_search

from mnasnet_jax import controller
from mnasnet_jax import errors
from mnasnet_jax import history
from mnasnet_jax import memory
from mnasnet_jax import oneshot
from mnasnet_jax import search
from mnasnet_jax import search_space
from mnasnet_jax import train
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config


def tiny_oneshot(table_path, cache_dir, strategy='reinforce', num_children=4):
  """Every test's programs are the same: compiled once, then read from the persistent cache."""
  config = test_search.tiny_config(
    table_path, num_children=num_children, children_per_step=2, cache_dir=cache_dir
  )
  shipped = search_config.get_config('oneshot_local')
  config.job = shipped.job
  config.oneshot = shipped.oneshot
  # A checkpoint at the warm-up's end and after each controller step; one report, at the end (each
  # checkpoint and each plot took seconds here).
  config.oneshot.update(warmup_steps=2, train_steps_per_child=1, checkpoint_every_steps=100)
  config.oneshot.largest_first_steps = 1  # the warm-up's first child the largest
  config.search.report_every_steps = 0
  config.oneshot.update(eval_batch_size=16, eval_examples=32)
  # Two finalists, trained alone as test_search.py's children are, for a step less than the
  # supernet's recipe says (a finalist trained with the supernet's would show).
  config.oneshot.finalists = 2
  config.oneshot.finalist_proxy = copy.deepcopy(config.proxy)
  config.oneshot.finalist_proxy.num_steps -= 1
  config.reward = shipped.reward
  config.reward.target_ms = 0.5
  config.controller.strategy = strategy
  config.proxy.batch_size = 16  # 2 images on each of the 8 devices
  return config


@pytest.fixture(scope='module')
def table(tmp_path_factory):
  return test_search.tiny_table(str(tmp_path_factory.mktemp('table') / 'tiny.json'))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


def _records(workdir):
  return history.read(os.path.join(workdir, 'history.jsonl'))


def test_shipped_configs():
  for arg, local in (('oneshot', False), ('oneshot_local', True), ('oneshot,local', True)):
    config = search_config.get_config(arg)
    assert config.job == 'oneshot' and config.reward.kind == 'absolute'
    assert config.controller.strategy == 'reinforce'
    assert (config.data.dataset == 'fashion_mnist') == local
    assert config.search.train_config == 'configs/train.py' + (':local' if local else '')
    assert config.proxy.num_steps == (
      config.oneshot.warmup_steps
      + config.search.num_children * config.oneshot.train_steps_per_child
    )
    # The finalists train as the multi-trial search's children, not as the supernet.
    assert (
      config.oneshot.finalist_proxy == search_config.get_config('local' if local else None).proxy
    )
    assert config.oneshot.finalist_proxy != config.proxy
    # Locally the recipe's classifier range (ImageNet's), not the official one ten times wider.
    recipe = train_config.get_config('local' if local else None)
    assert config.proxy.classifier_init_range == recipe.classifier_init_range
  with pytest.raises(errors.UserError, match='oneshot_local'):
    search_config.get_config('bogus')


def test_warmup_starts_at_the_largest_child():
  """The ramp: all largest at step 0; a quarter of the way down, each decision is the largest
  with probability 3/4 + 1/(4 options); after it, the uniform draw itself."""
  space = search_space.SearchSpace(search_config.get_config('local').search_space)
  largest = np.array(space.largest())
  np.testing.assert_array_equal(oneshot.warmup_tokens(space, 0, 0, 100), largest)
  for step in (100, 170):
    np.testing.assert_array_equal(
      oneshot.warmup_tokens(space, 0, step, 100), oneshot.warmup_tokens(space, 0, step, 0)
    )
  drawn = [oneshot.warmup_tokens(space, seed, 25, 100) for seed in range(400)]
  rate = np.mean(np.equal(drawn, largest), axis=0)
  expected = 0.75 + 0.25 / np.array(space.choices)
  np.testing.assert_allclose(rate.mean(), expected.mean(), atol=0.02)
  uniform = [oneshot.warmup_tokens(space, seed, 25, 0) for seed in range(400)]
  np.testing.assert_allclose(
    np.mean(np.equal(uniform, largest)), np.mean(1 / np.array(space.choices)), atol=0.02
  )


def test_reinforce_learns_the_best_token():
  """On a reward that counts token 1s, REINFORCE's logits move every position towards 1."""
  config = search_config.get_config('oneshot_local').controller
  strategy = controller.create(config, (2, 3, 2))
  state = strategy.init(0)
  for _ in range(60):
    tokens, state = strategy.ask(state, 16)
    state, metrics = strategy.tell(state, tokens, (tokens == 1).sum(1).astype(np.float32))
  tokens, _ = strategy.ask(state, 200)
  assert (tokens == 1).mean() > 0.8, tokens.mean(0)
  assert np.isfinite(metrics['entropy'])
  np.testing.assert_array_equal(strategy.most_likely(state), [1, 1, 1])


@pytest.mark.slow  # a search each: 14-50 s here at load 5
@pytest.mark.parametrize('strategy', ['reinforce', 'ppo', 'evolution'])
def test_search_writes_history_and_report(tmp_path, table, cache, strategy):
  config = tiny_oneshot(table, cache, strategy)
  workdir = str(tmp_path / 'oneshot')
  oneshot.run(config, workdir)
  records = _records(workdir)
  assert [r['trial'] for r in records] == list(range(4))
  assert [r['step'] for r in records] == [0, 0, 1, 1]
  for r in records:
    assert r['status'] == 'ok' and 0 <= r['accuracy'] <= 1 and np.isfinite(r['reward'])
    # warm-up, then one supernet step per child
    assert r['supernet_step'] == 2 + r['trial'] + 1
  best = open(os.path.join(workdir, 'best.md')).read()
  assert 'configs/train.py:local --config.arch=' in best
  assert 'Accuracy is top-1 of the shared weights' in best
  summary = json.load(open(os.path.join(workdir, 'pareto.json')))
  answer = summary['policy_answer']
  if strategy == 'evolution':  # no policy: the children by reward are the answer
    assert answer is None and "The policy's answer" not in best
  else:
    assert len(answer['tokens']) == len(config.search_space.searched_blocks) * 6
    assert "The policy's answer" in best and ','.join(answer['blocks']) in best
  # The finalists: distinct, the policy's answer first, each trained alone with the multi-trial
  # proxy and seed train_seed + finalist, as the multi-trial search trains its child of that trial.
  finalists = history.read(os.path.join(workdir, 'finalists.jsonl'))
  assert [r['trial'] for r in finalists] == [0, 1]
  assert finalists[0]['tokens'] != finalists[1]['tokens']
  if answer is not None:
    assert finalists[0]['tokens'] == answer['tokens']
  searcher = search.Search(config, str(tmp_path / 'alone'))
  for r in finalists:
    alone = train.proxy_train(
      config.oneshot.finalist_proxy,
      searcher.architecture(r['blocks']),
      searcher.data,
      seed=r['trial'],
    )
    assert r['status'] == 'ok' and r['accuracy'] == np.float32(alone['accuracy'])
  ranked = summary['finalists']
  assert ranked[0]['reward'] == max(r['reward'] for r in finalists)
  assert f'The answer, finalist {ranked[0]["trial"]}' in best
  assert best.index('The answer') < best.index(','.join(ranked[0]['blocks']))


@pytest.mark.slow  # three searches
def test_resume_after_a_kill_is_an_uninterrupted_run(tmp_path, table, cache, monkeypatch):
  """A run stopped inside a controller step (after one child is recorded) and started again ends
  with the history and supernet of a run never stopped."""
  config = tiny_oneshot(table, cache)
  search.enable_compilation_cache(config.search, str(tmp_path))
  whole = oneshot.OneShotSearch(config, str(tmp_path / 'whole'))
  whole.run()

  workdir = str(tmp_path / 'killed')
  original = oneshot.OneShotSearch.shared_accuracy
  calls = []

  def dies_at_the_fourth(self, trial, tokens):
    calls.append(trial)
    if len(calls) == 4:
      raise KeyboardInterrupt('kill')
    return original(self, trial, tokens)

  monkeypatch.setattr(oneshot.OneShotSearch, 'shared_accuracy', dies_at_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    oneshot.OneShotSearch(config, workdir).run()
  assert len(_records(workdir)) == 3  # trial 2 of step 1 recorded, trial 3 not
  monkeypatch.setattr(oneshot.OneShotSearch, 'shared_accuracy', original)
  trained = []
  train_on = oneshot.OneShotSearch.train_on
  monkeypatch.setattr(
    oneshot.OneShotSearch,
    'train_on',
    lambda self, tokens, steps: trained.append(steps) or train_on(self, tokens, steps),
  )
  resumed = oneshot.OneShotSearch(config, workdir)
  resumed.run()
  assert resumed.supernet_step == whole.supernet_step == 2 + 4
  # It went on from the checkpoint after controller step 0 (supernet step 4): only step 1's two
  # children trained again, not the whole run from the start.
  assert sum(trained) == 2
  strip = lambda rs: [{k: r[k] for k in ('trial', 'tokens', 'accuracy', 'reward')} for r in rs]
  assert strip(_records(workdir)) == strip(_records(str(tmp_path / 'whole')))
  finalists = lambda w: strip(history.read(os.path.join(w, 'finalists.jsonl')))
  assert len(finalists(workdir)) == 2
  assert finalists(workdir) == finalists(str(tmp_path / 'whole'))
  for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # four compiles of the supernet's step
def test_supernet_step_fits_the_device_memory_or_stops_with_one_line(tmp_path, table, cache):
  """The supernet's train step goes through memory.fit as a child's does: under a budget below
  its whole batch's bytes it runs as micro-batches (and trains), under one nothing fits it stops
  the search with a user's error naming the supernet."""
  config = tiny_oneshot(table, cache)
  whole = oneshot.OneShotSearch(config, str(tmp_path / 'whole')).fit_train_step()
  total, _ = memory.program_bytes(whole)
  config.proxy.device_memory_gib = 0.9 * total / memory.GIB
  searcher = oneshot.OneShotSearch(config, str(tmp_path / 'fitted'))
  searcher.resume()  # the warm-up's two steps, on the fitted step
  assert searcher.supernet_step == 2
  assert memory.program_bytes(searcher.train_fn)[0] <= 0.9 * total
  config.proxy.device_memory_gib = 1e-6
  with pytest.raises(errors.UserError, match='^the supernet: .* fits no micro-batch'):
    oneshot.OneShotSearch(config, str(tmp_path / 'none')).fit_train_step()
