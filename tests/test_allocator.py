import os
import subprocess
import sys

from mnasnet_jax import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ('import sys; sys.path.insert(0, sys.argv[1]); from mnasnet_jax import allocator; '
         'allocator.use_tcmalloc(); print(allocator.tcmalloc_loaded())')


def _probe(**env):
  environment = {k: v for k, v in os.environ.items()
                 if k not in (allocator.SWITCH, 'LD_PRELOAD')}
  environment.update(env)
  result = subprocess.run([sys.executable, '-c', PROBE, REPO], capture_output=True, text=True,
                          env=environment, check=True)
  return result.stdout.strip()


def test_entry_points_restart_under_tcmalloc():
  # The README's set-up installs tcmalloc (libtcmalloc-minimal4).
  assert allocator.tcmalloc_path() is not None
  assert _probe() == 'True'


def test_switch_keeps_the_system_allocator():
  assert _probe(**{allocator.SWITCH: '0'}) == 'False'
