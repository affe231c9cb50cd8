"""The notebook, executed top to bottom on CPU with tiny settings, so it cannot rot."""

import json
import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_notebook_runs_end_to_end_as_on_one_tpu_chip(tmp_path, monkeypatch):
  import papermill

  # As Colab's v5e-1 runs it: one device (the kernel is a new process that inherits this one's
  # environment, JAX_PLATFORMS=cpu included, but not conftest's in-process 8 devices), and the forms
  # 'auto' selects on a TPU.
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  workdir = tmp_path / 'search'
  executed = tmp_path / 'executed.ipynb'
  papermill.execute_notebook(
    os.path.join(ROOT, 'notebooks', 'walkthrough.ipynb'),
    str(executed),
    cwd=ROOT,
    kernel_name='python3',
    progress_bar=False,
    parameters=dict(
      WORKDIR=str(workdir),
      NUM_CHILDREN=1,
      CHILDREN_PER_STEP=1,
      PROXY_STEPS=2,
      EVAL_EXAMPLES=100,
      TRAIN_STEPS=2,
      TEST_EXAMPLES=100,
      DEPTHWISE='native',
      CONV='native',
      DTYPE='bfloat16',
    ),
  )
  report = json.loads((workdir / 'pareto.json').read_text())
  assert report['children'] == 1 and report['evaluated'] == 1
  assert (workdir / 'pareto.png').stat().st_size > 10_000
  assert (workdir / 'best.tflite').stat().st_size > 100_000
  outputs = ''.join(
    o.get('text', '')
    for cell in nbformat.read(executed, as_version=4).cells
    for o in cell.get('outputs', [])
  )
  assert 'on cpu: 1 device(s)' in outputs
  assert 'predictions agree on' in outputs and 'test top-1' in outputs
