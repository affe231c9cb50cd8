"""The host memory allocator: tcmalloc, preloaded by restarting the entry point once.

XLA:CPU allocates a training step's buffers afresh on every step. glibc's malloc serves blocks of
more than a few MiB with mmap and unmaps them on free, so every step page-faults its whole working
set back in: MnasNet-A1's step at 224 px spent more time in the kernel zeroing pages than in some
of its layers (5.5M page faults in a 15-step benchmark). tcmalloc keeps freed blocks for reuse:
the same benchmark ran 11.6 images/s under glibc and 19.9 under tcmalloc (1.1M faults).

An allocator can only be chosen before the process starts, so `use_tcmalloc()` re-executes the
running command with tcmalloc in LD_PRELOAD. It does nothing when tcmalloc is not installed
(Debian: libtcmalloc-minimal4), is already loaded, or MNASNET_JAX_TCMALLOC=0, and on a run JAX
will not place on the CPU (its step's buffers then live on the accelerator, not the host): as JAX
has not started yet, `runs_on_cpu` judges that from the environment.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
import sys

SWITCH = 'MNASNET_JAX_TCMALLOC'
LIBRARIES = ('tcmalloc_minimal', 'tcmalloc')
# The package JAX drives an accelerator with -> the device files of that accelerator: TPU VMs have
# /dev/accel<N> (v2-v4) or /dev/vfio/<N> (v5e on), NVIDIA GPUs /dev/nvidia<N>.
ACCELERATORS = {
  'libtpu': ('/dev/accel[0-9]*', '/dev/vfio/[0-9]*'),
  'jax_cuda12_plugin': ('/dev/nvidia[0-9]*',),
  'jax_cuda13_plugin': ('/dev/nvidia[0-9]*',),
}


def tcmalloc_path() -> str | None:
  for name in LIBRARIES:
    path = ctypes.util.find_library(name)
    if path:
      return path
  return None


def tcmalloc_loaded() -> bool:
  try:
    with open('/proc/self/maps') as f:
      return 'tcmalloc' in f.read()
  except OSError:
    return False


def runs_on_cpu() -> bool:
  """Whether JAX will run this process on the CPU, before it starts: the first of JAX_PLATFORMS
  when that is set, else whether no accelerator is there with the package JAX would drive it by."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(
    any(glob.glob(p) for p in devices) and importlib.util.find_spec(package)
    for package, devices in ACCELERATORS.items()
  )


def use_tcmalloc() -> None:
  """Restarts this Python command (interpreter options included) with tcmalloc preloaded, once;
  returns if it cannot or need not."""
  if os.environ.get(SWITCH) == '0' or tcmalloc_loaded() or not runs_on_cpu():
    return
  path = tcmalloc_path()
  if path is None:
    return
  env = dict(os.environ)
  env[SWITCH] = '0'  # the restarted process must not restart again, whatever it finds
  env['LD_PRELOAD'] = ' '.join(filter(None, [path, env.get('LD_PRELOAD')]))
  # tcmalloc reports every allocation over 1 GiB on stderr; a full-scale step makes several.
  env.setdefault('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(1 << 40))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
