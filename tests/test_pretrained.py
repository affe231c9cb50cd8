"""timm's and torchvision's MnasNets, built here with random weights and BN statistics, imported
from the files a user downloads (safetensors, .pth) and compared logit for logit; then the jobs
that take an imported file: eval, fine-tuning (train's init_from) and the TFLite export."""

import dataclasses
import json
import os
import pickle

import flax
import jax
import ml_collections
import numpy as np
import pytest

from mnasnet_jax import blocks
from mnasnet_jax import errors
from mnasnet_jax import evaluate
from mnasnet_jax import input_pipeline
from mnasnet_jax import pretrained
from mnasnet_jax import train
from mnasnet_jax.configs import eval as eval_config
from mnasnet_jax.configs import export as export_config
from mnasnet_jax.configs import train as train_config
from mnasnet_jax.latency import export

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')
safetensors_torch = pytest.importorskip('safetensors.torch')

RESOLUTION = 64


def source_model(name, num_classes=1000, seed=0):
  """The PyTorch model `name` with random weights and BN statistics far from 0 and 1, in eval
  mode (pretrained=False: no network)."""
  torch.manual_seed(seed)
  if pretrained.SOURCES[name].library == 'timm':
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
  else:
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
        module.running_mean.normal_(0.0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 1.5, generator=generator)
  return model.eval()


def torch_logits(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def save(model, directory, stem):
  """The model's state dict as a user downloads it: a .safetensors and a .pth file."""
  state = model.state_dict()
  st_path = os.path.join(directory, f'{stem}.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, st_path)
  pth_path = os.path.join(directory, f'{stem}.pth')
  torch.save(state, pth_path)
  return st_path, pth_path


def jax_logits(definition, variables, images):
  model = definition.create(depthwise='native', conv='native', dtype='float32')
  return np.asarray(jax.jit(model.apply)(variables, images))


def relative_error(got, expected):
  return float(np.abs(got - expected).max() / np.abs(expected).max())


IMAGES = np.random.default_rng(0).normal(size=(2, RESOLUTION, RESOLUTION, 3)).astype(np.float32)


# One variant of each library in the fast tier; every variant in the full suite.
FAST_VARIANTS = ('semnasnet_100', 'mnasnet1_0')


@pytest.mark.parametrize(
  'name',
  [
    n if n in FAST_VARIANTS else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(pretrained.SOURCES)
  ],
)
def test_imported_logits_equal_the_source_models(name, tmp_path):
  model = source_model(name)
  expected = torch_logits(model, IMAGES)
  st_path, pth_path = save(model, tmp_path, name)
  found, definition, variables = pretrained.import_file(st_path)  # identified from its tensors
  assert found == name
  assert (definition.padding, definition.bn_epsilon) == ('symmetric', 1e-5)
  _, _, from_pth = pretrained.import_file(pth_path, name)
  jax.tree.map(np.testing.assert_array_equal, variables, from_pth)
  error = relative_error(jax_logits(definition, variables, IMAGES), expected)
  print(f'{name}: max |logit error| / max |logit| = {error:.1e}')
  assert error < 1e-5


@pytest.mark.cpu_only
def test_imported_weights_run_in_the_cpu_forms_too(tmp_path):
  """The forms CPU training runs (compiled depthwise kernel, convs as matrix products, closed-form
  BN) pad as the native ones: an imported model computes its source's logits in them."""
  model = source_model('semnasnet_050')
  definition, variables = pretrained.convert(
    {k: v.numpy() for k, v in model.state_dict().items()}, 'semnasnet_050'
  )
  net = definition.create(depthwise='kernel', conv='matmul', batch_norm='closed_form')
  got = np.asarray(jax.jit(net.apply)(variables, IMAGES))
  assert relative_error(got, torch_logits(model, IMAGES)) < 1e-5


def test_timm_mnasnet_small_first_skip_is_in_its_block_string():
  """timm's mnasnet_small adds an identity skip around its first layer; the official one has none.
  The difference is the block string's input width, under the official skip rule."""
  first = lambda arch: blocks.layers(arch.blocks, arch.stem_filters, 112)[0]
  assert first(pretrained.TIMM_MNASNET_SMALL).residual
  assert not first(pretrained.models.ARCHITECTURES['mnasnet_small']).residual
  assert timm.create_model('mnasnet_small').blocks[0][0].has_skip


@pytest.fixture(scope='module')
def small_state():
  return {k: v.numpy() for k, v in source_model('mnasnet_small').state_dict().items()}


def test_a_mismatched_tensor_is_named_with_its_shape(small_state):
  bad = dict(small_state, **{'blocks.1.0.conv_dw.weight': np.zeros((24, 1, 5, 5), np.float32)})
  with pytest.raises(
    errors.UserError,
    match=r"tensor 'blocks.1.0.conv_dw.weight' has shape \(24, 1, 5, 5\), expected \(24, 1, 3, 3\)",
  ):
    pretrained.convert(bad, 'mnasnet_small')
  missing = {k: v for k, v in small_state.items() if k != 'conv_head.weight'}
  with pytest.raises(errors.UserError, match=r"no tensor 'conv_head.weight' \(expected shape"):
    pretrained.convert(missing, 'mnasnet_small')
  extra = dict(small_state, **{'blocks.9.0.conv_pw.weight': np.zeros((3, 3, 1, 1), np.float32)})
  with pytest.raises(
    errors.UserError, match=r"'blocks.9.0.conv_pw.weight' of shape \(3, 3, 1, 1\)"
  ):
    pretrained.convert(extra, 'mnasnet_small')
  # As another model of the library: the first tensor that differs.
  with pytest.raises(errors.UserError, match=r"tensor 'conv_stem.weight' has shape \(8, 3, 3, 3\)"):
    pretrained.convert(small_state, 'semnasnet_100')
  with pytest.raises(errors.UserError, match="unknown source model 'mnasnet_z9'"):
    pretrained.convert(small_state, 'mnasnet_z9')
  with pytest.raises(errors.UserError, match='neither a timm nor a torchvision MnasNet'):
    pretrained.identify({'fc.weight': np.zeros((2, 2))})


def test_unreadable_files_are_user_errors(tmp_path):
  with pytest.raises(errors.UserError, match='no weights file'):
    pretrained.read_state_dict(str(tmp_path / 'absent.pth'))
  corrupt = tmp_path / 'model.safetensors'
  corrupt.write_bytes(b'not a safetensors file')
  with pytest.raises(errors.UserError, match='not a readable safetensors file'):
    pretrained.read_state_dict(str(corrupt))
  # A pickle that would run code: refused by weights_only, never executed.
  evil = tmp_path / 'evil.pth'
  evil.write_bytes(pickle.dumps(_RunsCode()))
  with pytest.raises(errors.UserError, match='weights_only=True'):
    pretrained.read_state_dict(str(evil))
  assert not (tmp_path / 'ran').exists()
  not_tensors = tmp_path / 'checkpoint.pth'
  torch.save({'epoch': 3, 'conv_stem.weight': torch.zeros(1)}, not_tensors)
  with pytest.raises(errors.UserError, match="entry 'epoch' is not a tensor \\(int\\)"):
    pretrained.read_state_dict(str(not_tensors))
  with pytest.raises(errors.UserError, match='expected a .safetensors or .pth file'):
    (tmp_path / 'model.h5').write_bytes(b'')
    pretrained.read_state_dict(str(tmp_path / 'model.h5'))


class _RunsCode:
  def __reduce__(self):
    return (os.mkdir, ('ran',))


def test_model_def_round_trips_through_json():
  definition = pretrained.SOURCES['mnasnet_small'].model
  assert pretrained.ModelDef.from_json(definition.to_json()) == definition


# --- the jobs -----------------------------------------------------------------------------------


def _data(num_classes=10, image_size=RESOLUTION):
  return ml_collections.ConfigDict(
    dict(
      dataset='synthetic',
      split='full',
      image_size=image_size,
      num_classes=num_classes,
      num_train=64,
      num_eval=24,
      holdout=8,
      split_seed=0,
    )
  )


def test_eval_job_of_an_imported_file_agrees_with_the_source_model(tmp_path, capsys):
  model = source_model('mnasnet0_5', num_classes=10)
  _, pth_path = save(model, tmp_path, 'mnasnet0_5')
  config = eval_config.get_config()
  config.checkpoint = pth_path
  config.data = _data()
  config.eval_batch_size = 16
  config.depthwise, config.conv = 'native', 'native'
  evaluate.run(config, str(tmp_path / 'eval'))
  result = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
  assert 'top-1' in capsys.readouterr().out
  # The same images as the job's, normalised as on its devices, through the PyTorch model.
  data = input_pipeline.create(config.data, 'full')
  images, labels = data.test_x, data.test_y
  logits = torch_logits(model, np.asarray(train.normalise(images, (data.mean, data.std))))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert result['examples'] == len(labels) == 24
  assert result['accuracy'] == pytest.approx(np.mean(top5[:, 0] == labels))
  assert result['top5'] == pytest.approx(np.mean(np.any(top5 == labels[:, None], -1)))


def test_eval_refuses_a_checkpoint_of_other_classes(tmp_path):
  _, pth_path = save(source_model('mnasnet_small'), tmp_path, 'small')
  config = eval_config.get_config()
  config.checkpoint, config.data = pth_path, _data()
  with pytest.raises(errors.UserError, match='classifies 1000 classes.*has 10: fine-tune it first'):
    evaluate.evaluate_checkpoint(config)


def test_export_of_an_imported_file_equals_its_jax_model(tmp_path):
  from ai_edge_litert.interpreter import Interpreter

  st_path, _ = save(source_model('mnasnet_small'), tmp_path, 'small')
  config = export_config.get_config(f'resolution={RESOLUTION}')
  config.checkpoint = st_path
  export.run(config, str(tmp_path / 'export'))
  _, definition, variables = pretrained.import_file(st_path)
  expected = jax_logits(definition, variables, IMAGES[:1])
  interpreter = Interpreter(model_path=str(tmp_path / 'export' / 'model.tflite'), num_threads=1)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]['index'], IMAGES[:1])
  interpreter.invoke()
  got = interpreter.get_tensor(interpreter.get_output_details()[0]['index'])
  assert got.shape == (1, 1000)
  np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_fine_tuning_starts_from_an_imported_file_with_a_new_classifier(tmp_path):
  st_path, _ = save(source_model('mnasnet_small'), tmp_path, 'small')
  config = train_config.get_config('local')
  config.update(
    init_from=st_path,
    data=_data(num_classes=4, image_size=32),
    batch_size=16,
    eval_batch_size=16,
    num_steps=2,
    base_learning_rate=0.0,  # the weights stay the imported ones: comparable after training
    ema_decay=0.0,
    log_every_steps=1,
    eval_every_steps=2,
    checkpoint_every_steps=2,
  )
  workdir = str(tmp_path / 'finetune')
  train.train_and_evaluate(config, workdir)
  saved = pretrained.ModelDef.from_json(open(os.path.join(workdir, train.MODEL_FILE)).read())
  assert saved == pretrained.ModelDef(pretrained.TIMM_MNASNET_SMALL, 1.0, 'symmetric', 1e-5, 4)
  tuned = train.load_checkpoint(workdir)
  assert tuned.model == saved
  _, _, imported = pretrained.import_file(st_path)
  assert tuned.variables['params']['classifier']['kernel'].shape == (1280, 4)
  for name in ('stem', 'layer_3', 'head'):
    jax.tree.map(
      np.testing.assert_array_equal, tuned.variables['params'][name], imported['params'][name]
    )
  # The fine-tuned workdir is itself a checkpoint to start from, its model read from model.json.
  again = dict(init_from=workdir, num_steps=1, eval_every_steps=1)
  config.update(again)
  train.train_and_evaluate(config, str(tmp_path / 'again'))
  assert train.load_checkpoint(str(tmp_path / 'again')).model == saved


def test_a_checkpoint_differs_from_its_model_only_in_a_new_classifier():
  small = pretrained.SOURCES['mnasnet_small'].model
  loaded = export.random_variables(small.create(depthwise='native'), (1, 32, 32, 3))
  ten = dataclasses.replace(small, num_classes=10).create(depthwise='native')
  taken = train.initial_variables(ten, 32, loaded, 'ckpt')
  assert set(flax.traverse_util.flatten_dict(loaded)) - set(taken) == {
    ('params', 'classifier', 'kernel'),
    ('params', 'classifier', 'bias'),
  }
  with pytest.raises(errors.UserError, match=r'ckpt: variable params/classifier/\w+ has shape'):
    train.initial_variables(ten, 32, loaded, 'ckpt', new_classifier=False)
  a1 = pretrained.SOURCES['semnasnet_100'].model.create(depthwise='native')
  with pytest.raises(errors.UserError, match=r'ckpt.* variable \S+ (has shape|of shape)'):
    train.initial_variables(a1, 32, loaded, 'ckpt')


def test_init_from_a_missing_path_is_one_line(tmp_path):
  with pytest.raises(errors.UserError, match="checkpoint '.*absent' does not exist"):
    train.load_checkpoint(str(tmp_path / 'absent'))
