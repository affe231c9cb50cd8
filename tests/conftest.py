"""Tests see 8 CPU devices, so data-parallel code runs as it would on a TPU host. Stand-ins for
the external tools the project drives (a phone's adb, Cloud's gcloud) are shared fixtures here."""

import functools
import importlib.util
import os
import stat
import sys
import textwrap

import jax
import pytest

# On the CPU whatever the machine (a TPU VM too), here and in the commands tests run.
os.environ['JAX_PLATFORMS'] = 'cpu'
jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8)
# The tests run each compiled program once or twice, on small inputs: XLA:CPU's LLVM passes, not the
# running, are most of their time (a model's init compiled 3x faster without them). The jobs the slow
# tier launches, benchmarks and users' runs compile with every optimisation.
jax.config.update('jax_disable_most_optimizations', True)

BENCHMARK_OUTPUT = """\
STARTING!
Graph: [/data/local/tmp/m/unit.tflite]
The input model file size (MB): 0.01
Initialized session in 3.1ms.
Running benchmark for at least 2 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
count=2 first=900 curr=700 min=700 max=900 avg=800 std=100
Running benchmark for at least 5 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
count=5 first=610 curr=590 min=580 max=620 avg=600.5 std=14
Inference timings in us: Init: 3100, First inference: 900, Warmup (avg): 800, Inference (avg): 600.5
"""


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
  """A stand-in `adb` on PATH: logs its arguments, keeps pushed files, answers like a phone."""
  log, phone = tmp_path / 'adb.log', tmp_path / 'phone'
  phone.mkdir()
  script = tmp_path / 'bin' / 'adb'
  script.parent.mkdir()
  script.write_text(
    textwrap.dedent(f"""\
      #!{sys.executable}
      import json, shutil, sys
      args = sys.argv[1:]
      open({str(log)!r}, 'a').write(json.dumps(args) + '\\n')
      if args[:2] == ['-s', 'PHONE1']:
        args = args[2:]
      if args[0] == 'push':
        shutil.copy(args[1], {str(phone)!r} + '/' + args[2].rsplit('/', 1)[1])
      elif args[0] == 'shell' and args[1].startswith('getprop'):
        print({{'ro.product.manufacturer': 'Google', 'ro.product.model': 'Pixel 1'}}.get(
            args[1].split()[1], 'x'))
      elif args[0] == 'shell' and '--graph=' in args[1]:
        sys.stdout.write({BENCHMARK_OUTPUT!r})
      """)
  )
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('PATH', f'{script.parent}{os.pathsep}{os.environ["PATH"]}')
  return log, phone


@pytest.fixture
def fake_gcloud(tmp_path):
  """A stand-in gcloud that records each call's arguments, one per line."""
  record = tmp_path / 'calls'
  script = tmp_path / 'gcloud'
  script.write_text(f'#!/usr/bin/env bash\nprintf "%s|" "$@" >> {record}\necho >> {record}\n')
  script.chmod(0o755)
  return script, record


@pytest.fixture(scope='session')
def benchmark_module():
  """benchmarks/NAME.py as a module, loaded once a process (its absl flags are defined, never
  parsed: two scripts' flags must not share a name)."""

  @functools.cache
  def load(name):
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'benchmark_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load
