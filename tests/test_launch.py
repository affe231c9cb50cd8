"""The command-line surface: launch/main.py and the TPU VM script, as a user runs them."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, cwd=ROOT):
  return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                        text=True, timeout=300)


def test_summary_job_prints_official_counts():
  result = run(sys.executable, 'launch/main.py', '--config=configs/models.py')
  assert result.returncode == 0, result.stderr
  assert '3,887,038' in result.stdout and '4,383,312' in result.stdout
  assert '2,030,264' in result.stdout


def test_unknown_config_key_is_one_clear_line():
  result = run(sys.executable, 'launch/main.py', '--config=configs/models.py',
               '--config.resolutoin=32')
  assert result.returncode != 0
  assert "--config.resolutoin=32: the config has no key 'resolutoin'" in result.stderr
  assert 'Traceback' not in result.stderr


def tpu(fake, *args, **env):
  script, record = fake
  settings = {'GCLOUD': str(script), 'TPU_NAME': 'nas', 'ZONE': 'us-central2-b',
              'WORKDIR': '/mnt/gcs/search', **env}
  result = run('bash', 'launch/tpu.sh', *args, env=settings)
  assert result.returncode == 0, result.stderr
  return [line.rstrip('|').split('|') for line in record.read_text().splitlines()]


def test_tpu_script_runs_the_same_command_on_every_worker(fake_gcloud):
  calls = tpu(fake_gcloud, 'run', '--config.search.num_children=64')
  (call,) = calls
  assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'nas']
  assert '--worker=all' in call and '--zone=us-central2-b' in call
  command = next(a for a in call if a.startswith('--command='))
  assert ('python3 launch/main.py --config=configs/search.py --workdir=/mnt/gcs/search '
          '--config.search.num_children=64') in command


def test_tpu_script_life_cycle(fake_gcloud):
  calls = tpu(fake_gcloud, 'create', ACCELERATOR_TYPE='v4-32')
  assert calls[0][3:5] == ['create', 'nas'] and '--accelerator-type=v4-32' in calls[0]
  calls = tpu(fake_gcloud, 'logs')
  assert '--worker=0' in calls[-1]
  calls = tpu(fake_gcloud, 'delete')
  assert calls[-1][3:5] == ['delete', 'nas']


def test_tpu_script_refuses_a_url_workdir(fake_gcloud):
  script, _ = fake_gcloud
  result = run('bash', 'launch/tpu.sh', 'run', env={'GCLOUD': str(script), 'TPU_NAME': 'nas',
                                                     'ZONE': 'z', 'WORKDIR': 'gs://bucket/search'})
  assert result.returncode != 0 and 'not a URL' in result.stderr


def test_tpu_script_needs_its_settings():
  result = run('bash', 'launch/tpu.sh', 'create', env={'TPU_NAME': '', 'ZONE': ''})
  assert result.returncode != 0 and 'TPU_NAME' in result.stderr
