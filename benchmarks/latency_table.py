"""Validates a latency table against whole models timed end to end, and measures predict_batch.

    python benchmarks/latency_table.py --table=litert_cpu_32.json [--fit_calibration]

Random architectures of the table's search space (recorded in the table) plus the named models are
exported whole to TFLite and timed on the same backend (litert, one thread, the table's warm-up and
repeats); their times are compared with the table's predictions: mean absolute percentage error,
worst error, Spearman rank correlation. Three predictions are reported: the plain sum of entries, the
sum less the per-invoke overhead of all but one unit, and the calibrated one (table.py's formula).
Whole models are timed exactly as the table's entries were (its `timing`: statistic, fresh
interpreter instances, warm-up and repeats).

`--fit_calibration` first fits the calibration's scale and ms_per_mparam (relative least squares) on
`--num_fit` OTHER random architectures (seed `--seed + 1`), writes it into the table file, and then
judges it on the validation set (seed `--seed`, plus the named models), none of which it saw.
The last line printed is one JSON object.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from mnasnet_jax import models  # noqa: E402
from mnasnet_jax import search_space as search_space_lib  # noqa: E402
from mnasnet_jax.latency import export  # noqa: E402
from mnasnet_jax.latency import profiler  # noqa: E402
from mnasnet_jax.latency import table as table_lib  # noqa: E402

_TABLE = flags.DEFINE_string('table', 'litert_cpu_32.json', 'Table file or shipped table name.')
_NUM_RANDOM = flags.DEFINE_integer('num_random', 50, 'Random architectures to validate on.')
_NUM_FIT = flags.DEFINE_integer('num_fit', 30, 'Other random architectures to fit calibration on.')
_SEED = flags.DEFINE_integer('seed', 0, 'Validation sample seed; the fit sample uses seed + 1.')
_FIT = flags.DEFINE_boolean('fit_calibration', False, 'Fit scale/offset and write them to the table.')
_BATCH = flags.DEFINE_integer('batch', 100_000, 'Architectures for the throughput measurements.')
_MEASURED = flags.DEFINE_string('measured', None, 'JSON file of end-to-end times to reuse and extend '
                                '(architecture -> ms), so a refit needs no re-timing.')


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
        path = export.export_tflite(arch, os.path.join(tmp, 'model.tflite'), table.resolution,
                                    table.num_classes, seed=i)
        with open(path, 'rb') as f:
          cache[name] = backend.time(f.read(), 'model')[f'{table.metadata["timing"]["statistic"]}_ms']
        if _MEASURED.value:
          with open(_MEASURED.value, 'w') as f:
            json.dump(cache, f)
      times.append(cache[name])
      print(f'{label}: {i + 1}/{len(archs)} timed, {time.time() - start:.0f} s', flush=True)
  return np.asarray(times)


def raw_sums(table, archs):
  """(sum of entries, number of units, parameters) per architecture."""
  return np.asarray([table.sums(arch) for arch in archs], np.float64)


def errors(predicted, measured):
  pct = np.abs(predicted - measured) / measured * 100
  return {'mape_pct': float(pct.mean()), 'worst_pct': float(pct.max()),
          'spearman': float(stats.spearmanr(predicted, measured).statistic)}


def main(argv):
  del argv
  table = table_lib.LatencyTable.load(_TABLE.value)
  space = search_space_lib.SearchSpace(ml_collections.ConfigDict(table.metadata['search_space']))
  timing = table.metadata['timing']
  backend = profiler.LiteRTBackend(timing['warmup'], timing['repeats'], timing['num_threads'],
                                   timing.get('instances', 1))
  report = {'table': table.path, 'resolution': table.resolution, 'num_classes': table.num_classes,
            'entries': len(table), 'overhead_ms': table.overhead_ms}
  # A process's first interpreter runs slow through all its repeats (seen: 13.3 ms against 10.0 ms
  # for the same model timed again): one discarded timing, so no measured model pays for it.
  with tempfile.TemporaryDirectory() as tmp:
    path = export.export_tflite('mobilenet_v2', os.path.join(tmp, 'warmup.tflite'),
                                table.resolution, table.num_classes)
    with open(path, 'rb') as f:
      backend.time(f.read(), 'warmup')

  if _FIT.value:
    fit_archs = sample(space, _NUM_FIT.value, _SEED.value + 1)
    fit_measured = measure(fit_archs, table, backend, 'fit')
    sums, units, params = raw_sums(table, fit_archs).T
    corrected = sums - (units - 1) * table.overhead_ms
    # Relative least squares (rows weighted by 1 / time: the judged error is relative), no offset:
    # the fixed cost is the measured overhead, and a free offset extrapolated below zero for the
    # smallest named model in a first trial.
    design = np.stack([corrected, params / 1e6], axis=1) / fit_measured[:, None]
    (scale, per_mparam), *_ = np.linalg.lstsq(design, np.ones_like(fit_measured), rcond=None)
    offset = 0.0
    data = json.load(open(table.path))
    data['calibration'].update(
        scale=float(scale), ms_per_mparam=float(per_mparam), offset_ms=float(offset),
        note=(f'overhead_ms: {timing["statistic"]} invoke of a one-add model; scale, '
              f'ms_per_mparam, offset_ms: '
              f'relative least squares of whole-model time on (sum - (units - 1) * overhead_ms, '
              f'parameters / 1e6) over {len(fit_archs)} random architectures of the space (seed '
              f'{_SEED.value + 1}), none of them judged in the validation'))
    with open(table.path, 'w') as f:
      json.dump(data, f, indent=1)
      f.write('\n')
    table = table_lib.LatencyTable.load(table.path)
    report['fit'] = {'num': len(fit_archs), 'scale': float(scale),
                     'ms_per_mparam': float(per_mparam), 'offset_ms': float(offset)}

  names = sorted(models.ARCHITECTURES)
  random_archs = sample(space, _NUM_RANDOM.value, _SEED.value)
  archs = random_archs + names
  measured = measure(archs, table, backend, 'validate')
  sums, units, _ = raw_sums(table, archs).T
  calibrated = np.asarray([table.predict(a) for a in archs])
  report['validation'] = {
      'num_random': len(random_archs), 'named': names,
      'measured_ms_range': [float(measured.min()), float(measured.max())],
      'plain_sum': errors(sums, measured),
      'overhead_corrected': errors(sums - (units - 1) * table.overhead_ms, measured),
      'calibrated': errors(calibrated, measured),
      'named_models': {n: {'measured_ms': float(m), 'predicted_ms': float(p)}
                       for n, m, p in zip(names, measured[-len(names):], calibrated[-len(names):])}}

  batch = sample(space, _BATCH.value, _SEED.value + 2)
  fresh = table_lib.LatencyTable.load(table.path)  # an empty block cache: the first pass fills it
  start = time.perf_counter()
  first = fresh.predict_batch(batch)
  cold = time.perf_counter() - start
  start = time.perf_counter()
  second = fresh.predict_batch(batch)
  warm = time.perf_counter() - start
  exact = np.allclose(first[:200], [table.predict(a) for a in batch[:200]], rtol=1e-12)
  report['predict_batch'] = {'archs': len(batch), 'per_second_cold_cache': len(batch) / cold,
                             'per_second': len(batch) / warm, 'equals_predict': bool(exact),
                             'same_twice': bool(np.array_equal(first, second))}
  tokens = np.stack([space.encode(a) for a in batch[:1000]])
  tokens = np.concatenate([tokens] * (len(batch) // len(tokens)))
  fresh.predict_batch(tokens[:1])  # builds the per-block arrays once
  start = time.perf_counter()
  by_tokens = fresh.predict_batch(tokens)  # token rows of the table's space: predict_tokens
  report['predict_tokens'] = {'archs': len(tokens),
                              'per_second': len(tokens) / (time.perf_counter() - start),
                              'equals_predict_batch': bool(np.allclose(
                                  by_tokens[:1000], first[:1000], rtol=1e-12))}
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)
