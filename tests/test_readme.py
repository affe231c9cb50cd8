"""Every command the README shows, run as a user would run it, made small where it would take long.

The commands are read from the README's bash blocks, so the README cannot drift from what works:
a new command without an entry in SMALL below fails here until it is given one. The set-up commands
(apt-get, pip) and the test command are what .ci/run runs; everything else runs here, in README
order, with its /tmp paths moved into the test's own directory. `gcloud` and `adb` are the stand-ins
of conftest.py.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs every README command: minutes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND = ['python3', '-m', 'pytest', '-q', '-n', '2', 'tests']

# Arguments appended to a command (later flags win) so it runs in seconds; keyed by what it runs.
SMALL = {
  'configs/search.py:local': [
    '--config.search.num_children=1',
    '--config.search.children_per_step=1',
    '--config.proxy.num_steps=2',
    '--config.proxy.eval_examples=100',
    '--config.proxy.bn_recalibration_batches=1',
  ],
  # One searched block (the supernet of the whole space compiles for minutes here).
  'configs/search.py:oneshot_local': [
    '--config.search_space.searched_blocks=(0,)',
    '--config.oneshot.warmup_steps=2',
    '--config.oneshot.train_steps_per_child=1',
    '--config.oneshot.eval_batch_size=64',
    '--config.oneshot.eval_examples=64',
    '--config.search.num_children=2',
    '--config.search.children_per_step=2',
    '--config.oneshot.finalists=1',
    '--config.oneshot.finalist_proxy.num_steps=2',
    '--config.oneshot.finalist_proxy.eval_examples=100',
    '--config.oneshot.finalist_proxy.bn_recalibration_batches=1',
  ],
  'configs/train.py:local': [
    '--config.num_steps=2',
    '--config.eval_every_steps=2',
    '--config.eval_examples=100',
    '--config.checkpoint_every_steps=2',
  ],
  # Two steps at 64 px, BN recalibrated on 2 batches, 20 canvases evaluated, the TFLite detector
  # timed twice.
  'configs/detection.py:local': [
    '--config.resolution=64',
    '--config.num_steps=2',
    '--config.bn_recalibration_batches=2',
    '--config.data.num_eval=20',
    '--config.eval_batch_size=8',
    '--config.picture_images=2',
    '--config.latency.instances=1',
    '--config.latency.repeats=2',
  ],
  # The TFLite detector of a small backbone at 64 px, timed twice.
  'benchmarks/detection_latency.py': [
    '--arch=mnasnet_small',
    '--resolution=64',
    '--num_classes=3',
    '--repeats=2',
    '--instances=1',
  ],
  'configs/export.py:local': [],
  'configs/export.py': [],
  'configs/eval.py:local': ['--config.eval_examples=100'],
  'configs/models.py': [],
  # A phone's table of the fixed MobileNetV2 network alone, at 32 px.
  'configs/profile_latency.py': [
    '--config.resolution=32',
    '--config.num_classes=10',
    '--config.search_space.searched_blocks=()',
    "--config.architectures=('mobilenet_v2',)",
  ],
  # A recalibration on two whole models.
  'configs/profile_latency.py:local': [
    '--config.recalibration.num_random=1',
    "--config.architectures=('mnasnet_small',)",
  ],
  'benchmarks/train_step.py': [
    '--arch=mnasnet_small',
    '--batch=2',
    '--resolution=32',
    '--steps=1',
    '--infer_runs=1',
    '--depthwise=auto',
  ],
  'benchmarks/controller.py': [
    '--samples=64',
    '--seeds=1',
    '--batches=4',
    '--surrogates=neighbours',
    '--uniform_draws=100000',
  ],
  # One architecture, two steps of proxy and of full training (both variants), two seeds of each.
  'benchmarks/proxy_ranking.py': [
    '--num_archs=1',
    '--proxy_seeds=2',
    '--full_seeds=2',
    '--full_variants=train_local,official_init',
    '--full_steps=2',
    '--config.proxy.num_steps=2',
    '--config.proxy.eval_examples=100',
  ],
  # The ImageNet proxy's step on 8 chips before and after a budget that 256 of each chip's 512
  # images fit, the second micro-batch tried: three compiles.
  'benchmarks/memory.py': [
    '--archs=mobilenet_v2',
    '--hosts=8',
    '--resolution=32',
    '--budgets_gib=0.6',
  ],
  'benchmarks/latency_table.py': ['--table=litert_cpu_32.json', '--num_random=2', '--batch=2000'],
  # Two steps of each side, one seed, 100 held-out images.
  'benchmarks/train_parity.py': [
    '--steps=2',
    '--eval_every=2',
    '--seeds=0',
    '--set=eval_examples=100',
    '--torch_threads=1',
  ],
}
# Commands that need ImageNet: without it each must stop at once with the how-to, no traceback.
NEEDS_IMAGENET = ('configs/search.py', 'configs/train.py', 'configs/eval.py')


def hf_download(argv):
  """What `hf download timm/<model>.<tag> FILE --local-dir DIR` leaves, without the network: FILE,
  the safetensors of that timm model built here with random weights."""
  from safetensors.torch import save_file
  import timm

  model = timm.create_model(argv[2].split('/')[1].split('.')[0], pretrained=False)
  directory = argv[argv.index('--local-dir') + 1]
  os.makedirs(directory, exist_ok=True)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(directory, argv[3]))


def readme_blocks():
  """argv of each shell command of each of the README's bash blocks, `&&` chains split, in order."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  blocks = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    commands = []
    for line in block.replace('\\\n', ' ').splitlines():
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      argv = []
      for token in shlex.split(line) + ['&&']:
        if token == '&&':
          commands.append(argv)
          argv = []
        else:
          argv.append(token)
    blocks.append(commands)
  return blocks


def readme_commands():
  return [argv for block in readme_blocks() for argv in block]


def sequences():
  """The README's commands in sequences that run on their own: a command joins the sequence of any
  before it that names a path it names (it may read what that wrote, or see on a TPU VM's mount
  what that did), and a block that sets environment variables stays whole."""
  units = []
  for block in readme_blocks():
    sets_env = any(argv[0] == 'export' for argv in block)
    units += [block] if sets_env else [[argv] for argv in block]
  groups = []
  for unit in units:
    paths = {m for argv in unit for a in argv for m in re.findall(r'/(?:tmp|mnt)/[\w.-]+', a)}
    joined = [g for g in groups if g[1] & paths]
    groups = [g for g in groups if not g[1] & paths]
    commands = [c for g in joined for c in g[0]] + unit
    groups.append((commands, paths.union(*(g[1] for g in joined))))
  return [commands for commands, _ in groups]


def what_it_runs(argv):
  """The SMALL / NEEDS_IMAGENET key of a python command: its config or script."""
  config = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  return config or argv[1]


def test_setup_and_test_commands_are_what_ci_runs():
  ci = open(os.path.join(ROOT, '.ci', 'run')).read()
  ci_commands = [
    shlex.split(l) for l in ci.splitlines() if l.strip() and not l.lstrip().startswith('#')
  ]
  setup = [c for c in readme_commands() if c[0] in ('apt-get', 'pip')]
  assert len(setup) == 4
  for command in setup:
    assert command in ci_commands, f".ci/run does not run the README's {shlex.join(command)!r}"
  assert TEST_COMMAND in readme_commands()
  assert ci_commands[-1] == TEST_COMMAND  # the last thing CI does is the README's test command


def ci_part(argv) -> bool:
  """The set-up and test commands: .ci/run runs them (see above)."""
  return argv[0] in ('apt-get', 'pip') or argv == TEST_COMMAND


SEQUENCES = [seq for seq in sequences() if not all(map(ci_part, seq))]


def test_the_sequences_hold_every_command_once():
  runs = [argv for seq in SEQUENCES for argv in seq]
  others = [argv for argv in readme_commands() if not ci_part(argv)]
  assert sorted(map(shlex.join, runs)) == sorted(map(shlex.join, others))
  assert sum(argv[0] == 'python' for argv in runs) >= 10


@pytest.mark.parametrize(
  'sequence', SEQUENCES, ids=[f'{i}:{shlex.join(seq[0])[:40]}' for i, seq in enumerate(SEQUENCES)]
)
def test_every_readme_command_runs(sequence, tmp_path, fake_adb, fake_gcloud):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  gcloud, gcloud_log = fake_gcloud
  env['PATH'] = f'{gcloud.parent}{os.pathsep}{env["PATH"]}'
  env['GCLOUD'] = str(gcloud)
  for argv in sequence:
    command = shlex.join(argv)
    argv = [a.replace('/tmp/', f'{tmp_path}/') for a in argv]
    if argv[0] == 'export':
      env.update(a.split('=', 1) for a in argv[1:])
      continue
    if argv[:2] == ['hf', 'download']:
      hf_download(argv)
      continue
    if argv[0] == 'python':
      key = what_it_runs(argv)
      if key in NEEDS_IMAGENET:
        argv += [
          f'--config.data.data_dir={tmp_path}/tfds',
          f'--config.data.manual_dir={tmp_path}/m',
        ]
      elif key in SMALL:
        argv += SMALL[key]
      else:
        pytest.fail(f'README command {command!r} has no small form in SMALL')
      argv[0] = sys.executable
    elif argv[0] not in ('launch/tpu.sh', 'gcloud'):
      pytest.fail(f'README command {command!r}: this test does not know how to run it')
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if argv[0] == sys.executable and what_it_runs(argv) in NEEDS_IMAGENET:
      assert result.returncode != 0 and 'imagenet2012' in result.stderr, command
      assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    else:
      assert result.returncode == 0, f'{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}'
  if not any(argv[0] == 'launch/tpu.sh' for argv in sequence):
    return
  # What the README says `tpu.sh run` runs is what the script runs (up to its log redirection).
  calls = [line.rstrip('|').split('|') for line in gcloud_log.read_text().splitlines()]
  run_call = next(c for c in calls if any('nohup' in a for a in c))
  shown = calls[-1]  # the README's gcloud command comes after the script's life cycle
  flags = lambda call: {a for a in call if a.startswith('--') and not a.startswith('--command=')}
  assert shown[:5] == run_call[:5] and flags(shown) == flags(run_call) >= {'--worker=all'}
  shown_command = next(a for a in shown if a.startswith('--command='))
  assert shown_command.split('--config=')[1] in next(
    a for a in run_call if a.startswith('--command=')
  )
