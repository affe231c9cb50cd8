import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mnasnet_jax import input_pipeline
from mnasnet_jax import platform
from mnasnet_jax import train
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config

ARCH = ['r1_k3_s11_e1_i32_o16_noskip', 'r1_k3_s22_e3_i16_o24_se0.25']


def _train_config(**overrides):
  config = train_config.get_config('local')
  config.arch = ','.join(ARCH)
  config.data = ml_collections.ConfigDict(
    dict(
      dataset='synthetic',
      split='full',
      image_size=16,
      num_classes=4,
      num_train=256,
      num_eval=64,
      holdout=32,
      split_seed=0,
    )
  )
  config.depth_multiplier = 0.5
  config.batch_size, config.eval_batch_size = 32, 32
  config.log_every_steps = config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.update(overrides)
  return config


def _setup(config, devices, state=None):
  mesh = platform.data_mesh(devices)
  model = train.create_model(config, config.arch, 4)
  tx, schedule = train.create_optimizer(config, steps_per_epoch=8)
  if state is None:
    state = jax.device_get(train.create_state(model, tx, 16, bool(config.ema_decay), seed=0))
  return mesh, model, tx, schedule, state


def _batches(n):
  """Batches as the model sees them (the data's uint8 normalised as the steps do on the device)."""
  data = input_pipeline.create(_train_config().data, 'full')
  return [
    (np.asarray(train.normalise(images, (data.mean, data.std))), labels)
    for _, (images, labels) in zip(range(n), data.train_batches(32, seed=0))
  ]


def test_shard_map_equals_pmap_and_one_device():
  config = _train_config(dropout_rate=0.0, ema_decay=0.9, warmup_epochs=0.0)
  batches = _batches(2)
  devices = jax.devices()
  assert len(devices) == 8
  results = {}
  initial = _setup(config, devices)[4]
  for name, devs in (('mesh8', devices), ('mesh1', devices[:1])):
    mesh, model, tx, schedule, state = _setup(config, devs, initial)
    train_fn = train.train_program(config, model, tx, schedule, mesh)
    state = train.replicate(state, mesh)
    for images, labels in batches:
      state, metrics = train_fn(state, *train.shard_batch(mesh, images, labels))
    results[name] = jax.device_get((state, metrics))
  # The same per-device step under jax.pmap.
  mesh, model, tx, schedule, state = _setup(config, devices, initial)
  step = functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config)
  pmapped = jax.pmap(step, axis_name=platform.BATCH_AXIS)
  state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (8,) + np.shape(x)), state)
  for images, labels in batches:
    state, metrics = pmapped(state, images.reshape(8, 4, 16, 16, 3), labels.reshape(8, 4))
  results['pmap'] = jax.device_get(jax.tree.map(lambda x: x[0], (state, metrics)))
  reference = results['mesh8']
  assert int(reference[0].step) == 2
  for name in ('pmap', 'mesh1'):
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-5), results[name], reference
    )
  # Training moved the weights, the BN statistics and the average.
  moved = jax.tree.map(
    lambda a, b: float(np.abs(a - b).max()),
    (reference[0].params, reference[0].batch_stats, reference[0].ema_params),
    (initial.params, initial.batch_stats, initial.ema_params),
  )
  assert min(jax.tree.leaves(moved)) > 0


def test_one_initialisation_program_serves_every_seed(tmp_path):
  """The seed is data: a second seed hits the compilation cache, with a constant seed's values."""
  from jax.experimental.compilation_cache import compilation_cache

  config = _train_config()
  model = train.create_model(config, config.arch, 4)
  tx, _ = train.create_optimizer(config, steps_per_epoch=8)
  hits = []
  count = lambda event, **kwargs: hits.append(event == '/jax/compilation_cache/cache_hits')
  settings = {
    'jax_compilation_cache_dir': str(tmp_path),
    'jax_persistent_cache_min_compile_time_secs': 0,
  }
  before = {name: getattr(jax.config, name) for name in settings}
  jax.monitoring.register_event_listener(count)
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  try:
    states = [jax.device_get(train.create_state(model, tx, 16, True, seed)) for seed in (0, 1)]
  finally:
    jax.monitoring.unregister_event_listener(count)
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
  assert sum(hits) == 1  # the second seed's
  key = jax.random.split(jax.random.key(1, impl=train.RNG_IMPL))[0]
  constant = jax.jit(lambda: model.init(key, jnp.zeros((1, 16, 16, 3))))()
  for got, want in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(constant['params'])):
    np.testing.assert_array_equal(got, want)
  assert not all(map(np.array_equal, *(jax.tree.leaves(s.params) for s in states)))


def test_recalibrated_statistics_are_the_batches_own_on_8_devices():
  config = _train_config(bn_group_size=8)  # 4 images per device: a group spans 2 devices
  mesh, model, tx, schedule, state = _setup(config, jax.devices())
  batches = _batches(3)
  stats_fn = train.batch_stats_program(model.clone(bn_momentum=0.0), mesh)
  recalibrated = train.recalibrate_batch_stats(
    stats_fn, train.replicate(state, mesh), iter(batches), 3, mesh, use_ema=False
  )
  # By hand, for the stem's BN: the mean and (Bessel-corrected) variance of the stem conv's output
  # over each group of 8 images, averaged over the groups and the three batches.
  kernel = state.params['stem']['kernel']
  outputs = [
    jax.lax.conv_general_dilated(
      images, kernel, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    for images, _ in batches
  ]
  groups = np.concatenate([np.reshape(o, (4, -1, o.shape[-1])) for o in outputs])
  stem = jax.device_get(recalibrated.batch_stats['stem_bn'])
  np.testing.assert_allclose(stem['mean'], groups.mean(1).mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stem['var'], groups.var(1, ddof=1).mean(0), rtol=1e-3, atol=1e-5)


def test_each_model_keeps_its_own_dropout_unless_the_config_sets_one():
  config = train_config.get_config()
  assert config.dropout_rate is None
  assert train.create_model(config, 'mnasnet_small', 10).dropout_rate == 0.0
  assert train.create_model(config, 'mnasnet_a1', 10).dropout_rate == 0.2
  config.dropout_rate = 0.3
  assert train.create_model(config, 'mnasnet_small', 10).dropout_rate == 0.3


def test_the_classifier_starts_in_the_official_range_unless_the_config_sets_one():
  def classifier_kernel(config, arch='r1_k3_s11_e1_i32_o16_noskip'):
    model = train.create_model(config, arch, 10)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    return np.asarray(variables['params']['classifier']['kernel'])

  # The paper's recipe and the local search's proxy keep the official range; the local recipe
  # starts in ImageNet's.
  assert train_config.get_config().classifier_init_range is None
  assert search_config.get_config('local').proxy.classifier_init_range is None
  config = train_config.get_config('local')
  assert config.classifier_init_range == 1000**-0.5
  narrow = classifier_kernel(config)
  config.classifier_init_range = None
  official = classifier_kernel(config)
  # Uniform in +-1/sqrt(10) (the official code's rule), and in +-1/sqrt(1,000) as set: the same
  # draws, scaled.
  assert 0.3 < np.abs(official).max() <= 10**-0.5
  np.testing.assert_allclose(narrow, official * (10 / 1000) ** 0.5, rtol=1e-5, atol=1e-7)


def test_weight_penalty_skips_batchnorm_only():
  config = _train_config()
  _, _, _, _, state = _setup(config, jax.devices()[:1])
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  expected = sum(
    0.5 * float(jnp.sum(w**2)) for path, w in flat if not str(path[-2].key).endswith('_bn')
  )
  assert any(str(path[-2].key).endswith('_bn') for path, _ in flat)
  np.testing.assert_allclose(
    float(train.weight_penalty(state.params, state.batch_stats)), expected, rtol=1e-5
  )


def test_ema_decay_warms_up_like_tf():
  np.testing.assert_allclose(train.ema_decay_at(0.9999, 0), 0.1)
  np.testing.assert_allclose(train.ema_decay_at(0.9999, 90), 0.91)
  np.testing.assert_allclose(train.ema_decay_at(0.9999, 10**7), 0.9999)


class _Killed(Exception):
  pass


@pytest.mark.slow
def test_killed_run_resumes_like_an_uninterrupted_one(tmp_path, monkeypatch):
  config = _train_config(num_steps=8, num_epochs=0.0)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))

  real = input_pipeline.ArrayData.train_batches

  def dies_after_five(self, *args, **kwargs):
    for i, batch in enumerate(real(self, *args, **kwargs)):
      if i == 5:
        raise _Killed()
      yield batch

  monkeypatch.setattr(input_pipeline.ArrayData, 'train_batches', dies_after_five)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(input_pipeline.ArrayData, 'train_batches', real)
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints'))[-1] == '4'
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert resumed == pytest.approx(full, rel=1e-4)

  import orbax.checkpoint as ocp

  states = [
    ocp.CheckpointManager(str(tmp_path / run / 'checkpoints')).restore(8)
    for run in ('full', 'resumed')
  ]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), *states)
  assert int(states[0]['step']) == 8 and files_in(tmp_path / 'full', 'events.out.tfevents')


def files_in(directory, prefix):
  return [f for f in os.listdir(directory) if f.startswith(prefix)]


def _proxy_config(**overrides):
  """The local search's proxy section (so every key proxy_train reads is the declared one), with
  this toy problem's recipe."""
  config = _train_config()
  proxy = search_config.get_config('local').proxy
  proxy.update(
    {
      k: config[k]
      for k in (
        'batch_size',
        'eval_batch_size',
        'base_learning_rate',
        'warmup_epochs',
        'lr_decay_rate',
        'lr_decay_epochs',
        'rmsprop_decay',
        'momentum',
        'rmsprop_epsilon',
        'weight_decay',
        'label_smoothing',
        'dropout_rate',
        'depth_multiplier',
        'depthwise',
        'conv',
        'dtype',
      )
    }
  )
  proxy.update(
    dict(
      num_steps=30,
      num_epochs=0.0,
      ema_decay=0.0,
      eval_examples=None,
      bn_momentum=0.8,
      bn_recalibration_batches=2,
    )
  )
  proxy.update(overrides)
  return proxy


def test_proxy_train_learns_and_reports():
  data = input_pipeline.create_proxy_data(_train_config().data)
  result = train.proxy_train(_proxy_config(), ARCH, data, seed=0, devices=jax.devices()[:2])
  assert set(result) >= {'accuracy', 'compile_seconds', 'train_seconds', 'steps', 'final_loss'}
  assert result['steps'] == 30 and result['compile_seconds'] > 0
  assert result['accuracy'] > 0.6  # 4 classes: chance is 0.25


def test_proxy_train_raises_on_divergence():
  data = input_pipeline.create_proxy_data(_train_config().data)
  with pytest.raises(train.TrainingDiverged, match='nan'):
    train.proxy_train(
      _proxy_config(base_learning_rate=float('nan'), num_steps=2),
      ARCH,
      data,
      devices=jax.devices()[:1],
    )


def test_proxy_train_raises_does_not_fit_when_no_micro_batch_fits():
  data = input_pipeline.create_proxy_data(_train_config().data)
  with pytest.raises(train.DoesNotFit, match='fits no micro-batch'):
    train.proxy_train(
      _proxy_config(device_memory_gib=1e-6, num_steps=2), ARCH, data, devices=jax.devices()[:1]
    )
