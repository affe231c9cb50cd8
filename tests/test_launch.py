"""The command-line surface: launch/main.py and the TPU VM script, as a user runs them."""

import os
import subprocess
import sys

import pytest

from mnasnet_jax import errors
from mnasnet_jax.configs import common
from mnasnet_jax.configs import search as search_config
from mnasnet_jax.configs import train as train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, cwd=ROOT):
  return subprocess.run(
    args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300
  )


def test_summary_job_prints_official_counts():
  result = run(sys.executable, 'launch/main.py', '--config=configs/models.py')
  assert result.returncode == 0, result.stderr
  assert '3,887,038' in result.stdout and '4,383,312' in result.stdout
  assert '2,030,264' in result.stdout


def test_package_entry_point_takes_a_config_module_from_any_directory(tmp_path):
  result = run(
    sys.executable, '-m', 'mnasnet_jax.main', '--config=mnasnet_jax.configs.models', cwd=tmp_path
  )
  assert result.returncode == 0, result.stderr
  assert '3,887,038' in result.stdout


def test_unknown_config_key_is_one_clear_line():
  result = run(
    sys.executable, 'launch/main.py', '--config=configs/models.py', '--config.resolutoin=32'
  )
  assert result.returncode != 0
  assert "--config.resolutoin=32: the config has no key 'resolutoin'" in result.stderr
  assert 'Traceback' not in result.stderr


LOCAL_SEARCH = ('--config=configs/search.py:local', '--workdir={tmp}/work')


@pytest.mark.parametrize(
  'args, named',
  [
    (
      (
        '--config=configs/train.py:local',
        '--workdir={tmp}/work',
        '--config.arch=r1_k3_s11_e1_i32_o16,r2_k3_sx_e6_i16_o24',
      ),
      "bad part 'sx' in block string 'r2_k3_sx_e6_i16_o24'",
    ),
    (
      LOCAL_SEARCH + ('--config.search.num_children=-3',),
      'config.search.num_children = -3: expected at least 1',
    ),
    (
      LOCAL_SEARCH + ('--config.latency.table={tmp}/missing.json',),
      "config.latency.table = '{tmp}/missing.json': no such file",
    ),
    (
      LOCAL_SEARCH + ('--config.latency.table={tmp}/corrupt.json',),
      'corrupt latency table {tmp}/corrupt.json: not valid JSON',
    ),
    (LOCAL_SEARCH + ('--config.reward.kind=bogus',), "unknown reward kind 'bogus': expected"),
    (
      ('--config=configs/search.py:bogus',),
      "--config=configs/search.py:bogus: unknown config argument 'bogus': expected one of local, "
      'resolution',
    ),
    (
      ('--config=configs/train.py:local,resolution=big',),
      "config argument 'resolution=big': expected a whole number",
    ),
    (('--config=configs/nowhere.py',), '--config=configs/nowhere.py: no config file or module'),
    (('--config=configs/models.py', '--num_processes=two'), '--num_processes=two'),
    (('--config=configs/export.py:local',), 'the export job needs --workdir=DIR'),
    (('--config=configs/eval.py:local',), 'the eval job needs --config.checkpoint'),
    (
      ('--config=configs/eval.py:local', '--config.checkpoint={tmp}/absent.safetensors'),
      "checkpoint '{tmp}/absent.safetensors' does not exist",
    ),
    (
      (
        '--config=configs/train.py:local',
        '--workdir={tmp}/work',
        '--config.init_from={tmp}/corrupt.json',
      ),
      "weights file '{tmp}/corrupt.json': expected a .safetensors or .pth file",
    ),
    (
      ('--config=configs/export.py:local', '--workdir={tmp}/work', '--config.padding=valid'),
      "padding 'valid': expected one of ('same', 'symmetric')",
    ),
    (
      ('--config=configs/profile_latency.py:local', '--workdir={tmp}/work', '--config.repeats=0'),
      'config.repeats = 0: expected a whole number >= 1',
    ),
  ],
)
def test_a_users_mistake_is_one_line_naming_the_value(tmp_path, args, named):
  (tmp_path / 'corrupt.json').write_text('{"format": ')
  args = [a.format(tmp=tmp_path) for a in args]
  result = run(sys.executable, 'launch/main.py', *args)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and named.format(tmp=tmp_path) in last, result.stderr
  assert not (tmp_path / 'work').exists()  # refused before any work


def test_a_bug_keeps_its_traceback(tmp_path):
  # The search job made to divide by zero: not the user's mistake, so the whole traceback shows.
  code = (
    'from mnasnet_jax import main, search; search.run = lambda config, workdir: 1 / 0; main.run()'
  )
  result = run(
    sys.executable, '-c', code, '--config=configs/search.py:local', f'--workdir={tmp_path}'
  )
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'ZeroDivisionError' in result.stderr


def test_config_argument_parsing():
  assert common.parse_arg('local,resolution=64', local=False, resolution=(None, int)).to_dict() == {
    'local': True,
    'resolution': 64,
  }
  assert common.parse_arg('local=false', local=True).local is False
  assert common.parse_arg(None, local=False, resolution=(None, int)).resolution is None
  with pytest.raises(
    errors.UserError, match="unknown config argument 'res': expected one of local, resolution"
  ):
    common.parse_arg('local,res=64', local=False, resolution=(None, int))
  with pytest.raises(errors.UserError, match="'local=maybe': expected true or false"):
    common.parse_arg('local=maybe', local=False)
  with pytest.raises(errors.UserError, match='resolution=0: expected a positive image size'):
    search_config.get_config('local,resolution=0')


def test_resolution_argument_sets_the_image_size_and_the_table():
  config = search_config.get_config('local,resolution=64')
  assert config.data.image_size == 64 and config.data.dataset == 'fashion_mnist'
  assert config.latency.table == 'litert_cpu_64.json'
  assert config.search.train_config == 'configs/train.py:local,resolution=64'
  assert search_config.get_config('local').latency.table == 'litert_cpu_32.json'
  assert search_config.get_config().latency.table == 'litert_cpu_224.json'
  assert train_config.get_config('resolution=192').data.image_size == 192


def tpu(fake, *args, **env):
  script, record = fake
  settings = {
    'GCLOUD': str(script),
    'TPU_NAME': 'nas',
    'ZONE': 'us-central2-b',
    'WORKDIR': '/mnt/gcs/search',
    **env,
  }
  result = run('bash', 'launch/tpu.sh', *args, env=settings)
  assert result.returncode == 0, result.stderr
  return [line.rstrip('|').split('|') for line in record.read_text().splitlines()]


def test_tpu_script_runs_the_same_command_on_every_worker(fake_gcloud):
  calls = tpu(fake_gcloud, 'run', '--config.search.num_children=64')
  (call,) = calls
  assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'nas']
  assert '--worker=all' in call and '--zone=us-central2-b' in call
  command = next(a for a in call if a.startswith('--command='))
  assert (
    'python3 launch/main.py --config=configs/search.py --workdir=/mnt/gcs/search '
    '--config.search.num_children=64'
  ) in command


def test_tpu_script_life_cycle(fake_gcloud):
  calls = tpu(fake_gcloud, 'create', ACCELERATOR_TYPE='v4-32')
  assert calls[0][3:5] == ['create', 'nas'] and '--accelerator-type=v4-32' in calls[0]
  calls = tpu(fake_gcloud, 'logs')
  assert '--worker=0' in calls[-1]
  calls = tpu(fake_gcloud, 'delete')
  assert calls[-1][3:5] == ['delete', 'nas']


def test_tpu_script_refuses_a_url_workdir(fake_gcloud):
  script, _ = fake_gcloud
  result = run(
    'bash',
    'launch/tpu.sh',
    'run',
    env={'GCLOUD': str(script), 'TPU_NAME': 'nas', 'ZONE': 'z', 'WORKDIR': 'gs://bucket/search'},
  )
  assert result.returncode != 0 and 'not a URL' in result.stderr


def test_tpu_script_needs_its_settings():
  result = run('bash', 'launch/tpu.sh', 'create', env={'TPU_NAME': '', 'ZONE': ''})
  assert result.returncode != 0 and 'TPU_NAME' in result.stderr


def test_tpu_script_mounts_the_bucket_with_the_options_orbax_needs(fake_gcloud):
  (call,) = tpu(fake_gcloud, 'mount', BUCKET='my-bucket', MOUNT='/mnt/gcs')
  assert '--worker=all' in call
  command = next(a for a in call if a.startswith('--command='))
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=' in command
  assert 'gcsfuse --implicit-dirs --rename-dir-limit=10000 my-bucket /mnt/gcs; fi' in command
