import collections
import functools
import json
import re

import jax
import ml_collections
import numpy as np
import pytest

from mnasnet_jax import blocks
from mnasnet_jax import errors
from mnasnet_jax import latency
from mnasnet_jax import models
from mnasnet_jax import search_space
from mnasnet_jax.configs.search import get_config as search_config
from mnasnet_jax.latency import export
from mnasnet_jax.latency import profiler
from mnasnet_jax.latency import table as table_lib

# Every op the export can meet: no skip (e1), SE + pool skip with stride and projection, the repeat's
# pool skip without either, a regular conv with SE whose identity skip cannot apply (24 -> 32), and a
# strided pool skip at equal widths.
ARCH = [
  'r1_k3_s11_e1_i32_o16_noskip',
  'r2_k5_s22_e3_i16_o24_se0.25_poolskip',
  'r1_k3_s11_e1_i24_o32_conv_se0.25',
  'r1_k3_s22_e6_i32_o32_poolskip',
]


def interpreter(content, delegate=True):
  from ai_edge_litert.interpreter import Interpreter
  from ai_edge_litert.interpreter import OpResolverType

  kwargs = (
    {}
    if delegate
    else {'experimental_op_resolver_type': OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
  )
  result = Interpreter(model_content=content, num_threads=1, **kwargs)
  result.allocate_tensors()
  return result


def test_tflite_equals_jax_model(tmp_path):
  model = models.create(ARCH, num_classes=10, depthwise='native', dtype='float32')
  images = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  variables = export.random_variables(model, images.shape, seed=1)  # BN statistics far from 0/1
  expected = np.asarray(
    jax.jit(model.apply, static_argnames='train')(variables, images, train=False)
  )
  path = latency.export_tflite(
    ARCH, tmp_path / 'model.tflite', resolution=32, num_classes=10, params=variables
  )
  content = open(path, 'rb').read()
  run = interpreter(content)
  run.set_tensor(run.get_input_details()[0]['index'], images)
  run.invoke()
  got = run.get_tensor(run.get_output_details()[0]['index'])
  assert got.shape == (1, 10)
  np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())
  # BN folded: the graph holds exactly the convs counted by hand, no BN arithmetic. CONV_2D: stem 1,
  # layer 1 (project) 1, layer 2 (expand, SE x2, project, shortcut) 5, layer 3 (expand, SE x2,
  # project) 4, layer 4 (conv, SE x2) 3, layer 5 (expand, project) 2, head 1.
  ops = collections.Counter(o['op_name'] for o in interpreter(content, False)._get_ops_details())
  assert ops == {
    'CONV_2D': 17,
    'DEPTHWISE_CONV_2D': 4,
    'MEAN': 4,
    'LOGISTIC': 3,
    'MUL': 3,
    'ADD': 3,
    'AVERAGE_POOL_2D': 2,
    'FULLY_CONNECTED': 1,
  }


def test_folded_model_equals_the_model_and_its_parts_are_the_units():
  model = models.create(ARCH, num_classes=10, depthwise='native', dtype='float32')
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = export.random_variables(model, images.shape, seed=1)
  folded = export.fold_batchnorm(variables)
  net = export.inference_model(model)
  expected = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  got = jax.jit(net.apply)(folded, images)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The table's units are that network's parts: the same variables, layer by layer.
  shapes = jax.tree_util.tree_map(np.shape, folded['params'])
  unit_shapes = lambda module, shape: jax.tree_util.tree_map(
    np.shape, models.variable_shapes(module, shape)['params']
  )
  assert unit_shapes(net.stem(32), images.shape) == {k: shapes[k] for k in ('stem', 'stem_bn')}
  specs = model.layer_specs(32)
  for i, spec in enumerate(specs):
    shape = (1, spec.resolution, spec.resolution, spec.in_filters)
    assert unit_shapes(net.layer(spec), shape) == shapes[f'layer_{i}']
  last = (1, specs[-1].out_resolution, specs[-1].out_resolution, specs[-1].out_filters)
  assert unit_shapes(net.head(), last) == {k: shapes[k] for k in ('head', 'head_bn', 'classifier')}


def test_int8_export_reports_top1_against_the_float_model_and_both_latencies(tmp_path, capsys):
  from mnasnet_jax.configs.export import get_config as export_config

  config = export_config('local,resolution=16')
  config.arch = ','.join(ARCH[:2])
  config.precision, config.io_dtype = 'int8', 'float32'
  config.data.dataset, config.data.num_train, config.data.num_eval = 'synthetic', 64, 48
  config.calibration_images, config.eval_examples, config.eval_batch_size = 16, 40, 32
  config.latency.update(instances=1, warmup=1, repeats=2)
  export.run(config, str(tmp_path))
  report = json.loads((tmp_path / 'export_report.json').read_text())
  assert report['top1']['examples'] == 40 and report['calibration_images'] == 16
  assert set(report['top1']) == {'examples', 'jax_float32', 'float32', 'int8'}
  # The float file computes the JAX model: the same predictions on every held-out image.
  assert report['top1']['float32'] == report['top1']['jax_float32']
  assert all(report['latency_ms'][p]['median'] > 0 for p in ('float32', 'int8'))
  run = interpreter((tmp_path / 'model_int8.tflite').read_bytes(), delegate=False)
  assert run.get_input_details()[0]['dtype'] == np.float32  # io_dtype float32: QUANTIZE first
  assert {'QUANTIZE', 'DEQUANTIZE'} <= {o['op_name'] for o in run._get_ops_details()}
  assert 'int8' in capsys.readouterr().out
  config.io_dtype = 'int4'
  with pytest.raises(errors.UserError, match="config.io_dtype = 'int4': expected one of"):
    export.run(config, str(tmp_path))
  # Data that is not the model's is refused before anything is written.
  config.io_dtype, config.data.image_size = 'int8', 24
  with pytest.raises(errors.UserError, match=r'config.data \(synthetic, 24 px.*16 px, 10 classes'):
    export.run(config, str(tmp_path / 'other'))
  assert not (tmp_path / 'other').exists()


def test_layer_keys_normalise_what_does_not_change_compute():
  def key(block, width=16, res=8):
    return table_lib.layer_key(blocks.layers([block], width, res)[0])

  # A strided or width-changing layer gets no identity residual: the same compute as `_noskip`.
  assert key('r1_k3_s22_e6_i16_o24') == key('r1_k3_s22_e6_i16_o24_noskip')
  assert key('r1_k3_s11_e6_i16_o24') == key('r1_k3_s11_e6_i16_o24_noskip')
  # A pool skip with stride 1 and equal widths is the identity residual.
  assert key('r1_k3_s11_e6_i16_o16_poolskip') == key('r1_k3_s11_e6_i16_o16')
  assert key('r1_k3_s11_e6_i16_o16') == 'mbconv_k3_s1_e6_i16_o16_se0_add_r8'
  assert key('r1_k5_s22_e3_i16_o24_se0.25_poolskip') == 'mbconv_k5_s2_e3_i16_o24_se4_poolprojadd_r8'
  assert key('r1_k3_s11_e6_i16_o16') != key('r1_k3_s11_e6_i16_o16', res=16)
  assert key('r1_k3_s11_e6_i16_o16') != key('r1_k3_s11_e6_i16_o16_se0.25')


def synthetic_table(arch, resolution=32, num_classes=10, **calibration):
  """Each unit of `arch` gets a distinct known latency: 1, 2, 4, ... ms (sums are unambiguous)."""
  units = table_lib.network_units(arch, resolution, num_classes)
  entries = {
    k: {'ms': float(2**i), 'params': 1_000_000} for i, k in enumerate(dict.fromkeys(units))
  }
  return table_lib.LatencyTable(
    entries,
    resolution=resolution,
    num_classes=num_classes,
    backend='test',
    device={'name': 'test'},
    calibration=calibration,
  )


def test_predict_is_stem_plus_layers_plus_head_with_calibration(tmp_path):
  table = synthetic_table(ARCH)
  # Units: stem, 5 layers (1 + 2 + 1 + 1), head: 7 distinct ones -> 1 + 2 + ... + 64.
  assert table.predict(ARCH) == 127.0
  assert synthetic_table(ARCH, overhead_ms=0.5).predict(ARCH) == 127.0 - 6 * 0.5  # unfitted
  calibrated = synthetic_table(ARCH, overhead_ms=0.5, unit_ms=0.25, scale=2.0)
  assert calibrated.predict(ARCH) == 2.0 * (127.0 - 6 * 0.25)
  path = calibrated.save(tmp_path / 't.json')
  loaded = latency.LatencyTable.load(path)
  assert (loaded.resolution, loaded.num_classes, loaded.path) == (32, 10, path)
  assert loaded.predict(ARCH) == calibrated.predict(ARCH)
  np.testing.assert_array_equal(loaded.predict_batch([ARCH, ARCH]), [loaded.predict(ARCH)] * 2)


def test_fit_calibration_recovers_a_known_scale_and_unit_cost():
  rng = np.random.default_rng(0)
  sums, units = rng.uniform(0.5, 5.0, 30), rng.integers(10, 40, 30)
  measured = 1.15 * (sums - (units - 1) * 0.006)
  assert table_lib.fit_calibration(sums, units, measured) == pytest.approx((1.15, 0.006), rel=1e-9)
  assert table_lib.fit_scale(sums, units, measured, 0.006) == pytest.approx(1.15, rel=1e-12)


def test_missing_layer_names_signature_and_path(tmp_path):
  path = synthetic_table(ARCH).save(tmp_path / 'small.json')
  table = latency.LatencyTable.load(path)
  other = ARCH[:-1] + ['r1_k5_s22_e6_i32_o32_poolskip']
  for predict in (table.predict, lambda a: table.predict_batch([a])):
    with pytest.raises(KeyError, match=r'mbconv_k5_s2_e6_i32_o32_se0_pooladd_r8.*small\.json'):
      predict(other)


@pytest.mark.parametrize(
  'content, why',
  [
    ('{"format": "mnasnet_jax.latency_table", ', 'not valid JSON'),
    ('[1, 2]', 'format'),
    ('{"format": "mnasnet_jax.latency_table", "version": 1}', 'expected version 2, got 1'),
    ('{"format": "mnasnet_jax.latency_table", "version": 2, "resolution": 32}', 'missing field'),
    (
      '{"format": "mnasnet_jax.latency_table", "version": 2, "resolution": 32, "num_classes": 10, '
      '"backend": "litert", "device": {}, "entries": {"stem_o32_r32": {"ms": -1}}}',
      'stem_o32_r32',
    ),
  ],
)
def test_corrupt_table_is_a_clear_error(tmp_path, content, why):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=f'corrupt latency table {path}.*{why}'):
    latency.LatencyTable.load(path)


def tiny_profile_config(**changes):
  """The default space with only the last block searched over two ops, at 16 px."""
  space = search_config().search_space
  space.searched_blocks = (6,)
  space.conv_ops, space.kernels, space.se_ratios = ('sepconv', 'mbconv6'), (3,), (0.0,)
  space.skip_ops, space.filter_multipliers, space.layer_deltas = ('identity',), (1.0,), (0,)
  fields = dict(
    job='profile_latency',
    search_space=space,
    architectures=(),
    resolution=16,
    num_classes=10,
    table_name='tiny.json',
    backend='litert',
    instances=2,
    warmup=1,
    repeats=3,
    num_threads=1,
    statistic='min',
    flush_mib=1.0,
    log_every_seconds=0.0,
    precision='float32',
    recalibrate=None,
    recalibration=dict(num_random=2, seed=2, fit='scale'),
    adb=dict(
      binary='adb', serial='', device_dir='/data/local/tmp/m', benchmark_binary='/bm', cpu_mask='f0'
    ),
  )
  fields.update(changes)
  return ml_collections.ConfigDict(fields)


def test_profiler_covers_the_space_resumes_and_predicts_sums(tmp_path, monkeypatch):
  config = tiny_profile_config()
  table = profiler.profile(config, str(tmp_path))
  space = search_space.SearchSpace(config.search_space)
  journal = tmp_path / 'tiny.journal.jsonl'
  records = [json.loads(line) for line in journal.read_text().splitlines()]
  entries = {r['key']: r['min_ms'] for r in records}
  # Every distinct layer of the space, one stem, one head per reaching width, the overhead unit.
  keys = {table_lib.layer_key(l) for l in space.distinct_layers(16)}
  assert set(entries) == keys | {'stem_o32_r16', 'head_i320_r1_c10', profiler.OVERHEAD_KEY}
  assert all(r['count'] == 2 * 3 and 0 < r['min_ms'] <= r['median_ms'] for r in records)
  loaded = latency.LatencyTable.load(tmp_path / 'tiny.json')
  assert loaded.metadata['timing']['repeats'] == 3 and loaded.metadata['timing']['instances'] == 2
  assert loaded.metadata['timing']['flush_mib'] == 1.0
  assert loaded.device['num_threads'] == 1
  assert loaded.metadata['versions']['litert-converter'] == '0.5.0'
  for tokens in ([0] * 6, [1] + [0] * 5):
    arch = space.decode(tokens)
    layers = blocks.layers(arch, 32, 8)
    by_hand = (
      entries['stem_o32_r16']
      + sum(entries[table_lib.layer_key(l)] for l in layers)
      + entries['head_i320_r1_c10']
      - (len(layers) + 1) * entries[profiler.OVERHEAD_KEY]
    )
    assert loaded.predict(arch) == pytest.approx(by_hand, rel=1e-12)
    assert table.predict(arch) == loaded.predict(arch)
    # The entries' parameter counts add up to the folded Flax model's.
    model = models.create(arch, num_classes=10, depthwise='native', dtype='float32')
    folded = export.fold_batchnorm(export.random_variables(model, (1, 16, 16, 3)))
    assert loaded.params(arch) == models.count_params(folded)
  # A second run finds everything in the journal: nothing is exported or timed again.
  monkeypatch.setattr(export, 'to_tflite', lambda *a: pytest.fail('re-exported a finished unit'))
  profiler.profile(config, str(tmp_path))
  assert journal.read_text().count('\n') == len(records)


def test_int8_profile_quantizes_every_unit_as_an_int8_network(tmp_path):
  config = tiny_profile_config(precision='int8', search_space=None, architectures=(ARCH[1],))
  table = profiler.profile(config, str(tmp_path))
  assert table.precision == 'int8' and len(table) == 4
  assert latency.LatencyTable.load(tmp_path / 'tiny.json').precision == 'int8'
  # A unit is integer end to end, int8 in and out as between the layers of an int8 network.
  layer = blocks.layers([ARCH[1]], 16, 8)[0]
  shape = (1, 8, 8, 16)
  net = export.inference_model(models.MnasNet(blocks=(), num_classes=10))
  content = profiler.in_precision(export.module_tflite(net.layer(layer), shape), shape, 'int8')
  run = interpreter(content, delegate=False)
  assert run.get_input_details()[0]['dtype'] == run.get_output_details()[0]['dtype'] == np.int8
  assert {d['dtype'] for d in run.get_tensor_details()} <= {np.int8, np.int32}
  assert not {'QUANTIZE', 'DEQUANTIZE'} & {o['op_name'] for o in run._get_ops_details()}


def test_profile_config_precision_argument_names_the_int8_table():
  from mnasnet_jax.configs.profile_latency import get_config as profile_config

  config = profile_config('local,precision=int8')
  assert (config.precision, config.table_name, config.resolution) == (
    'int8',
    'litert_cpu_32_int8.json',
    32,
  )
  assert config.search_space == search_config('local').search_space
  assert profile_config('resolution=64').table_name == 'litert_cpu_64.json'


def test_journal_ignores_a_torn_last_line_only(tmp_path):
  path = tmp_path / 'j.jsonl'
  path.write_text('{"key": "a", "ms": 1.0}\n{"key": "b", "ms"')
  assert profiler.read_journal(str(path)) == {'a': {'ms': 1.0}}
  path.write_text('{"key": "a", "ms"\n{"key": "b", "ms": 1.0}\n')
  with pytest.raises(ValueError, match='corrupt journal.*line 1'):
    profiler.read_journal(str(path))


@pytest.mark.parametrize(
  'cpuinfo, expected',
  [
    (
      'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n'
      'model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n'
      'processor\t: 1\ncpu family\t: 25\nflags\t\t: fpu\n',
      {
        'model name': 'AMD EPYC',
        'cpu family': '26',
        'model': '2',
        'stepping': '1',
        'isa': ['avx2', 'avx512f', 'avx512_vnni'],
      },
    ),
    (
      'processor\t: 0\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd asimddp i8mm\n'
      'CPU implementer\t: 0x41\nCPU part\t: 0xd4f\n',
      {'CPU implementer': '0x41', 'CPU part': '0xd4f', 'isa': ['asimddp', 'i8mm']},
    ),
  ],
)
def test_a_table_records_its_cpu_generation_and_simd_extensions(tmp_path, cpuinfo, expected):
  # The first processor's, whatever the others say; 'model name' alone does not tell Zen 4 from 5.
  path = tmp_path / 'cpuinfo'
  path.write_text(cpuinfo)
  assert profiler.cpu_identity(str(path)) == expected
  assert profiler.cpu_identity(str(tmp_path / 'absent')) == {}


def test_adb_backend_pushes_pins_and_parses(fake_adb):
  log, phone = fake_adb
  backend = profiler.AdbBackend(
    warmup=2,
    repeats=5,
    serial='PHONE1',
    device_dir='/data/local/tmp/m',
    benchmark_binary='/data/local/tmp/benchmark_model',
    cpu_mask='f0',
    instances=2,
  )
  net = export.inference_model(models.MnasNet(blocks=(), num_classes=10))
  content = export.module_tflite(net.stem(8), (1, 16, 16, 3))
  entry = backend.time(content, 'unit')  # two runs of benchmark_model, pooled
  assert entry == pytest.approx({'mean_ms': 0.6005, 'std_ms': 0.014, 'min_ms': 0.58, 'count': 10})
  assert (phone / 'unit.tflite').read_bytes() == content  # the model reached the phone intact
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert all(c[:2] == ['-s', 'PHONE1'] for c in calls)
  assert calls[1][2] == 'push' and calls[1][4] == '/data/local/tmp/m/unit.tflite'
  bench = calls[2][3].split()
  assert bench[:3] == ['taskset', 'f0', '/data/local/tmp/benchmark_model']
  assert {
    '--graph=/data/local/tmp/m/unit.tflite',
    '--num_threads=1',
    '--warmup_runs=2',
    '--num_runs=5',
  } <= set(bench)
  assert calls[3] == calls[2]
  assert calls[4][2:] == ['shell', 'rm -f /data/local/tmp/m/unit.tflite']
  assert backend.device()['name'] == 'Google Pixel 1'


def test_pooled_runs_equal_the_statistics_of_all_samples():
  rng = np.random.default_rng(0)
  runs = [rng.normal(1.0 + i, 0.1 * (i + 1), 5 + i) for i in range(3)]
  stats = [
    {'mean_ms': r.mean(), 'std_ms': r.std(), 'min_ms': r.min(), 'count': r.size} for r in runs
  ]
  every = np.concatenate(runs)
  assert profiler.pool_runs(stats) == pytest.approx(
    {'mean_ms': every.mean(), 'std_ms': every.std(), 'min_ms': every.min(), 'count': every.size}
  )


def test_adb_profile_job_and_failures(tmp_path, monkeypatch, fake_adb):
  config = tiny_profile_config(
    backend='adb',
    search_space=None,
    architectures=('r1_k3_s11_e1_i32_o16_noskip,r1_k3_s22_e3_i16_o24',),
  )
  table = profiler.profile(config, str(tmp_path / 'work'))
  assert len(table) == 4 and table.device['model'] == 'Pixel 1'
  assert table.metadata['timing']['statistic'] == 'min'
  arch = config.architectures[0]
  assert table.predict(arch) == pytest.approx(4 * 0.58 - 3 * 0.58)
  # The table records its backend's settings, so its validation times whole models on that phone.
  again = profiler.create_backend(
    ml_collections.ConfigDict({'backend': table.backend, **table.metadata['timing']})
  )
  assert isinstance(again, profiler.AdbBackend) and again.serial is None and again.cpu_mask == 'f0'
  assert (again.repeats, again.instances, again.device_dir) == (3, 2, '/data/local/tmp/m')
  config.statistic = 'median'  # benchmark_model prints none: refused before anything is timed
  with pytest.raises(
    errors.UserError,
    match="config.statistic = 'median': expected one of "
    r"\('min', 'mean'\) for the adb backend",
  ):
    profiler.profile(config, str(tmp_path / 'work2'))
  assert not (tmp_path / 'work2').exists()
  with pytest.raises(ValueError, match='no timing line'):
    profiler.parse_benchmark_model('error: could not open graph')
  monkeypatch.setenv('PATH', str(tmp_path / 'nowhere'))
  with pytest.raises(errors.UserError, match="adb executable 'adb' not found"):
    profiler.AdbBackend(1, 1).time(b'', 'x')


def test_recalibration_refits_the_table_on_whole_models_and_records_where(tmp_path):
  named = ('r1_k3_s11_e1_i32_o16_noskip',)
  config = tiny_profile_config(instances=1, repeats=2, flush_mib=0.0, architectures=named)
  profiler.profile(config, str(tmp_path / 'table'))
  config.recalibrate = str(tmp_path / 'table' / 'tiny.json')
  table = profiler.recalibrate(config, str(tmp_path / 'new'))
  done = table.metadata['calibration']['recalibrated']
  assert done['device']['num_threads'] == 1 and done['backend'] == 'litert' and done['date']
  assert len(done['architectures']) == len(done['measured_ms']) == 3  # 1 named + 2 random
  # The calibration is the relative least-squares fit to those whole models' times: the scale
  # alone by default, the unit's fixed cost kept.
  archs = [a.split(',') for a in done['architectures']]
  sums, units = np.asarray([table.sums(a) for a in archs]).T
  unit_ms = done['previous']['unit_ms']
  assert table.unit_ms == unit_ms
  assert table.scale == pytest.approx(
    table_lib.fit_scale(sums, units, done['measured_ms'], unit_ms), rel=1e-9
  )
  loaded = latency.LatencyTable.load(tmp_path / 'new' / 'tiny.json')
  assert loaded.predict(archs[1]) == table.predict(archs[1])
  assert loaded.metadata['calibration']['recalibrated'] == done


def test_recalibration_through_adb_times_whole_models_on_the_phone(tmp_path, fake_adb):
  log, _ = fake_adb
  archs = ('r1_k3_s11_e1_i32_o16_noskip', 'r1_k3_s11_e1_i32_o16_noskip,r1_k3_s22_e3_i16_o24')
  config = tiny_profile_config(backend='adb', search_space=None, architectures=archs)
  profiler.profile(config, str(tmp_path / 'table'))
  calls = len(log.read_text().splitlines())
  config.recalibrate = str(tmp_path / 'table' / 'tiny.json')
  config.recalibration.fit = 'scale_and_unit'
  table = profiler.recalibrate(config, str(tmp_path / 'new'))
  # Every unit and whole model takes the stand-in's 0.58 ms: the refit predicts exactly that.
  assert [table.predict(a) for a in archs] == pytest.approx([0.58, 0.58])
  done = table.metadata['calibration']['recalibrated']
  assert done['device']['name'] == 'Google Pixel 1' and done['fit_after']['worst_pct'] < 1e-6
  graphs = [c for c in map(json.loads, log.read_text().splitlines()[calls:]) if '--graph' in c[-1]]
  assert len(graphs) == 2 * (len(archs) + 1)  # instances x (models + the discarded first)
  with pytest.raises(errors.UserError, match="config.recalibrate = '/nowhere/t.json'"):
    profiler.recalibrate(tiny_profile_config(recalibrate='/nowhere/t.json'), str(tmp_path))


@pytest.mark.slow
def test_search_on_an_int8_table_runs_end_to_end(tmp_path):
  import test_search  # the toy search of tests/test_search.py: one searched block at 16 px

  from mnasnet_jax import history
  from mnasnet_jax import search

  config = tiny_profile_config(
    search_space=test_search._space_config(), num_classes=4, precision='int8', repeats=2
  )
  table = profiler.profile(config, str(tmp_path / 'table'))
  search_config = test_search.tiny_config(str(tmp_path / 'table' / 'tiny.json'), num_children=2)
  search.run(search_config, str(tmp_path / 'search'))
  records = history.read(str(tmp_path / 'search' / 'history.jsonl'))
  assert [r['status'] for r in records] == ['ok', 'ok']
  space = search_space.SearchSpace(search_config.search_space)
  for r in records:
    arch = models.Architecture(tuple(space.decode(r['tokens'])), stem_filters=8)
    assert r['latency_ms'] == pytest.approx(table.predict(arch))


@pytest.mark.parametrize(
  'changes, named',
  [
    ({'backend': 'phone'}, "config.backend = 'phone': expected 'litert' or 'adb'"),
    ({'repeats': 0}, 'config.repeats = 0: expected a whole number >= 1'),
    ({'statistic': 'mode'}, "config.statistic = 'mode': expected one of"),
    ({'precision': 'int4'}, "config.precision = 'int4': expected one of ('float32', 'int8')"),
  ],
)
def test_profile_refuses_a_bad_setting_before_any_work(tmp_path, changes, named):
  with pytest.raises(errors.UserError, match=re.escape(named)):
    profiler.profile(tiny_profile_config(**changes), str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()
  with pytest.raises(errors.UserError, match='needs --workdir=DIR'):
    profiler.profile(tiny_profile_config(), '')


@pytest.mark.parametrize(
  'name, arg',
  [
    ('litert_cpu_32.json', 'local'),
    ('litert_cpu_32_int8.json', 'local'),
    ('litert_cpu_224.json', None),
  ],
)
def test_shipped_tables_cover_the_space_and_named_models(name, arg):
  table = latency.LatencyTable.load(name)
  space = search_space.SearchSpace(search_config(arg).search_space)
  assert (table.resolution, table.num_classes) == ((32, 10) if arg else (224, 1000))
  missing = {table_lib.layer_key(l) for l in space.distinct_layers(table.resolution)} - set(
    table.entries
  )
  assert not missing
  net = export.inference_model(models.MnasNet(blocks=(), num_classes=table.num_classes))
  for arch in models.ARCHITECTURES:
    assert table.predict(arch) > 0
    # Each entry's parameter count is its Flax unit's (the units as the network has them).
    spec = models.architecture(arch)
    layers = blocks.layers(
      spec.blocks, spec.stem_filters, blocks.same_output_size(table.resolution, 2)
    )
    res = table.resolution
    units = (
      [(net.stem(spec.stem_filters), (1, res, res, 3))]
      + [(net.layer(l), (1, l.resolution, l.resolution, l.in_filters)) for l in layers]
      + [
        (
          net.head(),
          (1, layers[-1].out_resolution, layers[-1].out_resolution, layers[-1].out_filters),
        )
      ]
    )
    keys = table_lib.network_units(arch, table.resolution, table.num_classes)
    assert [table.entries[k]['params'] for k in keys] == [
      export.param_count(module, shape) for module, shape in units
    ]
  rng = np.random.default_rng(0)
  archs = [space.decode([rng.integers(c) for c in space.choices]) for _ in range(100)]
  np.testing.assert_allclose(
    table.predict_batch(archs), [table.predict(a) for a in archs], rtol=1e-12
  )
  tokens = np.stack([space.encode(a) for a in archs])
  np.testing.assert_allclose(
    table.predict_tokens(space, tokens), table.predict_batch(archs), rtol=1e-12
  )
  np.testing.assert_array_equal(table.predict_batch(tokens), table.predict_tokens(space, tokens))
  with pytest.raises(ValueError, match='tokens out of range'):
    table.predict_tokens(space, tokens + 5)
