import os
import subprocess
import sys

import pytest

from mnasnet_jax import allocator

PROBE = (
  'from mnasnet_jax import allocator; allocator.use_tcmalloc(); print(allocator.tcmalloc_loaded())'
)


def _probe(**env):
  environment = {k: v for k, v in os.environ.items() if k not in (allocator.SWITCH, 'LD_PRELOAD')}
  environment.update(env)
  result = subprocess.run(
    [sys.executable, '-c', PROBE], capture_output=True, text=True, env=environment, check=True
  )
  return result.stdout.strip()


@pytest.mark.cpu_only
def test_entry_points_restart_under_tcmalloc():
  # The README's set-up installs tcmalloc (libtcmalloc-minimal4).
  assert allocator.tcmalloc_path() is not None
  assert _probe() == 'True'


def test_switch_keeps_the_system_allocator():
  assert _probe(**{allocator.SWITCH: '0'}) == 'False'


@pytest.mark.cpu_only
def test_only_a_cpu_run_restarts():
  assert _probe(JAX_PLATFORMS='tpu') == 'False'
  assert _probe(JAX_PLATFORMS='cpu') == 'True'


def test_an_accelerator_needs_its_devices_and_its_package(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  # 'json' stands in for the accelerator's package (importable), tmp_path for /dev.
  monkeypatch.setattr(
    allocator,
    'ACCELERATORS',
    {'json': (str(tmp_path / 'accel[0-9]*'),), 'no_such_package': (str(tmp_path / 'gpu*'),)},
  )
  (tmp_path / 'gpu0').touch()
  assert allocator.runs_on_cpu()
  (tmp_path / 'accel0').touch()
  assert not allocator.runs_on_cpu()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert allocator.runs_on_cpu()
