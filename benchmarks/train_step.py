"""Throughput of a full training step (forward, backward, RMSProp-TF update) and batch-1 latency.

    python benchmarks/train_step.py --arch=mnasnet_a1 --batch=16 --resolution=224 [--depthwise=all]
                                    [--conv=auto] [--proxy=mobilenet_v2]

Uses the project's own data-parallel train step (`train.train_step` under jit(shard_map)) on one
device with the recipe of configs/train.py. `--proxy` also proxy-trains that child as the local
search does (`configs/search.py:local`, Fashion-MNIST) and splits its time into compile, training
and evaluation. The last line printed is one JSON object.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mnasnet_jax import allocator
from mnasnet_jax import input_pipeline
from mnasnet_jax import platform
from mnasnet_jax import train
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config

_ARCH = flags.DEFINE_string('arch', 'mnasnet_a1', 'Named architecture or comma-separated blocks.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Training batch size.')
_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Input resolution.')
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
_DEPTHWISE = flags.DEFINE_enum(
  'depthwise',
  'all',
  ['all', 'auto', *platform.DEPTHWISE_FORMS],
  'Depthwise-conv form(s) to measure.',
)
_CONV = flags.DEFINE_enum(
  'conv', 'auto', ['auto', *platform.CONV_FORMS], 'Form of the regular (stem, 1x1) convs.'
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed training steps.')
_INFER_RUNS = flags.DEFINE_integer('infer_runs', 30, 'Timed batch-1 inference runs.')
_PROXY = flags.DEFINE_string(
  'proxy', '', 'A child to proxy-train as the local search does ("": none).'
)


def measure(form: str) -> dict:
  config = train_config.get_config()
  config.depthwise = form
  config.conv = _CONV.value
  model = train.create_model(config, _ARCH.value, _CLASSES.value)
  tx, schedule = train.create_optimizer(config, steps_per_epoch=1000)
  mesh = platform.data_mesh(jax.local_devices()[:1])
  state = train.replicate(train.create_state(model, tx, _RESOLUTION.value, True, 0), mesh)
  state = jax.tree.map(jnp.copy, state)  # the EMA starts as the weights: give it its own buffers
  step = train.data_parallel(
    functools.partial(train.train_step, model=model, tx=tx, schedule=schedule, config=config),
    mesh,
    2,
    donate_state=True,
  )
  rng = np.random.default_rng(0)
  images = rng.normal(size=(_BATCH.value, _RESOLUTION.value, _RESOLUTION.value, 3)).astype(
    np.float32
  )
  labels = rng.integers(0, _CLASSES.value, _BATCH.value).astype(np.int32)
  batch = train.shard_batch(mesh, images, labels)

  start = time.perf_counter()
  compiled = step.lower(state, *batch).compile()
  compile_seconds = time.perf_counter() - start
  state, metrics = compiled(state, *batch)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, *batch)
  jax.block_until_ready(metrics)
  step_seconds = (time.perf_counter() - start) / _STEPS.value

  infer = jax.jit(lambda v, x: model.clone(bn_axis_name=None).apply(v, x))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  one = jnp.asarray(images[:1])
  jax.block_until_ready(infer(variables, one))
  times = []
  for _ in range(_INFER_RUNS.value):
    start = time.perf_counter()
    jax.block_until_ready(infer(variables, one))
    times.append(time.perf_counter() - start)
  return {
    'depthwise': model.depthwise,
    'conv': model.conv,
    'compile_seconds': round(compile_seconds, 2),
    'train_images_per_sec': round(_BATCH.value / step_seconds, 2),
    'infer_ms': round(1000 * float(np.median(times)), 2),
  }


def main(argv):
  del argv
  forms = list(platform.DEPTHWISE_FORMS) if _DEPTHWISE.value == 'all' else [_DEPTHWISE.value]
  results = {}
  for form in forms:
    results[form] = measure(form)
    r = results[form]
    print(
      f'{_ARCH.value} {_RESOLUTION.value}px batch {_BATCH.value}, depthwise {r["depthwise"]}, '
      f'convs {r["conv"]}: '
      f'{r["train_images_per_sec"]} train images/s, compile {r["compile_seconds"]} s, '
      f'batch-1 inference {r["infer_ms"]} ms',
      flush=True,
    )
  default = platform.depthwise_form(_DEPTHWISE.value if _DEPTHWISE.value != 'all' else 'auto')
  best = results.get(default) or next(iter(results.values()))
  report = {
    'arch': _ARCH.value,
    'batch': _BATCH.value,
    'resolution': _RESOLUTION.value,
    'backend': jax.default_backend(),
    'devices': jax.device_count(),
    **best,
    'forms': results,
  }
  if _PROXY.value:
    config = search_config.get_config('local')
    proxy = train.proxy_train(
      config.proxy, _PROXY.value, input_pipeline.create_proxy_data(config.data)
    )
    print(
      f'proxy child {_PROXY.value}: compile {proxy["compile_seconds"]:.1f} s, train '
      f'{proxy["train_seconds"]:.1f} s ({proxy["steps"]} steps), eval '
      f'{proxy["eval_seconds"]:.1f} s, held-out top-1 {proxy["accuracy"]:.3f}',
      flush=True,
    )
    report['proxy'] = dict(proxy, arch=_PROXY.value)
  print(json.dumps(report))


if __name__ == '__main__':
  allocator.use_tcmalloc()
  app.run(main)
