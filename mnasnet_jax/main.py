"""The command line of every job: search, train, eval, export, profile_latency, summary, detect.

`python -m mnasnet_jax.main --config=CONFIG[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`, the same
as `python launch/main.py ...` and, once installed, `mnasnet ...`. CONFIG is a config file
(configs/search.py) or a module of the package (mnasnet_jax.configs.search). Dispatches on
`config.job` to a `run(config, workdir)` function. On a pod slice every host runs the same command;
`jax.distributed` starts first (by itself on Cloud TPU, from the flags elsewhere).

A mistake in the user's input (errors.UserError, and flag values absl refuses) ends the process with
one line, `error: <message>`, and exit code 1; any other exception is a bug and keeps its traceback.
"""

import importlib
import importlib.util
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mnasnet_jax import errors

JOBS = {
  'summary': 'mnasnet_jax.models:print_summary_table',
  'search': 'mnasnet_jax.search:run',
  'oneshot': 'mnasnet_jax.oneshot:run',
  'profile_latency': 'mnasnet_jax.latency.profiler:run',
  'train': 'mnasnet_jax.train:run',
  'eval': 'mnasnet_jax.evaluate:run',
  'export': 'mnasnet_jax.latency.export:run',
  'detect': 'mnasnet_jax.detection.job:run',
}

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file or module, optionally with ":ARG".', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, history and reports.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0, for multi-process runs off Cloud TPU.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index in the job.")
flags.mark_flag_as_required('config')


def _initialise_distributed():
  import jax  # pylint: disable=g-import-not-at-top

  if _NUM_PROCESSES.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif 'TPU_WORKER_HOSTNAMES' in os.environ or 'CLOUD_TPU_TASK_ID' in os.environ:
    jax.distributed.initialize()


def config_path(value: str) -> str:
  """`--config`'s FILE[:ARG] with a module name (mnasnet_jax.configs.search) as its file's path;
  a file that exists is left as given."""
  name, colon, arg = value.partition(':')
  if os.path.isfile(name):
    return value
  spec = None
  if re.fullmatch(r'\w+(\.\w+)+', name):
    try:
      spec = importlib.util.find_spec(name)
    except ImportError:
      pass
  if spec is None or not spec.origin or not os.path.isfile(spec.origin):
    raise errors.UserError(
      f'--config={value}: no config file or module {name!r}; expected a '
      'path such as configs/search.py or a module such as '
      'mnasnet_jax.configs.search'
    )
  return spec.origin + colon + arg


def _innermost_user_error(error: BaseException):
  """The UserError that absl's and ml_collections' wrappers of a config file's error hide."""
  found = None
  while error is not None:
    if isinstance(error, errors.UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def parse_flags(argv):
  """absl's parser, with a one-line error for every mistake on the command line: an override naming
  no config key, a value of the wrong type, an unknown flag, a config or ARG that does not exist.
  A config file's own bug (anything but a UserError raised while loading it) keeps its traceback."""
  given, argv = argv, list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      argv[i] = '--config=' + report_user_errors(config_path, arg[len('--config=') :])
    elif arg == '--config' and i + 1 < len(argv):
      argv[i + 1] = report_user_errors(config_path, argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = str(e).encode().decode('unicode_escape')
    key = re.search(r"'([^'\\]+)", message).group(1) if "'" in message else message
    hint = re.search(r'Did you mean "([^"]+)"', message)
    override = next((a for a in argv if a.startswith('--config.') and f'.{key}' in a), key)
    sys.exit(
      f'error: {override}: the config has no key {key!r}'
      + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
      + '; see the config file for the keys it defines'
    )
  except flags.Error as e:
    user_error = _innermost_user_error(e)
    if user_error is not None:
      config = next((a for a in given if a.startswith('--config=')), '--config')
      sys.exit(f'error: {config}: {user_error}')
    if str(e).startswith('flag --config=') and e.__context__ is not None:
      raise  # a bug in the config file: its traceback is in the message
    sys.exit(f'error: {e}')


def report_user_errors(function, *args):
  """`function(*args)`; a UserError it raises ends the process with its one line, exit code 1."""
  try:
    return function(*args)
  except errors.UserError as e:
    sys.exit(f'error: {e}')


def _run_job(argv):
  if len(argv) > 1:
    raise errors.UserError(
      f'unexpected arguments {argv[1:]}: expected only flags (--config=..., '
      '--workdir=..., --config.KEY=VALUE)'
    )
  config = _CONFIG.value
  if config.job not in JOBS:
    raise errors.UserError(
      f'unknown job {config.job!r} in the config: expected one of {sorted(JOBS)}'
    )
  _initialise_distributed()
  logging.info('config:\n%s', config)
  module, function = JOBS[config.job].split(':')
  getattr(importlib.import_module(module), function)(config, _WORKDIR.value)


def main(argv):
  report_user_errors(_run_job, argv)


def run():
  """The console script `mnasnet`: re-executes under tcmalloc (allocator.py), then runs the job."""
  from mnasnet_jax import allocator  # pylint: disable=g-import-not-at-top

  allocator.use_tcmalloc()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
