"""Validates a latency table against whole models timed end to end, and measures predict_batch.

    python benchmarks/latency_table.py --table=litert_cpu_32.json [--fit_calibration]

Random architectures of the table's search space (recorded in the table) plus the named models are
exported whole to TFLite and timed on the table's own backend exactly as its entries were (its
`timing`: statistic, fresh interpreter instances, warm-up, repeats, cache flush; a phone's table on
that phone); their times are compared with the table's predictions: mean absolute percentage error,
worst error, Spearman rank correlation. Three predictions are reported: the plain sum of entries, the
sum less the one-add model's invoke for all but one unit, and the calibrated one (table.py's formula).

`--fit_calibration` also fits the calibration's scale and unit_ms (relative least squares) on
`--num_fit` OTHER random architectures (seed `--seed + 1`), timed interleaved with the validation
set, writes it into the table file, and judges it on the validation set (seed `--seed`, plus the
named models), none of which it saw.
The last line printed is one JSON object.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np
from scipy import stats

from mnasnet_jax import models
from mnasnet_jax import search_space as search_space_lib
from mnasnet_jax.latency import export
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


def sample(space, num, seed):
  rng = np.random.default_rng(seed)
  tokens = np.stack([rng.integers(0, n, num) for n in space.choices], axis=1)
  return [space.decode(t) for t in tokens]


def measure(archs, table, backend, label):
  cache = {}
  if _MEASURED.value and os.path.exists(_MEASURED.value):
    cache = json.load(open(_MEASURED.value))
  times = []
  start = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    for i, arch in enumerate(archs):
      name = arch if isinstance(arch, str) else ','.join(arch)
      if name not in cache:
        path = export.export_tflite(
          arch, os.path.join(tmp, 'model.tflite'), table.resolution, table.num_classes, seed=i
        )
        with open(path, 'rb') as f:
          cache[name] = backend.time(f.read(), 'model')[
            f'{table.metadata["timing"]["statistic"]}_ms'
          ]
        if _MEASURED.value:
          with open(_MEASURED.value, 'w') as f:
            json.dump(cache, f)
      times.append(cache[name])
      print(f'{label}: {i + 1}/{len(archs)} timed, {time.time() - start:.0f} s', flush=True)
  return np.asarray(times)


def raw_sums(table, archs):
  """(sum of entries, number of units) per architecture."""
  return np.asarray([table.sums(arch) for arch in archs], np.float64)


def errors(predicted, measured):
  pct = np.abs(predicted - measured) / measured * 100
  return {
    'mape_pct': float(pct.mean()),
    'worst_pct': float(pct.max()),
    'spearman': float(stats.spearmanr(predicted, measured).statistic),
  }


def main(argv):
  del argv
  table = table_lib.LatencyTable.load(_TABLE.value)
  space = search_space_lib.SearchSpace(ml_collections.ConfigDict(table.metadata['search_space']))
  timing = table.metadata['timing']
  # The table's own backend and settings (a phone's table is validated on that phone).
  backend = profiler.create_backend(ml_collections.ConfigDict({'backend': table.backend, **timing}))
  report = {
    'table': table.path,
    'resolution': table.resolution,
    'num_classes': table.num_classes,
    'entries': len(table),
    'overhead_ms': table.overhead_ms,
  }
  # A process's first interpreter runs slow through all its repeats (seen: 13.3 ms against 10.0 ms
  # for the same model timed again): one discarded timing, so no measured model pays for it.
  with tempfile.TemporaryDirectory() as tmp:
    path = export.export_tflite(
      'mobilenet_v2', os.path.join(tmp, 'warmup.tflite'), table.resolution, table.num_classes
    )
    with open(path, 'rb') as f:
      backend.time(f.read(), 'warmup')

  names = sorted(models.ARCHITECTURES)
  random_archs = sample(space, _NUM_RANDOM.value, _SEED.value)
  archs = random_archs + names
  fit_archs = sample(space, _NUM_FIT.value, _SEED.value + 1) if _FIT.value else []
  # Fit and validation architectures are timed in one shuffled order: this machine's speed drifts
  # by a few percent over minutes, which would otherwise bias the fit against the validation.
  everything = fit_archs + archs
  order = np.random.default_rng(_SEED.value).permutation(len(everything))
  times = np.empty(len(everything))
  times[order] = measure([everything[i] for i in order], table, backend, 'time')
  fit_measured, measured = times[: len(fit_archs)], times[len(fit_archs) :]

  if _FIT.value:
    scale, unit_ms = table_lib.fit_calibration(*raw_sums(table, fit_archs).T, fit_measured)
    data = json.load(open(table.path))
    data['calibration'].update(
      scale=scale,
      unit_ms=unit_ms,
      note=(
        f'overhead_ms: {timing["statistic"]} invoke of a one-add model; scale, unit_ms: '
        f'relative least squares of whole-model time on (sum, units - 1) over '
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
  report['validation'] = {
    'num_random': len(random_archs),
    'named': names,
    'measured_ms_range': [float(measured.min()), float(measured.max())],
    'plain_sum': errors(sums, measured),
    'overhead_corrected': errors(sums - (units - 1) * table.overhead_ms, measured),
    'calibrated': errors(calibrated, measured),
    'named_models': {
      n: {'measured_ms': float(m), 'predicted_ms': float(p)}
      for n, m, p in zip(names, measured[-len(names) :], calibrated[-len(names) :])
    },
  }

  batch = sample(space, _BATCH.value, _SEED.value + 2)
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
