"""The shipped configs as TPU hosts run them: on 8 devices, as 2 processes of 4 devices, or both.

Each config runs through the launcher (`python launch/main.py --config=configs/X.py[:ARG]`) as a
subprocess, unchanged but for its data and its step and children counts, with the forms a TPU
selects (platform.py: native depthwise and convs, autodiff BatchNorm, bfloat16 compute) in place of
the CPU ones. No batch size is overridden: a shipped batch that does not split over a host's 8
devices fails here as it would on the host. The two-process runs meet at a coordinator on
127.0.0.1, as hosts of a pod slice do, and share one workdir (MULTI_HOST_CASES: the configs several
hosts run).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import blocks
from mnasnet_jax import errors
from mnasnet_jax import history
from mnasnet_jax import input_pipeline
from mnasnet_jax import models
from mnasnet_jax import platform
from mnasnet_jax import pretrained
from mnasnet_jax import search_space
from mnasnet_jax import train
from mnasnet_jax.configs import eval as eval_config
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config
from mnasnet_jax.latency import profiler
from mnasnet_jax.latency import table as table_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
# What a TPU selects for each form key a config has (a key the config lacks is left out).
TPU_FORMS = {
  'depthwise': platform.depthwise_form(backend='tpu'),
  'conv': platform.conv_form(backend='tpu'),
  'batch_norm': platform.batch_norm_form(backend='tpu'),
  'dtype': jnp.dtype(platform.compute_dtype(backend='tpu')).name,
}
# The ImageNet configs' images: 16 px, not ImageNet's 224, a data change. Their batch of 4096 held
# 11.8 GB at 32 px and 6.2 GB at 16 on 8 devices (hundreds of GB at 224, where this 2-core machine
# has 23), so the search is given a latency table of its own for 16 px (the shipped ones are of 224
# and 32 px). ImageNet's 1000 classes are kept.
IMAGENET_DATA = {'dataset': 'synthetic', 'image_size': 16, 'num_classes': 1000}
# Units the profile_latency case leaves to the job: the journal it resumes from holds the shipped
# figures of the others (the job's 2,096 units take about 9 minutes here).
UNITS_TO_PROFILE = 8


def flags(values: dict) -> list[str]:
  return [f'--config.{key}={value}' for key, value in values.items()]


def tpu_forms(section, prefix: str = '') -> dict:
  """The forms a TPU selects, for each form key `section` of the config has."""
  return {f'{prefix}{key}': form for key, form in TPU_FORMS.items() if key in section}


def cost_table(space_config, resolution: int, num_classes: int, path: str) -> str:
  """A latency table of every unit of the space (and of mobilenet_v2, the default target) at
  `resolution` px and `num_classes`; each entry grows with its multiply-adds."""
  space = search_space.SearchSpace(space_config)
  reference = models.architecture('mobilenet_v2')
  stem_res = space.block_resolutions(resolution)[0]
  layers = space.distinct_layers(resolution) | set(
    blocks.layers(reference.blocks, reference.stem_filters, stem_res)
  )
  entries = {table_lib.layer_key(l): {'ms': 0.01 + models.layer_cost(l)[1] / 1e6} for l in layers}
  final_res = stem_res
  for base in space.base:
    final_res = blocks.same_output_size(final_res, base.stride)
  for width in space.head_input_widths():
    entries[table_lib.head_key(width, final_res, num_classes)] = {'ms': 0.05 + width / 1e4}
  for stem in {space.stem_filters, reference.stem_filters}:
    entries[table_lib.stem_key(stem, resolution)] = {'ms': 0.02}
  return table_lib.LatencyTable(
    entries,
    resolution=resolution,
    num_classes=num_classes,
    backend='test',
    device={'name': 'tests/test_as_shipped.py'},
  ).save(path)


# --- the cases: the config and its overrides (data and counts only), then a check of the workdir --


def search_imagenet(workdir):
  config = search_config.get_config()
  table = cost_table(
    config.search_space,
    IMAGENET_DATA['image_size'],
    IMAGENET_DATA['num_classes'],
    os.path.join(workdir, 'table.json'),
  )
  holdout = config.proxy.eval_batch_size  # one evaluation batch
  data = dict(
    IMAGENET_DATA, num_train=config.proxy.batch_size + holdout, num_eval=8, holdout=holdout
  )
  return 'configs/search.py', flags(
    {
      **{f'data.{k}': v for k, v in data.items()},
      **tpu_forms(config.proxy, 'proxy.'),
      'latency.table': table,
      'search.num_children': 2,
      'proxy.num_steps': 1,
    }
  )


def search_local(workdir):
  config = search_config.get_config('local')
  return 'configs/search.py:local', flags(
    {
      **tpu_forms(config.proxy, 'proxy.'),
      'search.num_children': 2,
      'proxy.num_steps': 1,
      'proxy.eval_examples': 1000,
      'proxy.bn_recalibration_batches': 1,
    }
  )


def oneshot_local(workdir):
  config = search_config.get_config('oneshot_local')
  return 'configs/search.py:oneshot_local', flags(
    {
      **tpu_forms(config.proxy, 'proxy.'),
      **tpu_forms(config.oneshot.finalist_proxy, 'oneshot.finalist_proxy.'),
      'search.num_children': 2,
      'oneshot.warmup_steps': 1,
      'oneshot.train_steps_per_child': 1,
      'oneshot.eval_examples': 1000,
      'oneshot.finalists': 2,  # one a process, when there are two
      'oneshot.finalist_proxy.num_steps': 1,
      'oneshot.finalist_proxy.eval_examples': 1000,
      'oneshot.finalist_proxy.bn_recalibration_batches': 1,
    }
  )


def check_search(workdir, num_children=2):
  records = history.read(os.path.join(workdir, 'history.jsonl'))
  assert sorted(r['trial'] for r in records) == list(range(num_children))
  assert [r['status'] for r in records] == ['ok'] * num_children, records
  assert os.listdir(os.path.join(workdir, 'checkpoints'))
  assert os.path.isfile(os.path.join(workdir, 'best.md'))


def check_oneshot(workdir):
  check_search(workdir)
  finalists = history.read(os.path.join(workdir, 'finalists.jsonl'))
  assert sorted(r['trial'] for r in finalists) == [0, 1]
  assert [r['status'] for r in finalists] == ['ok', 'ok'], finalists


def train_imagenet(workdir):
  config = train_config.get_config()
  data = dict(IMAGENET_DATA, num_train=config.batch_size, num_eval=config.eval_batch_size)
  return 'configs/train.py', flags(
    {**{f'data.{k}': v for k, v in data.items()}, **tpu_forms(config), 'num_steps': 1}
  )


def train_local(workdir):
  config = train_config.get_config('local')
  return 'configs/train.py:local', flags(
    {**tpu_forms(config), 'num_steps': 1, 'eval_examples': 1000}
  )


def check_train(workdir):
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']  # the one step's
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def export_imagenet(workdir):
  return 'configs/export.py', []


def check_export(workdir):
  with open(os.path.join(workdir, 'model.tflite'), 'rb') as f:
    assert f.read(8)[4:] == b'TFL3'  # the FlatBuffer file identifier of a TFLite model


def weights_file(workdir, name: str, num_classes: int) -> str:
  """A timm or torchvision weights file as a user downloads it (random weights: no network)."""
  from safetensors.torch import save_file
  import timm
  import torchvision

  if pretrained.SOURCES[name].library == 'timm':
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
  else:
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  path = os.path.join(workdir, f'{name}.safetensors')
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return path


def eval_imagenet(workdir):
  config = eval_config.get_config()
  data = dict(IMAGENET_DATA, num_train=8, num_eval=config.eval_batch_size)
  return 'configs/eval.py', flags(
    {
      **{f'data.{k}': v for k, v in data.items()},
      **tpu_forms(config),
      'checkpoint': weights_file(workdir, 'semnasnet_100', 1000),
    }
  )


def eval_local(workdir):
  config = eval_config.get_config('local')
  return 'configs/eval.py:local', flags(
    {
      **tpu_forms(config),
      'checkpoint': weights_file(workdir, 'mnasnet1_0', 10),
      'eval_examples': 1000,
    }
  )


def check_eval(workdir):
  result = json.load(open(os.path.join(workdir, 'eval.json')))
  assert result['examples'] in (1000, eval_config.get_config().eval_batch_size)
  assert 0 <= result['accuracy'] <= result['top5'] <= 1


def shipped_32_px_entries() -> dict:
  return json.load(open(table_lib.shipped_table('litert_cpu_32.json')))['entries']


def units_left() -> set[str]:
  """The shipped 32 px table's last UNITS_TO_PROFILE units, and the invoke overhead (in its
  calibration, not its entries)."""
  return set(sorted(shipped_32_px_entries())[-UNITS_TO_PROFILE:]) | {profiler.OVERHEAD_KEY}


def profile_local(workdir):
  """The job's journal as a stopped job leaves it: the shipped figures of all but `units_left()`."""
  with open(os.path.join(workdir, 'litert_cpu_32.journal.jsonl'), 'w') as f:
    for key, entry in sorted(shipped_32_px_entries().items())[:-UNITS_TO_PROFILE]:
      record = {k: v for k, v in entry.items() if k not in ('ms', 'params')}
      f.write(json.dumps({'key': key, **record}) + '\n')
  return 'configs/profile_latency.py:local', []


def check_profile(workdir):
  table = table_lib.LatencyTable.load(os.path.join(workdir, 'litert_cpu_32.json'))
  assert (table.resolution, table.num_classes) == (32, 10)
  assert set(table.entries) <= set(shipped_32_px_entries())
  journal = profiler.read_journal(os.path.join(workdir, 'litert_cpu_32.journal.jsonl'))
  # This run profiled exactly the units the journal lacked (only its own entries time an export).
  assert {key for key, entry in journal.items() if 'time_s' in entry} == units_left()
  assert table.predict('mobilenet_v2') > 0


CASES = {
  'search': (search_imagenet, check_search),
  'search:local': (search_local, check_search),
  'oneshot:local': (oneshot_local, check_oneshot),
  'train': (train_imagenet, check_train),
  'train:local': (train_local, check_train),
  'export': (export_imagenet, check_export),
  'eval': (eval_imagenet, check_eval),
  'eval:local': (eval_local, check_eval),
  'profile_latency:local': (profile_local, check_profile),
}


# What several hosts run: the ImageNet configs (a pod slice's work), the one profiling case and the
# search on shared weights, whose processes train one supernet together, as ':oneshot_local' (its
# ImageNet config's supernet step, 4,096 images in bfloat16, took 115 s on 2 busy cores, and the
# case over 15 minutes); the other ':local' configs are a notebook's or one host's (Colab, Kaggle's
# v5e-8), run on 8 devices.
MULTI_HOST_CASES = [
  n for n in CASES if not n.endswith(':local') or n.startswith(('profile_latency', 'oneshot'))
]
# The searches and the training that several hosts run are run here as 2 processes alone, over
# the same 8 devices, forms and shipped batch: the one-process loop of each job on 8 devices is its
# ':local' case (and tests/test_oneshot.py's for the supernet), and the ImageNet proxy's step of
# 4,096 images on one process's 8 devices is compiled by benchmarks/memory.py's README command
# (the one-process cases took 121 s, 148 s and 90 s of the suite).
ONE_HOST_CASES = [n for n in CASES if n not in ('search', 'oneshot:local', 'train')]


def launch(config, overrides, workdir, devices, process_id=0, distributed=()):
  """The launcher as a subprocess on `devices` CPU devices, its output in a log in the workdir."""
  log = open(os.path.join(workdir, f'process_{process_id}.log'), 'w')  # a pipe left unread blocks
  process = subprocess.Popen(
    [
      sys.executable,
      'launch/main.py',
      f'--config={config}',
      f'--workdir={workdir}',
      *overrides,
      *distributed,
    ],
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices)),
  )
  process.log = log.name
  return process


def finish(process):
  process.wait(timeout=900)
  assert process.returncode == 0, open(process.log).read()[-4000:]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize('name', ONE_HOST_CASES)
def test_on_8_devices(name, tmp_path):
  make, check = CASES[name]
  workdir = str(tmp_path / 'work')
  os.makedirs(workdir)
  finish(launch(*make(workdir), workdir, DEVICES))
  check(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('name', MULTI_HOST_CASES)
def test_as_2_processes_of_4_devices(name, tmp_path):
  make, check = CASES[name]
  workdir = str(tmp_path / 'work')
  os.makedirs(workdir)
  config, overrides = make(workdir)
  port = free_port()
  processes = [
    launch(
      config,
      overrides,
      workdir,
      DEVICES // 2,
      i,
      (f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'),
    )
    for i in range(2)
  ]
  for process in processes:
    finish(process)
  check(workdir)


# --- in-process, on the 8 devices of conftest.py ------------------------------------------------


@pytest.mark.slow
def test_local_training_evaluates_with_its_shipped_eval_batch_on_8_devices(tmp_path):
  """500 images an eval batch do not split over 8 devices: the batch is padded to 504 and the
  padding masked out, so the 1,000 examples score as the model scores them one by one."""
  config = train_config.get_config('local')
  assert len(jax.devices()) == DEVICES and config.eval_batch_size % DEVICES
  config.arch = 'r1_k3_s22_e1_i32_o16_noskip'  # a small network: the eval batch is under test
  config.num_steps = 1
  config.data.dataset, config.data.num_train, config.data.num_eval = 'synthetic', 256, 1000
  result = train.train_and_evaluate(config, str(tmp_path))
  data = input_pipeline.create(config.data, 'full')
  model = train.create_model(config, models.architecture(config.arch), data.num_classes)
  logits = jax.jit(
    lambda variables, images: model.apply(
      variables, train.normalise(images, (data.mean, data.std)), train=False
    )
  )(train.restore_variables(str(tmp_path)), data.test_x)
  assert result['examples'] == 1000
  assert round(result['accuracy'] * 1000) == int(np.sum(np.argmax(logits, -1) == data.test_y))
  assert result['loss'] == pytest.approx(
    float(np.mean(train.cross_entropy(logits, data.test_y, 0.0))), rel=1e-4
  )


def test_training_batch_must_split_over_the_devices(tmp_path):
  config = train_config.get_config('local')
  config.batch_size = 100
  with pytest.raises(
    errors.UserError,
    match=r'^batch size 100: expected a multiple of the 8 '
    'devices$',
  ):
    train.train_and_evaluate(config, str(tmp_path))
