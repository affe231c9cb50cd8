"""The profile_latency job: time every distinct layer of the search space once, write the table.

`python launch/main.py --config=configs/profile_latency.py[:local] --workdir=DIR`

Units are every layer `SearchSpace.distinct_layers(resolution)` yields (deduplicated by
`table.layer_key`), the layers of the named architectures in `config.architectures`, the stems, and
the heads of every width that can reach them. Each is exported alone as a small TFLite model (random
weights: float latency does not depend on their values) and timed on a backend:

* `litert`: the ai-edge-litert interpreter on this machine, `num_threads` threads (1: a phone's one big
  core), in `instances` fresh interpreters, each `warmup` untimed invokes then `repeats` timed ones,
  each after reading `flush_mib` MiB of other data (the core's caches as the rest of a network leaves
  them);
* `adb`: the same file pushed to an Android phone and timed by TFLite's `benchmark_model` pinned with
  `taskset` to `cpu_mask` (a big core), one thread (its output gives mean, std and min, no median).
  No phone was at hand when this was written: its command plumbing is tested against a stand-in
  `adb` executable only (tests/test_latency.py).

The journal keeps every statistic; the table's entry is `config.statistic` of them. On a shared
machine the minimum is the one that adds up: a whole network's median is inflated by other processes
evicting its weights between invokes far more than a small layer's is (benchmarks/latency_table.py).

Every finished unit is appended to a JSON-lines journal in the workdir before the next starts, so a
stopped job resumes where it stopped (on a phone it takes hours). The table goes to
`<workdir>/<config.table_name>` when every unit is done.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform as host_platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import search_space as search_space_lib
from mnasnet_jax.latency import export
from mnasnet_jax.latency import quantize
from mnasnet_jax.latency import table as table_lib

OVERHEAD_KEY = 'invoke_overhead'
_PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'numpy',
  'litert-converter',
  'ai-edge-litert',
  'ai-edge-quantizer',
)


def _timing_stats(seconds) -> dict:
  ms = np.asarray(seconds, np.float64) * 1e3
  return {
    'median_ms': float(np.median(ms)),
    'mean_ms': float(ms.mean()),
    'std_ms': float(ms.std()),
    'min_ms': float(ms.min()),
    'count': int(ms.size),
  }


# --- backends ----------------------------------------------------------------------------------


def _check_counts(warmup: int, repeats: int, instances: int):
  for name, value, least in (
    ('warmup', warmup, 0),
    ('repeats', repeats, 1),
    ('instances', instances, 1),
  ):
    if value < least:
      raise errors.UserError(f'config.{name} = {value}: expected a whole number >= {least}')


class LiteRTBackend:
  """Times a model with the ai-edge-litert interpreter (XNNPACK) in this process.

  Each of `instances` fresh interpreters runs `warmup` untimed and `repeats` timed invokes, and the
  statistics pool all of them. Instances matter more than repeats: on this machine one model's
  minimum over 30 invokes differed by up to 40% between interpreters (where their buffers land in
  memory), while it barely moved within one.

  Before each timed invoke, `flush_mib` MiB of other data are read and the input is set again: a
  layer then runs as it does inside a network, where every other layer's weights and activations
  went through the core's caches since its last run and only its input (the previous layer's
  output) is fresh. Repeated back to back instead, a layer keeps its weights in the core's cache,
  which a network never does, and the table's sums come out at about half of whole networks.
  """

  STATISTICS = ('min', 'median', 'mean')

  def __init__(
    self,
    warmup: int,
    repeats: int,
    num_threads: int = 1,
    instances: int = 1,
    flush_mib: float = 0.0,
  ):
    _check_counts(warmup, repeats, instances)
    if flush_mib < 0:
      raise errors.UserError(f'config.flush_mib = {flush_mib}: expected a size in MiB >= 0')
    self.warmup, self.repeats, self.num_threads = warmup, repeats, num_threads
    self.instances = instances
    self._flush = np.ones(int(flush_mib * 2**20) // 8, np.int64)

  def device(self) -> dict:
    identity = cpu_identity()
    name = identity.pop('model name', '') or host_platform.processor() or host_platform.machine()
    return {
      'name': name,
      'machine': host_platform.machine(),
      'system': host_platform.platform(),
      'cpu_count': os.cpu_count(),
      'num_threads': self.num_threads,
      'cpu': identity,
      'caches': cpu_caches(),
    }

  def interpreter(self, content: bytes):
    """A fresh interpreter and a function that sets its inputs (random, the same every time)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=self.num_threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    inputs = [
      (d['index'], rng.normal(size=d['shape']).astype(d['dtype']))
      for d in interpreter.get_input_details()
    ]

    def set_inputs():
      for index, value in inputs:
        interpreter.set_tensor(index, value)

    set_inputs()
    return interpreter, set_inputs

  def time(self, content: bytes, name: str) -> dict:
    del name
    seconds = []
    for _ in range(self.instances):
      interpreter, set_inputs = self.interpreter(content)
      for _ in range(self.warmup):
        interpreter.invoke()
      for _ in range(self.repeats):
        if self._flush.size:
          np.bitwise_or.reduce(self._flush)
          set_inputs()
        start = time.perf_counter()
        interpreter.invoke()
        seconds.append(time.perf_counter() - start)
    return _timing_stats(seconds)


# /proc/cpuinfo fields that tell one core generation from another under one 'model name' (two 'AMD
# EPYC' VMs, Zen 4 and Zen 5 by their caches, ran the same int8 models 2.3x apart), and the SIMD
# extensions XNNPACK's kernels choose between.
_CPU_FIELDS = ('model name', 'cpu family', 'model', 'stepping', 'CPU implementer', 'CPU part')
_X86_ISA = ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'amx_int8')
_ARM_ISA = ('asimddp', 'i8mm', 'asimdhp', 'sve', 'sve2')
_CPU_ISA = _X86_ISA + _ARM_ISA


def cpu_identity(path: str = '/proc/cpuinfo') -> dict:
  """CPU 0's `_CPU_FIELDS` and `isa` (its `_CPU_ISA` extensions) from Linux's cpuinfo, or {}."""
  try:
    with open(path) as f:
      first = f.read().split('\n\n')[0]
  except OSError:
    return {}
  fields = dict(
    (key.strip(), value.strip())
    for key, _, value in (line.partition(':') for line in first.splitlines())
  )
  identity = {key: fields[key] for key in _CPU_FIELDS if key in fields}
  flags = set((fields.get('flags') or fields.get('Features') or '').split())
  identity['isa'] = [name for name in _CPU_ISA if name in flags]
  return identity


def cpu_caches() -> dict:
  """Cache sizes of CPU 0 as Linux reports them (e.g. {'L1d': '48K', 'L2': '2048K'}), or {}."""
  caches = {}
  root = '/sys/devices/system/cpu/cpu0/cache'
  for index in sorted(os.listdir(root)) if os.path.isdir(root) else ():
    try:
      with open(os.path.join(root, index, 'level')) as f:
        level = f.read().strip()
      with open(os.path.join(root, index, 'type')) as f:
        kind = f.read().strip()
      with open(os.path.join(root, index, 'size')) as f:
        size = f.read().strip()
    except OSError:
      continue
    suffix = {'Data': 'd', 'Instruction': 'i'}.get(kind, '')
    caches[f'L{level}{suffix}'] = size
  return caches


_BENCHMARK_LINE = re.compile(
  r'count=(\d+) first=\S+ curr=\S+ min=(\S+) max=\S+ avg=(\S+) std=(\S+)'
)


def parse_benchmark_model(output: str) -> dict:
  """Milliseconds from `benchmark_model`'s output: its last 'count=.. avg=.. std=..' line (in us)
  is the timed runs (the one before it is the warm-up)."""
  found = _BENCHMARK_LINE.findall(output)
  if not found:
    raise ValueError(
      'no timing line ("count=... avg=... std=...") in benchmark_model output:\n' + output[-2000:]
    )
  count, min_us, avg_us, std_us = found[-1]
  return {
    'mean_ms': float(avg_us) / 1e3,
    'std_ms': float(std_us) / 1e3,
    'min_ms': float(min_us) / 1e3,
    'count': int(count),
  }


def pool_runs(runs: list[dict]) -> dict:
  """The statistics of several runs' timings together, from each run's count, mean, std and min."""
  counts = np.array([r['count'] for r in runs], np.float64)
  means = np.array([r['mean_ms'] for r in runs])
  mean = float(np.sum(counts * means) / counts.sum())
  second_moment = (
    np.sum(counts * (np.square([r['std_ms'] for r in runs]) + means**2)) / counts.sum()
  )
  return {
    'mean_ms': mean,
    'std_ms': float(np.sqrt(max(second_moment - mean**2, 0.0))),
    'min_ms': min(r['min_ms'] for r in runs),
    'count': int(counts.sum()),
  }


class AdbBackend:
  """Times a model on an Android phone over adb with TFLite's `benchmark_model`, one thread, pinned
  by `taskset` to a big core, `instances` times (each run a fresh interpreter). The phone needs the
  benchmark binary at `benchmark_binary` (see the TFLite performance-measurement docs); `cpu_mask`
  is hex, e.g. 'f0' for cores 4-7. `benchmark_model` prints no median."""

  STATISTICS = ('min', 'mean')

  def __init__(
    self,
    warmup: int,
    repeats: int,
    num_threads: int = 1,
    adb: str = 'adb',
    serial: str | None = None,
    device_dir: str = '/data/local/tmp/mnasnet_latency',
    benchmark_binary: str = '/data/local/tmp/benchmark_model',
    cpu_mask: str = 'f0',
    timeout: float = 600.0,
    instances: int = 1,
  ):
    _check_counts(warmup, repeats, instances)
    self.warmup, self.repeats, self.num_threads = warmup, repeats, num_threads
    self.instances = instances
    self.adb, self.serial, self.device_dir = adb, serial, device_dir
    self.benchmark_binary, self.cpu_mask, self.timeout = benchmark_binary, cpu_mask, timeout
    self._ready = False

  def _run(self, *args: str) -> str:
    command = [self.adb] + (['-s', self.serial] if self.serial else []) + list(args)
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
    except FileNotFoundError:
      raise errors.UserError(
        f'adb executable {self.adb!r} not found: install Android '
        'platform-tools or set config.adb.binary'
      ) from None
    if done.returncode:
      raise RuntimeError(
        f'{shlex.join(command)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}'
      )
    return done.stdout

  def shell(self, command: str) -> str:
    return self._run('shell', command)

  def device(self) -> dict:
    props = {
      key: self.shell(f'getprop {prop}').strip()
      for key, prop in (
        ('manufacturer', 'ro.product.manufacturer'),
        ('model', 'ro.product.model'),
        ('board', 'ro.board.platform'),
        ('android', 'ro.build.version.release'),
      )
    }
    return {
      'name': f'{props["manufacturer"]} {props["model"]}'.strip(),
      **props,
      'cpu_mask': self.cpu_mask,
      'num_threads': self.num_threads,
    }

  def time(self, content: bytes, name: str) -> dict:
    if not self._ready:
      self.shell(f'mkdir -p {shlex.quote(self.device_dir)}')
      self._ready = True
    remote = f'{self.device_dir}/{name}.tflite'
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, f'{name}.tflite')
      with open(local, 'wb') as f:
        f.write(content)
      self._run('push', local, remote)
    command = ' '.join(
      [
        'taskset',
        self.cpu_mask,
        shlex.quote(self.benchmark_binary),
        f'--graph={shlex.quote(remote)}',
        f'--num_threads={self.num_threads}',
        f'--warmup_runs={self.warmup}',
        f'--num_runs={self.repeats}',
        '--warmup_min_secs=0',
        '--min_secs=0',
        '--use_xnnpack=true',
      ]
    )
    try:
      runs = [parse_benchmark_model(self.shell(command)) for _ in range(self.instances)]
    finally:
      self.shell(f'rm -f {shlex.quote(remote)}')
    return pool_runs(runs)


def create_backend(config):
  if config.backend == 'litert':
    return LiteRTBackend(
      config.warmup, config.repeats, config.num_threads, config.instances, config.flush_mib
    )
  if config.backend == 'adb':
    return AdbBackend(
      config.warmup,
      config.repeats,
      config.num_threads,
      adb=config.adb.binary,
      serial=config.adb.serial or None,
      device_dir=config.adb.device_dir,
      benchmark_binary=config.adb.benchmark_binary,
      cpu_mask=config.adb.cpu_mask,
      instances=config.instances,
    )
  raise errors.UserError(f"config.backend = {config.backend!r}: expected 'litert' or 'adb'")


# --- what to profile ------------------------------------------------------------------------------


def in_precision(content: bytes, input_shape, precision: str) -> bytes:
  """A float unit `content` in `precision`: int8 is quantized as a whole int8 model is
  (quantize.py), with int8 input and output as inside that network."""
  if precision == 'int8':
    return quantize.quantize_int8(content, quantize.random_samples(input_shape))
  return content


def overhead_tflite(precision: str = 'float32') -> bytes:
  """The smallest model: one add on one number. Its invoke time is the interpreter's fixed cost."""
  shape = (1, 1, 1, 1)
  return in_precision(export.to_tflite(lambda x: x + 1.0, shape), shape, precision)


def _unit_tflite(module, shape, precision: str) -> bytes:
  return in_precision(export.module_tflite(module, shape), shape, precision)


def profile_units(
  space, architectures, resolution: int, num_classes: int, precision: str = 'float32'
) -> dict:
  """key -> (a function making that unit's TFLite model, its parameter count), every unit needed.

  A unit is a part of the inference network (export.inference_model) exported alone, in
  `precision`: a stem of each width, each distinct layer, a head of each input width and
  resolution."""
  net = export.inference_model(models.MnasNet(blocks=(), num_classes=num_classes))
  parts = {}  # key -> (module, input shape)
  stems, heads = {space.stem_filters} if space else set(), set()
  layers = set(space.distinct_layers(resolution)) if space else set()
  stem_res = blocks_lib.same_output_size(resolution, 2)
  if space:
    final_res = stem_res
    for base in space.base:
      final_res = blocks_lib.same_output_size(final_res, base.stride)
    heads = {(w, final_res) for w in space.head_input_widths()}
  for arch in architectures:
    spec = models.architecture(arch)
    arch_layers = blocks_lib.layers(spec.blocks, spec.stem_filters, stem_res)
    layers.update(arch_layers)
    stems.add(spec.stem_filters)
    last = arch_layers[-1]
    heads.add((last.out_filters, last.out_resolution))
  for stem in sorted(stems):
    parts[table_lib.stem_key(stem, resolution)] = (net.stem(stem), (1, resolution, resolution, 3))
  for layer in sorted(layers, key=table_lib.layer_key):
    parts.setdefault(
      table_lib.layer_key(layer),
      (net.layer(layer), (1, layer.resolution, layer.resolution, layer.in_filters)),
    )
  for width, res in sorted(heads):
    parts[table_lib.head_key(width, res, num_classes)] = (net.head(), (1, res, res, width))
  return {
    key: (
      functools.partial(_unit_tflite, module, shape, precision),
      export.param_count(module, shape),
    )
    for key, (module, shape) in parts.items()
  }


# --- the journal ---------------------------------------------------------------------------------


def read_journal(path: str) -> dict:
  """key -> entry of every finished unit; a torn last line (the job was killed) is ignored."""
  done = {}
  if not os.path.exists(path):
    return done
  with open(path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      done[record.pop('key')] = record
    except (json.JSONDecodeError, KeyError, AttributeError):
      if number != len(lines):
        raise errors.UserError(
          f'corrupt journal {path} at line {number}: {line[:200]!r}; '
          'expected one JSON object a line'
        ) from None
  return done


def _append(path: str, key: str, entry: dict):
  with open(path, 'a') as f:
    f.write(json.dumps({'key': key, **entry}) + '\n')
    f.flush()
    os.fsync(f.fileno())


def library_versions() -> dict:
  versions = {'python': sys.version.split()[0]}
  for package in _PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def profile(config, workdir: str) -> table_lib.LatencyTable:
  """Profiles every unit not yet in the journal, then assembles and writes the table. Every host
  of a multi-host job runs it alike; process 0 alone writes the journal and the table (two
  writers of one workdir would interleave them)."""
  if not workdir:
    raise errors.UserError('the profile_latency job needs --workdir=DIR (its journal and table)')
  quantize.check_precision(config.precision)
  backend = create_backend(config)
  if config.statistic not in backend.STATISTICS:
    raise errors.UserError(
      f'config.statistic = {config.statistic!r}: expected one of '
      f'{backend.STATISTICS} for the {config.backend} backend'
    )
  space = (
    search_space_lib.SearchSpace(config.search_space) if config.search_space is not None else None
  )
  os.makedirs(workdir, exist_ok=True)
  units = profile_units(
    space, tuple(config.architectures), config.resolution, config.num_classes, config.precision
  )
  units[OVERHEAD_KEY] = (functools.partial(overhead_tflite, config.precision), 1)
  statistic = f'{config.statistic}_ms'
  journal = os.path.join(workdir, f'{os.path.splitext(config.table_name)[0]}.journal.jsonl')
  done = read_journal(journal)
  todo = [key for key in units if key not in done]
  logging.info(
    '%d %s units to profile at %dpx, %d classes: %d already in %s, %d to go',
    len(units),
    config.precision,
    config.resolution,
    config.num_classes,
    len(units) - len(todo),
    journal,
    len(todo),
  )
  start, export_seconds, timing_seconds, last_log = time.time(), 0.0, 0.0, 0.0
  for n, key in enumerate(todo, 1):
    t0 = time.time()
    content = units[key][0]()
    t1 = time.time()
    entry = backend.time(content, key)
    t2 = time.time()
    export_seconds += t1 - t0
    timing_seconds += t2 - t1
    if jax.process_index() == 0:
      _append(journal, key, {**entry, 'export_s': round(t1 - t0, 4), 'time_s': round(t2 - t1, 4)})
    done[key] = entry
    if t2 - last_log > config.log_every_seconds or n == len(todo):
      last_log = t2
      rate = n / (t2 - start)
      logging.info(
        'profiled %d/%d (%d/%d in all), %.2f units/s (export %.0f%%), ETA %.0f min; '
        'last %s: %.3f ms',
        n,
        len(todo),
        len(done),
        len(units),
        rate,
        100 * export_seconds / max(t2 - start, 1e-9),
        (len(todo) - n) / rate / 60,
        key,
        entry[statistic],
      )
  entries = {
    key: {'ms': done[key][statistic], **done[key], 'params': units[key][1]}
    for key in units
    if key != OVERHEAD_KEY
  }
  for entry in entries.values():
    entry.pop('export_s', None)
    entry.pop('time_s', None)
  overhead = done[OVERHEAD_KEY]
  table = table_lib.LatencyTable(
    entries,
    resolution=config.resolution,
    num_classes=config.num_classes,
    backend=config.backend,
    device=backend.device(),
    precision=config.precision,
    versions=library_versions(),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    timing={
      'statistic': config.statistic,
      'instances': config.instances,
      'warmup': config.warmup,
      'repeats': config.repeats,
      'num_threads': config.num_threads,
      'flush_mib': config.flush_mib if config.backend == 'litert' else 0.0,
      **({'adb': config.adb.to_dict()} if config.backend == 'adb' else {}),
      'unit': 'one TFLite model per entry, timed alone',
    },
    search_space=config.search_space.to_dict() if space else None,
    architectures=list(config.architectures),
    calibration={
      'overhead_ms': overhead[statistic],
      'unit_ms': overhead[statistic],
      'scale': 1.0,
      'note': f'overhead_ms: {config.statistic} invoke of a one-add model; unit_ms '
      'and scale not fitted',
    },
  )
  if jax.process_index():
    return table
  path = table.save(os.path.join(workdir, config.table_name))
  logging.info(
    'wrote %s: %d entries, invoke overhead %.4f ms; export %.0f s, timing %.0f s this run',
    path,
    len(entries),
    overhead[statistic],
    export_seconds,
    timing_seconds,
  )
  return table


# --- whole models and recalibration ------------------------------------------------------------


def random_architectures(space, num: int, seed: int) -> list[list[str]]:
  """`num` architectures of `space`, every decision drawn uniformly (numpy's generator `seed`)."""
  rng = np.random.default_rng(seed)
  tokens = np.stack([rng.integers(0, n, num) for n in space.choices], axis=1)
  return [space.decode(t) for t in tokens]


def model_tflite(arch, table: table_lib.LatencyTable, seed: int = 0) -> bytes:
  """`arch` whole, as the table's units were made: random weights, the table's resolution,
  classes and precision (int8 in and out)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = export.export_tflite(
      arch, os.path.join(tmp, 'model.tflite'), table.resolution, table.num_classes, seed=seed
    )
    with open(path, 'rb') as f:
      content = f.read()
  return in_precision(content, (1, table.resolution, table.resolution, 3), table.precision)


def table_backend(table: table_lib.LatencyTable, config, **changes):
  """The backend of `config` (the device at hand) timing as `table`'s entries were timed (its
  recorded counts, threads, cache flush), with `changes` to those settings."""
  timing = {**table.metadata['timing'], **changes}
  adb = config.adb.to_dict() if 'adb' in config else {}
  return create_backend(
    ml_collections.ConfigDict({**timing, 'backend': config.backend, 'adb': adb})
  )


def relative_errors(predicted, measured) -> dict:
  """MAPE, worst error, share within +-10% (in %) and Spearman of `predicted` against `measured`."""
  from scipy import stats

  predicted, measured = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  pct = np.abs(predicted - measured) / measured * 100
  return {
    'mape_pct': float(pct.mean()),
    'worst_pct': float(pct.max()),
    'within_10_pct': float(np.mean(pct <= 10) * 100),
    'spearman': float(stats.spearmanr(predicted, measured).statistic) if len(pct) > 2 else None,
  }


def recalibrate(config, workdir: str) -> table_lib.LatencyTable:
  """Refits `config.recalibrate`'s calibration (its scale, or scale and unit_ms) to whole models
  timed on this job's backend (the named architectures and `recalibration.num_random` random ones
  of the table's space), as its entries were timed; writes the table to the workdir with where
  and when.

  The entries' ranking carries over from one device to another of its kind far better than their
  scale (a machine 16% slower, a phone of another batch): the scale refitted on a handful of
  models in about a minute, instead of hours of profiling."""
  if not workdir:
    raise errors.UserError('the profile_latency job needs --workdir=DIR (the recalibrated table)')
  name = config.recalibrate
  if os.path.basename(name) != name and not os.path.exists(name):
    raise errors.UserError(f'config.recalibrate = {name!r}: no such latency table file')
  table = table_lib.LatencyTable.load(name)
  count = config.recalibration.num_random
  if config.recalibration.fit not in ('scale', 'scale_and_unit'):
    raise errors.UserError(
      f"config.recalibration.fit = {config.recalibration.fit!r}: expected 'scale' or "
      "'scale_and_unit'"
    )
  if count < 0:
    raise errors.UserError(f'config.recalibration.num_random = {count}: expected a number >= 0')
  statistic = table.metadata['timing']['statistic']
  backend = table_backend(table, config)
  if statistic not in backend.STATISTICS:
    raise errors.UserError(
      f'{table.path} was timed by its {statistic}, which the {config.backend} backend '
      f'does not give (it gives {backend.STATISTICS})'
    )
  if table.space is None and not config.architectures:
    raise errors.UserError(
      f'{table.path} records no search space and config.architectures is empty'
    )
  archs = list(config.architectures) + (
    random_architectures(table.space, count, config.recalibration.seed) if table.space else []
  )
  start = time.time()
  measured = []
  for i, arch in enumerate(archs):
    content = model_tflite(arch, table, seed=i)
    if i == 0:  # a process's first interpreter runs slow throughout: one discarded timing
      backend.time(content, 'model')
    measured.append(backend.time(content, 'model')[f'{statistic}_ms'])
    logging.info('recalibration: %d/%d timed, %.0f s', i + 1, len(archs), time.time() - start)
  before = [table.predict(a) for a in archs]
  sums, units = np.asarray([table.sums(a) for a in archs], np.float64).T
  if config.recalibration.fit == 'scale':
    scale, unit_ms = table_lib.fit_scale(sums, units, measured, table.unit_ms), table.unit_ms
  else:
    scale, unit_ms = table_lib.fit_calibration(sums, units, measured)
  calibration = dict(table.metadata['calibration'])
  previous = {k: calibration.get(k) for k in ('scale', 'unit_ms')}
  calibration.update(scale=scale, unit_ms=unit_ms)
  table.metadata['calibration'] = calibration
  recalibrated = table_lib.LatencyTable(
    table.entries,
    resolution=table.resolution,
    num_classes=table.num_classes,
    backend=table.backend,
    device=table.device,
    **table.metadata,
  )
  after = [recalibrated.predict(a) for a in archs]
  calibration['recalibrated'] = {
    'device': backend.device(),
    'backend': config.backend,
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
    'seconds': round(time.time() - start, 1),
    'from': table.path,
    'previous': previous,
    'architectures': [a if isinstance(a, str) else ','.join(a) for a in archs],
    'measured_ms': measured,
    'fit_before': relative_errors(before, measured),
    'fit_after': relative_errors(after, measured),
    'fit': config.recalibration.fit,
    'note': f'{"scale" if config.recalibration.fit == "scale" else "scale and unit_ms"} refitted '
    f'on {len(archs)} whole models timed on this device by their {statistic}, as the entries '
    "were; the entries are the profiled device's",
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = recalibrated.save(os.path.join(workdir, os.path.basename(table.path)))
    logging.info(
      'wrote %s: scale %.4f -> %.4f, unit_ms %.4f -> %.4f; MAPE on its %d models %.1f%% -> '
      '%.1f%%; %.0f s',
      path,
      previous['scale'],
      scale,
      previous['unit_ms'],
      unit_ms,
      len(archs),
      calibration['recalibrated']['fit_before']['mape_pct'],
      calibration['recalibrated']['fit_after']['mape_pct'],
      time.time() - start,
    )
  return recalibrated


def run(config, workdir):
  """The profile_latency job: a table profiled unit by unit, or `config.recalibrate`'s refitted."""
  if config.recalibrate:
    recalibrate(config, workdir)
  else:
    profile(config, workdir)
