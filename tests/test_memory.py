import functools
import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mnasnet_jax import memory
from mnasnet_jax import platform
from mnasnet_jax import train
from mnasnet_jax.configs import train as train_config

ARCH = ['r1_k3_s11_e1_i32_o16_noskip', 'r1_k3_s22_e3_i16_o24_se0.25']


def _config(**overrides):
  config = train_config.get_config('local')
  config.update(
    dict(depth_multiplier=0.5, dropout_rate=0.0, ema_decay=0.9, warmup_epochs=0.0, **overrides)
  )
  return config


def _setup(config, devices):
  mesh = platform.data_mesh(devices)
  model = train.create_model(config, ARCH, 4)
  tx, schedule = train.create_optimizer(config, steps_per_epoch=8.0)
  state = jax.device_get(train.create_state(model, tx, 16, True, seed=0))
  return mesh, model, tx, schedule, state


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 16, 16, 3)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch():
  # 8 devices x 8 images, BN groups of 4: the whole batch in one pass, as 2 micro-batches of one
  # group each, and the same rematerialised. Two steps, so RMSProp's and the EMA's state move too.
  config = _config(batch_size=64, bn_group_size=4)
  mesh, model, tx, schedule, initial = _setup(config, jax.devices())
  batches = [_batch(64, seed) for seed in (0, 1)]
  results = {}
  for micro_batch, remat in ((None, False), (4, False), (4, True)):
    step = train.data_parallel(
      functools.partial(
        train.train_step,
        model=model.clone(remat=remat),
        tx=tx,
        schedule=schedule,
        config=config,
        micro_batch=micro_batch,
      ),
      mesh,
      2,
    )
    state = train.replicate(initial, mesh)
    for images, labels in batches:
      state, metrics = step(state, *train.shard_batch(mesh, images, labels))
    results[micro_batch, remat] = jax.device_get((state, metrics))
  whole = results[None, False]
  for key in ((4, False), (4, True)):
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-5), results[key], whole
    )
  moved = jax.tree.map(
    lambda a, b: float(np.abs(a - b).max()),
    (
      whole[0].params,
      whole[0].batch_stats,
      whole[0].ema_batch_stats,
      whole[0].opt_state.mean_square,
    ),
    (initial.params, initial.batch_stats, initial.ema_batch_stats, initial.opt_state.mean_square),
  )
  assert min(jax.tree.leaves(moved)) > 0


def test_micro_batch_options_keep_bn_groups_before_rematerialising():
  options = train.micro_batch_options(1024, 4, 128)
  assert options[:4] == [(1024, False), (512, False), (256, False), (128, False)]
  assert options[4:] == [(m, True) for m in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)]
  # Statistics over the whole batch: only the whole batch keeps them without rematerialising.
  assert train.micro_batch_options(8, 2, None) == [(8, False)] + [(m, True) for m in (8, 4, 2, 1)]


class _Compiled:
  """A compiled program as memory.fit sees it: 100 bytes of arguments, temporaries linear in the
  micro-batch with a part that does not shrink, a quarter of it when rematerialised (`saving`)."""

  def __init__(self, micro_batch, remat, saving=0.25):
    self.temp = (40 * saving if remat else 40) * micro_batch + 50

  def memory_analysis(self):
    return types.SimpleNamespace(
      argument_size_in_bytes=100,
      output_size_in_bytes=20,
      alias_size_in_bytes=20,
      temp_size_in_bytes=self.temp,
    )


@pytest.mark.parametrize(
  'budget, chosen, compiled',
  [
    (None, (64, False), [(64, False)]),
    (100 + 40 * 16 + 50, (16, False), [(64, False), (16, False)]),  # 32 estimated too large
    (100 + 10 * 8 + 50, (8, True), [(64, False), (64, True), (8, True)]),
  ],
)
def test_fit_compiles_the_estimated_largest_micro_batch_that_fits(budget, chosen, compiled):
  calls = []

  def compile_step(micro_batch, remat):
    calls.append((micro_batch, remat))
    return _Compiled(micro_batch, remat)

  fit = memory.fit(compile_step, train.micro_batch_options(64, 1, 8), budget)
  assert (fit.micro_batch, fit.remat) == chosen and calls == compiled
  assert fit.bytes == 100 + fit.compiled.temp and (budget is None or fit.bytes <= budget)


def test_fit_goes_on_without_rematerialising_where_it_saves_nothing():
  calls = []

  def compile_step(micro_batch, remat):
    calls.append((micro_batch, remat))
    return _Compiled(micro_batch, remat, saving=1.0)  # as XLA:CPU schedules it

  fit = memory.fit(compile_step, train.micro_batch_options(64, 1, 8), budget=100 + 40 * 4 + 50)
  assert (fit.micro_batch, fit.remat) == (4, False)
  assert calls == [(64, False), (64, True), (4, False)]


def test_fit_skips_what_the_compiler_refuses_and_raises_when_nothing_fits():
  def compile_step(micro_batch, remat):
    if micro_batch == 64:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm')
    return _Compiled(micro_batch, remat)

  fit = memory.fit(compile_step, [(64, False), (32, False)], budget=10**6)
  assert fit.micro_batch == 32
  with pytest.raises(memory.DoesNotFit, match='fits no micro-batch in'):
    memory.fit(compile_step, train.micro_batch_options(64, 1, 8), budget=150)
  with pytest.raises(memory.DoesNotFit, match='ran out of device memory'):
    with memory.out_of_memory_does_not_fit('step 3'):
      compile_step(64, False)


def test_budget_from_the_config_else_the_device():
  assert memory.budget_bytes(16.0) == 16 * 2**30
  assert memory.budget_bytes(None, jax.devices('cpu')[0]) is None  # XLA:CPU reports no limit
  with pytest.raises(ValueError, match='device_memory_gib = 0'):
    memory.budget_bytes(0.0)


def _fit(config, mesh, model, tx, schedule, state):
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      np.shape(x), jnp.asarray(x).dtype, sharding=NamedSharding(mesh, P())
    ),
    state,
  )
  images, labels = _batch(config.batch_size)
  split = NamedSharding(mesh, P(platform.BATCH_AXIS))
  batch = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split) for x in (images, labels)]
  return train.fit_train_step(config, model, tx, schedule, mesh, shapes, batch)


def test_a_small_memory_budget_gets_a_smaller_micro_batch_or_does_not_fit():
  # 2 devices x 32 images, BN groups of 8: the budget lies between the whole batch's and half's.
  config = _config(batch_size=64, bn_group_size=8)
  mesh, model, tx, schedule, state = _setup(config, jax.devices()[:2])
  whole = _fit(config, mesh, model, tx, schedule, state)
  assert (whole.micro_batch, whole.remat) == (32, False)  # no budget on CPU: nothing fitted
  config.device_memory_gib = whole.bytes * 0.8 / memory.GIB
  fitted = _fit(config, mesh, model, tx, schedule, state)
  assert fitted.micro_batch < 32 and fitted.bytes <= whole.bytes * 0.8
  # The fitted step runs, and trains as the whole batch's step does.
  images, labels = _batch(64)
  runs = [
    fn(train.replicate(state, mesh), *train.shard_batch(mesh, images, labels))[1]
    for fn in (whole.compiled, fitted.compiled)
  ]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4), *jax.device_get(runs))
  config.device_memory_gib = 1e-6
  with pytest.raises(train.DoesNotFit, match='fits no micro-batch'):
    _fit(config, mesh, model, tx, schedule, state)
