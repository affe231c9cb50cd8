"""The Colab notebook, executed top to bottom on CPU with tiny settings, so it cannot rot."""

import json
import os

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_runs_end_to_end(tmp_path):
  import papermill
  workdir = tmp_path / 'search'
  executed = tmp_path / 'executed.ipynb'
  papermill.execute_notebook(
      os.path.join(ROOT, 'notebooks', 'colab_tpu.ipynb'), str(executed), cwd=ROOT,
      kernel_name='python3', progress_bar=False,
      parameters=dict(WORKDIR=str(workdir), NUM_CHILDREN=1, CHILDREN_PER_STEP=1, PROXY_STEPS=2,
                      EVAL_EXAMPLES=100, TRAIN_STEPS=2))
  report = json.loads((workdir / 'pareto.json').read_text())
  assert report['children'] == 1 and report['evaluated'] == 1
  assert (workdir / 'pareto.png').stat().st_size > 10_000
  assert (workdir / 'best.tflite').stat().st_size > 100_000
  outputs = ''.join(o.get('text', '') for cell in nbformat.read(executed, as_version=4).cells
                    for o in cell.get('outputs', []))
  assert 'predictions agree on' in outputs and 'test top-1' in outputs
