"""Validates a latency table against whole models timed end to end, and measures predict_batch.

    python benchmarks/latency_table.py --table=litert_cpu_32.json [--fit_calibration]

Random architectures of the table's search space (recorded in the table) plus the named models are
exported whole to TFLite in the table's precision and timed on the table's own backend (a phone's
table on that phone) two ways: 'cold', exactly as its entries were (its `timing`: statistic, fresh
interpreter instances, warm-up, repeats, cache flush), and 'back_to_back', as TFLite's
benchmark_model times a model (warm-up, then invokes one after another, median over 3 fresh
interpreters). Against each, the table's predictions: mean absolute percentage error, worst error,
share within +-10%, Spearman rank correlation, mean signed error. Three predictions: the plain sum of
entries, the sum less the one-add model's invoke for all but one unit, and the calibrated one
(table.py's formula). `targets` names the protocol the calibration is fitted to: a flushed table's
is 'cold' (what a layer costs inside a network on a shared machine's cold caches), an unflushed
one's (a phone's benchmark_model) 'back_to_back'.

`--fit_calibration` also fits the calibration's scale and unit_ms (relative least squares, on the
targeted protocol) on `--num_fit` OTHER random architectures (seed `--seed + 1`), timed interleaved
with the validation set, writes it into the table file, and judges it on the validation set (seed
`--seed`, plus the named models), none of which it saw. A table recalibrated on this device by
the profile job's `recalibrate` is validated as it is.
The last line printed is one JSON object.
"""

import json
import os
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np

from mnasnet_jax import models
from mnasnet_jax.latency import profiler
from mnasnet_jax.latency import table as table_lib

_TABLE = flags.DEFINE_string('table', 'litert_cpu_32.json', 'Table file or shipped table name.')
_NUM_RANDOM = flags.DEFINE_integer('num_random', 50, 'Random architectures to validate on.')
_NUM_FIT = flags.DEFINE_integer('num_fit', 30, 'Other random architectures to fit calibration on.')
_SEED = flags.DEFINE_integer('seed', 0, 'Validation sample seed; the fit sample uses seed + 1.')
_FIT = flags.DEFINE_boolean(
  'fit_calibration', False, 'Fit scale, unit_ms and write them to the table.'
)
_BATCH = flags.DEFINE_integer('batch', 100_000, 'Architectures for the throughput measurements.')
_MEASURED = flags.DEFINE_string(
  'measured',
  None,
  'JSON file of end-to-end times to reuse and extend '
  '(architecture -> ms), so a refit needs no re-timing.',
)


PROTOCOLS = ('back_to_back', 'cold')


def protocol_backends(table):
  """protocol -> (backend, statistic) on the table's own backend and settings (a phone's table on
  that phone): 'cold' as its entries were timed (caches emptied before each invoke, its
  statistic), 'back_to_back' as TFLite's benchmark_model times a model (warm-up, then invokes one
  after another, median over 3 fresh interpreters; benchmark_model's mean on a phone)."""
  settings = ml_collections.ConfigDict(
    {'backend': table.backend, 'adb': table.metadata['timing'].get('adb', {})}
  )
  back_to_back = 'median' if table.backend == 'litert' else 'mean'
  return {
    'cold': (profiler.table_backend(table, settings), table.metadata['timing']['statistic']),
    'back_to_back': (
      profiler.table_backend(table, settings, flush_mib=0.0, instances=3),
      back_to_back,
    ),
  }


def targeted(table) -> str:
  """The protocol the table's calibration targets: its entries' (cold when they flushed)."""
  return 'cold' if table.metadata['timing'].get('flush_mib', 0.0) > 0 else 'back_to_back'


def measure(archs, table, backends):
  """protocol -> whole-model ms of each architecture, exported once and timed both ways."""
  cache = {}
  if _MEASURED.value and os.path.exists(_MEASURED.value):
    cache = json.load(open(_MEASURED.value))
  times = {protocol: [] for protocol in backends}
  start = time.time()
  for i, arch in enumerate(archs):
    name = arch if isinstance(arch, str) else ','.join(arch)
    keys = {protocol: f'{protocol}|{name}' for protocol in backends}
    if any(key not in cache for key in keys.values()):
      content = profiler.model_tflite(arch, table, seed=i)
      for protocol, (backend, statistic) in backends.items():
        cache[keys[protocol]] = backend.time(content, 'model')[f'{statistic}_ms']
      if _MEASURED.value:
        with open(_MEASURED.value, 'w') as f:
          json.dump(cache, f)
    for protocol, key in keys.items():
      times[protocol].append(cache[key])
    print(f'time: {i + 1}/{len(archs)} timed, {time.time() - start:.0f} s', flush=True)
  return {protocol: np.asarray(t) for protocol, t in times.items()}


def raw_sums(table, archs):
  """(sum of entries, number of units) per architecture."""
  return np.asarray([table.sums(arch) for arch in archs], np.float64)


def main(argv):
  del argv
  table = table_lib.LatencyTable.load(_TABLE.value)
  space = table.space
  timing = table.metadata['timing']
  backends = protocol_backends(table)
  target = targeted(table)
  report = {
    'table': table.path,
    'precision': table.precision,
    'resolution': table.resolution,
    'num_classes': table.num_classes,
    'entries': len(table),
    'overhead_ms': table.overhead_ms,
    'calibration': {k: table.metadata['calibration'].get(k) for k in ('scale', 'unit_ms')},
    'recalibrated': 'recalibrated' in table.metadata['calibration'],
    'device': backends['cold'][0].device()['name'],
    'targets': target,
  }
  # A process's first interpreter runs slow through all its repeats (seen: 13.3 ms against 10.0 ms
  # for the same model timed again): one discarded timing, so no measured model pays for it.
  backends['cold'][0].time(profiler.model_tflite('mobilenet_v2', table), 'warmup')

  names = sorted(models.ARCHITECTURES)
  random_archs = profiler.random_architectures(space, _NUM_RANDOM.value, _SEED.value)
  archs = random_archs + names
  fit_archs = (
    profiler.random_architectures(space, _NUM_FIT.value, _SEED.value + 1) if _FIT.value else []
  )
  # Fit and validation architectures are timed in one shuffled order: this machine's speed drifts
  # by a few percent over minutes, which would otherwise bias the fit against the validation.
  everything = fit_archs + archs
  order = np.random.default_rng(_SEED.value).permutation(len(everything))
  timed = measure([everything[i] for i in order], table, backends)
  times = {}
  for protocol, values in timed.items():
    times[protocol] = np.empty(len(everything))
    times[protocol][order] = values

  if _FIT.value:
    fit_measured = times[target][: len(fit_archs)]
    scale, unit_ms = table_lib.fit_calibration(*raw_sums(table, fit_archs).T, fit_measured)
    data = json.load(open(table.path))
    data['calibration'].update(
      scale=scale,
      unit_ms=unit_ms,
      note=(
        f'overhead_ms: {timing["statistic"]} invoke of a one-add model; scale, unit_ms: '
        f'relative least squares of whole-model time ({target}) on (sum, units - 1) over '
        f'{len(fit_archs)} random architectures of the space (seed {_SEED.value + 1}), none '
        'of them judged in the validation'
      ),
    )
    with open(table.path, 'w') as f:
      json.dump(data, f, indent=1)
      f.write('\n')
    table = table_lib.LatencyTable.load(table.path)
    report['fit'] = {'num': len(fit_archs), 'scale': scale, 'unit_ms': unit_ms}

  sums, units = raw_sums(table, archs).T
  calibrated = np.asarray([table.predict(a) for a in archs])
  report['validation'] = {'num_random': len(random_archs), 'named': names}
  for protocol in PROTOCOLS:
    measured = times[protocol][len(fit_archs) :]
    report['validation'][protocol] = {
      'measured_ms_range': [float(measured.min()), float(measured.max())],
      'plain_sum': profiler.relative_errors(sums, measured),
      'overhead_corrected': profiler.relative_errors(
        sums - (units - 1) * table.overhead_ms, measured
      ),
      'calibrated': profiler.relative_errors(calibrated, measured),
      'mean_signed_pct': float(np.mean((calibrated - measured) / measured) * 100),
    }
  report['named_models'] = {
    n: {
      'predicted_ms': float(calibrated[len(random_archs) + i]),
      **{
        f'{protocol}_ms': float(times[protocol][len(fit_archs) + len(random_archs) + i])
        for protocol in PROTOCOLS
      },
    }
    for i, n in enumerate(names)
  }

  batch = profiler.random_architectures(space, _BATCH.value, _SEED.value + 2)
  fresh = table_lib.LatencyTable.load(table.path)  # an empty block cache: the first pass fills it
  start = time.perf_counter()
  first = fresh.predict_batch(batch)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  second = fresh.predict_batch(batch)
  warm = time.perf_counter() - start
  exact = np.allclose(first[:200], [table.predict(a) for a in batch[:200]], rtol=1e-12)
  report['predict_batch'] = {
    'archs': len(batch),
    'per_second_cold_cache': len(batch) / cold,
    'per_second': len(batch) / warm,
    'equals_predict': bool(exact),
    'same_twice': bool(np.array_equal(first, second)),
  }
  tokens = np.stack([space.encode(a) for a in batch[:1000]])
  tokens = np.concatenate([tokens] * (len(batch) // len(tokens)))
  fresh.predict_batch(tokens[:1])  # builds the per-block arrays once
  start = time.perf_counter()
  by_tokens = fresh.predict_batch(tokens)  # token rows of the table's space: predict_tokens
  report['predict_tokens'] = {
    'archs': len(tokens),
    'per_second': len(tokens) / (time.perf_counter() - start),
    'equals_predict_batch': bool(np.allclose(by_tokens[:1000], first[:1000], rtol=1e-12)),
  }
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)
