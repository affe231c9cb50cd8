"""Per-device memory of the proxy's train step, before and after micro-batching, by XLA's analysis.

    python benchmarks/memory.py [--hosts=4,8] [--budgets_gib=16,32]
        [--archs=widest,mobilenet_v2,supernet]

The paper's proxy batch (configs/search.py: 4096 images) on one host's chips is 1024 images per
chip on a 4-chip host and 512 on an 8-chip one. For the default search space's widest child (every
searched block at its widest option of each decision, read from the space's config), for
MobileNetV2 and for the one-shot search's supernet (configs/search.py:oneshot trains it at the same
batch, the child's choices entering its step as data: oneshot.train_step), at 224 px in bfloat16
with the native forms a TPU runs, this prints the per-device bytes of the compiled train step
(arguments, outputs and temporaries: memory.program_bytes):

* before: the whole per-device batch in one pass, BatchNorm over the whole global batch;
* after: the micro-batch memory.fit chooses against each budget (16 GiB: a v5e chip, 32 GiB: v4),
  BatchNorm over groups of 128 images (the official recipe's per-core statistics).

Everything is lowered from shapes alone; the host's chips are CPU devices, whose compiler's memory
analysis stands in for the TPU's (for the children XLA:CPU schedules rematerialised activations so
that they save nothing: memory.fit finds so and goes on without; for the supernet they save more
than half). Compiles are cached on disk for the run, so the budgets share the compiles they have in
common; the whole run compiles about 30 programs, most of an hour on 2 busy cores
(`--archs=mobilenet_v2 --hosts=8`: 4 programs, a few minutes; `--archs=supernet`: 18 minutes). The
last line printed is one JSON object.
"""

import concurrent.futures
import functools
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mnasnet_jax import memory  # noqa: E402
from mnasnet_jax import oneshot  # noqa: E402
from mnasnet_jax import platform  # noqa: E402
from mnasnet_jax import search_space as search_space_lib  # noqa: E402
from mnasnet_jax import supernet  # noqa: E402
from mnasnet_jax import train  # noqa: E402
from mnasnet_jax.configs import search as search_config  # noqa: E402

_HOSTS = flags.DEFINE_list('hosts', ['4', '8'], 'Chips per host.')
_BUDGETS = flags.DEFINE_list('budgets_gib', ['16', '32'], 'Per-chip memory budgets (GiB).')
_ARCHS = flags.DEFINE_list(
  'archs',
  ['widest', 'mobilenet_v2', 'supernet'],
  '"widest" (the search space\'s widest child), "supernet" (the one-shot search\'s) or named '
  'architectures.',
)
_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Image size.')
_GROUP = flags.DEFINE_integer('bn_group_size', 128, 'Images per BN statistic after.')
_THREADS = flags.DEFINE_integer('threads', 2, 'Concurrent compiles (XLA compiles one per core).')


def widest_option(space: search_space_lib.SearchSpace, decision: str) -> int:
  """The option of `decision` that makes a layer widest: the inverted bottleneck of the largest
  expansion, the pooling skip (the one that adds tensors: its pooled and projected shortcuts), the
  largest of the others (kernel, SE ratio, width multiplier, layer delta)."""
  options = space.options[decision]
  if decision == 'conv_op':
    rank = lambda o: (space.conv_ops[o][0] == 'mbconv', space.conv_ops[o][1])
  elif decision == 'skip':
    rank = lambda o: options[o] == 'pool'
  else:
    rank = lambda o: float(options[o])
  return max(range(len(options)), key=rank)


def widest_child(space: search_space_lib.SearchSpace) -> list[str]:
  """Every searched block at its widest option of each decision."""
  return space.decode(
    [
      widest_option(space, decision)
      for _ in space.searched
      for decision in search_space_lib.DECISIONS
    ]
  )


def measure(arch, blocks, chips: int, proxy, space) -> dict:
  """Before and after for one architecture (`blocks`; None: the supernet of `space`) on a host of
  `chips` chips."""
  mesh = platform.data_mesh(jax.devices()[:chips])
  batch = proxy.batch_size
  config = proxy.copy_and_resolve_references()
  config.update(depthwise='native', conv='native', dtype='bfloat16')
  tx, schedule = train.create_optimizer(config, steps_per_epoch=300.0)
  split = NamedSharding(mesh, P(platform.BATCH_AXIS))
  size = _RESOLUTION.value
  batch_shapes = [
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=split),
    jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split),
  ]
  step = None
  if blocks is None:  # the child's tokens come first
    tokens = jax.ShapeDtypeStruct((chips, len(space.choices)), jnp.int32, sharding=split)
    batch_shapes, step = [tokens, *batch_shapes], oneshot.train_step
  result = {'arch': arch, 'chips': chips, 'per_chip': batch // chips}

  def fit(group_size, budget_gib):
    config.bn_group_size, config.device_memory_gib = group_size, budget_gib
    if blocks is None:
      model = supernet.create(config, space, 1000).clone(batch_norm='autodiff')
      child = supernet.Child(model, jnp.zeros(len(space.choices), jnp.int32))
    else:
      model = child = train.create_model(config, blocks, 1000).clone(batch_norm='autodiff')
    make_state = functools.partial(train.create_state, child, tx, size, bool(config.ema_decay), 0)
    state = train.abstract_state(make_state, mesh)
    start = time.perf_counter()
    try:
      fitted = train.fit_train_step(
        config, model, tx, schedule, mesh, state, batch_shapes, step=step
      )
    except memory.DoesNotFit as e:
      return {'fits': False, 'reason': str(e), 'seconds': round(time.perf_counter() - start)}
    return {
      'gib': round(fitted.bytes / memory.GIB, 2),
      'micro_batch': fitted.micro_batch,
      'remat': fitted.remat,
      'seconds': round(time.perf_counter() - start),
    }

  result['before'] = fit(None, None)
  for budget in _BUDGETS.value:
    result[f'after_{budget}gib'] = fit(_GROUP.value, float(budget))
  return result


def main(argv):
  del argv
  # The budgets' fits compile some of the same programs: a disk cache for this run shares them.
  with tempfile.TemporaryDirectory(prefix='memory_benchmark_') as cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    report()


def report():
  """Each architecture's fit on each host size, before and after the budgets, printed."""
  config = search_config.get_config()
  oneshot_proxy = search_config.get_config('oneshot').proxy
  space = search_space_lib.SearchSpace(config.search_space)
  archs = {
    name: {'widest': widest_child(space), 'supernet': None}.get(name, name) for name in _ARCHS.value
  }
  if 'widest' in archs:
    print('widest child:', ','.join(archs['widest']), flush=True)
  jobs = [
    (name, blocks, int(chips), oneshot_proxy if blocks is None else config.proxy, space)
    for name, blocks in archs.items()
    for chips in _HOSTS.value
  ]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(_THREADS.value) as pool:
    results = list(pool.map(lambda job: measure(*job), jobs))
  describe = lambda v: (
    f'{v["gib"]} GiB at micro-batch {v["micro_batch"]}{" with remat" if v["remat"] else ""}'
    if 'gib' in v
    else 'does not fit'
  )
  for r in results:
    after = ', '.join(
      f'{key[6:]}: {describe(v)}' for key, v in r.items() if key.startswith('after_')
    )
    print(
      f'{r["arch"]} on {r["chips"]} chips ({r["per_chip"]} images each): before '
      f'{r["before"]["gib"]} GiB; after {after}',
      flush=True,
    )
  print(
    json.dumps(
      {
        'resolution': _RESOLUTION.value,
        'dtype': 'bfloat16',
        'batch': config.proxy.batch_size,
        'bn_group_size': _GROUP.value,
        'seconds': round(time.perf_counter() - start),
        'results': results,
        'widest_child': archs.get('widest'),
      }
    )
  )


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  app.run(main)
