"""Entry point: `python launch/main.py --config=configs/search.py[:ARG] --workdir=DIR [--config.X=Y]`.

Dispatches on `config.job` to a `run(config, workdir)` function. On a pod slice every host runs the
same command; `jax.distributed` starts first (by itself on Cloud TPU, from the flags elsewhere).
"""

import importlib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

JOBS = {
    'summary': 'mnasnet_jax.models:print_summary_table',
    'search': 'mnasnet_jax.search:run',
    'profile_latency': 'mnasnet_jax.latency.profiler:run',
    'train': 'mnasnet_jax.train:run',
    'export': 'mnasnet_jax.latency.export:run',
}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with ":ARG".',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, history and reports.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs off Cloud TPU.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index in the job.")
flags.mark_flag_as_required('config')


def _initialise_distributed():
  import jax
  if _NUM_PROCESSES.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif 'TPU_WORKER_HOSTNAMES' in os.environ or 'CLOUD_TPU_TASK_ID' in os.environ:
    jax.distributed.initialize()


def parse_flags(argv):
  """absl's parser, with a one-line error (no traceback) for an override naming no config key."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).encode().decode('unicode_escape')
    key = re.search(r"'([^'\\]+)", message).group(1) if "'" in message else message
    hint = re.search(r'Did you mean "([^"]+)"', message)
    override = next((a for a in argv if a.startswith('--config.') and f'.{key}' in a), key)
    sys.exit(f'error: {override}: the config has no key {key!r}'
             + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
             + '; see the config file for the keys it defines')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config.job not in JOBS:
    raise app.UsageError(f'unknown job {config.job!r} in the config: expected one of {sorted(JOBS)}')
  _initialise_distributed()
  logging.info('config:\n%s', config)
  module, function = JOBS[config.job].split(':')
  from mnasnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    getattr(importlib.import_module(module), function)(config, _WORKDIR.value)
  except input_pipeline.DatasetMissingError as e:  # a setup step, not a bug: no traceback
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  from mnasnet_jax import allocator  # pylint: disable=g-import-not-at-top
  allocator.use_tcmalloc()
  app.run(main, flags_parser=parse_flags)
