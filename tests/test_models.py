import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import cpu
from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import platform

# Official counts (tensorflow/tpu mnasnet_models.py); B1 at other multipliers are torchvision's mnasnet0_5,
# mnasnet0_75 and mnasnet1_3; MobileNetV2 1.0 is torchvision's mobilenet_v2.
EXACT = {
  ('mnasnet_a1', 1.0): 3_887_038,
  ('mnasnet_b1', 1.0): 4_383_312,
  ('mnasnet_small', 1.0): 2_030_264,
  ('mnasnet_b1', 0.5): 2_218_512,
  ('mnasnet_b1', 0.75): 3_170_208,
  ('mnasnet_b1', 1.3): 6_282_256,
  ('mobilenet_v2', 1.0): 3_504_872,
}
# The paper's A1 with depth multipliers, in millions rounded to 0.1 (the paper's model-scaling results, section 6).
PAPER_A1_MILLIONS = {1.4: 6.1, 1.0: 3.9, 0.75: 2.9, 0.5: 2.1, 0.35: 1.7}
MULTIPLIERS = (0.35, 0.5, 0.75, 1.0, 1.4)
# A network with each kind of layer (expansion, SE, BN, dropout) for tests of the model's mechanics.
TINY = ['r1_k3_s11_e1_i32_o16', 'r1_k5_s22_e6_i16_o24_se0.25']


@pytest.mark.parametrize('arch, multiplier', sorted(EXACT))
def test_exact_official_counts(arch, multiplier):
  assert models.summary(arch, multiplier)['params'] == EXACT[arch, multiplier]


@pytest.mark.parametrize('multiplier', sorted(PAPER_A1_MILLIONS))
def test_paper_a1_multiplier_sizes(multiplier):
  params = models.summary('mnasnet_a1', multiplier)['params']
  assert round(params / 1e6, 1) == PAPER_A1_MILLIONS[multiplier]


@pytest.mark.parametrize('arch', sorted(models.ARCHITECTURES))
@pytest.mark.parametrize('multiplier', MULTIPLIERS)
def test_analytic_count_equals_flax_parameters(arch, multiplier):
  model = models.create(arch, depth_multiplier=multiplier, depthwise='native')
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert models.count_params(variables['params']) == models.summary(arch, multiplier)['params']


def test_paper_macs():
  assert round(models.summary('mnasnet_a1')['macs'] / 1e6, 1) == 311.6
  assert round(models.summary('mnasnet_b1')['macs'] / 1e6, 1) == 314.4
  assert round(models.summary('mnasnet_small')['macs'] / 1e6) == 68


@pytest.mark.parametrize(
  'arch', [pytest.param('mnasnet_a1', marks=pytest.mark.slow), 'mnasnet_small']
)
def test_macs_against_xla_cost_analysis(arch):
  model = models.create(arch, depthwise='native', dtype='float32')
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  cost = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_macs = cost['flops'] / 2
  macs = models.summary(arch)['macs']
  # XLA also counts BN, ReLU, pooling and SE's elementwise work, a few percent on top of the convs.
  assert macs <= xla_macs <= 1.07 * macs


def test_output_shapes_and_dtypes():
  model = models.create(TINY, num_classes=10)
  # The variables do not depend on the resolution: one init serves both.
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  for size in (224, 32):
    x = jnp.ones((2, size, size, 3))
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  assert set(variables) == {'params', 'batch_stats'}


def test_bfloat16_compute_float32_params():
  model = models.create(TINY, num_classes=10, dtype='bfloat16')
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  reference = models.create(TINY, num_classes=10, dtype='float32')
  np.testing.assert_allclose(
    jax.jit(model.apply)(variables, x), jax.jit(reference.apply)(variables, x), atol=0.1
  )


def test_train_mode_updates_batch_stats_and_uses_dropout():
  model = models.create(TINY, num_classes=10, dropout_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  run = jax.jit(
    lambda seed: model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(seed)}
    )
  )
  (a, stats), (b, _) = run(0), run(1)
  assert not np.allclose(a, b)
  moved = jax.tree_util.tree_map(
    lambda u, v: np.abs(u - v).max(), stats['batch_stats'], variables['batch_stats']
  )
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_search_space_extensions_build():
  arch = [
    'r1_k3_s11_e1_i32_o16',
    'r2_k5_s22_e1_i16_o24_se0.25_conv',
    'r2_k3_s22_e3_i24_o40_poolskip',
    'r0_k3_s11_e6_i40_o40',
    'r1_k3_s11_e6_i40_o48_poolskip',
  ]
  model = models.create(arch, num_classes=10)
  x = jnp.ones((1, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert jax.jit(model.apply)(variables, x).shape == (1, 10)
  assert (
    models.count_params(variables['params'])
    == models.summary(arch, resolution=64, num_classes=10)['params']
  )


def test_bad_architecture_names():
  with pytest.raises(ValueError, match="unknown architecture 'mnasnet_z9'"):
    models.create('mnasnet_z9')
  with pytest.raises(ValueError, match='bad part'):
    models.create(['r1_k3_s11_e1_i32_o16', 'r1_kx_s11_e1_i16_o16'])


def _outputs_and_gradients(fn, *args):
  """fn's output and the gradients of a non-linear scalar of it, both jitted."""
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))
  return jax.jit(fn)(*args), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize('padding', ['same', 'symmetric'])
@pytest.mark.parametrize('form', ['shifted', 'kernel'])
@pytest.mark.parametrize('kernel, stride, size', [(3, 1, 9), (3, 2, 8), (5, 2, 11), (7, 1, 4)])
@pytest.mark.cpu_only
def test_depthwise_forms_agree_in_outputs_and_gradients(form, kernel, stride, size, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, size, size, 6))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, 6))
  expected, expected_grads = _outputs_and_gradients(
    lambda x, w: models.depthwise_native(x, w, stride, padding), x, w
  )
  out, grads = _outputs_and_gradients(
    lambda x, w: models.DEPTHWISE[form](x, w, stride, padding), x, w
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, expected_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('padding', ['same', 'symmetric'])
@pytest.mark.parametrize('kernel, stride, size', [(1, 1, 5), (3, 2, 9), (3, 2, 8), (5, 1, 6)])
@pytest.mark.cpu_only
def test_conv_forms_agree_in_outputs_and_gradients(kernel, stride, size, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 7))
  expected, expected_grads = _outputs_and_gradients(
    lambda x, w: models.conv_native(x, w, stride, padding), x, w
  )
  out, grads = _outputs_and_gradients(
    lambda x, w: models.CONV['matmul'](x, w, stride, padding), x, w
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, expected_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_only
def test_depthwise_kernel_is_used_on_cpu_and_checks_its_dtype():
  # The CPU default builds the C++ kernels (the README's set-up installs g++).
  assert models.create('mnasnet_small', dtype='float32').depthwise == 'kernel'
  assert models.create('mnasnet_small', dtype='bfloat16').depthwise == 'shifted'
  x = jnp.zeros((1, 4, 4, 2), jnp.bfloat16)
  with pytest.raises(ValueError, match='take float32, got bfloat16'):
    models.DEPTHWISE['kernel'](x, jnp.zeros((3, 3, 1, 2), jnp.bfloat16), 1, 'same')


@pytest.mark.cpu_only
def test_cpu_forms_agree_with_native_in_whole_model():
  # Stem, kernels 3/5/7, strides 1/2, SE, expansion, a k x k conv op and BN in training mode:
  # every path a conv and a BN take in a model.
  arch = [
    'r1_k3_s11_e1_i32_o16',
    'r2_k5_s22_e6_i16_o24_se0.25',
    'r1_k7_s22_e3_i24_o32',
    'r1_k3_s22_e1_i32_o40_conv',
  ]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = None

  def loss_and_grad(depthwise, conv, batch_norm):
    nonlocal variables
    model = models.create(
      arch, num_classes=10, depthwise=depthwise, conv=conv, batch_norm=batch_norm
    )
    variables = variables or jax.jit(model.init)(jax.random.PRNGKey(0), x)

    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params},
        x,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.PRNGKey(1)},
      )
      return jnp.mean(logits**2)

    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  loss_a, grads_a = loss_and_grad('native', 'native', 'autodiff')
  leaves_a = jax.tree_util.tree_leaves(grads_a)
  # Some leaves are zero but for rounding (a BN's offset before another BN): compare them on the
  # scale of the largest gradient.
  scale = max(np.abs(a).max() for a in leaves_a)
  for depthwise in ('shifted', 'kernel'):
    loss_b, grads_b = loss_and_grad(depthwise, 'matmul', 'closed_form')
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for a, b in zip(leaves_a, jax.tree_util.tree_leaves(grads_b)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.cpu_only
def test_depthwise_kernel_build_failure_is_reported(tmp_path, monkeypatch):
  monkeypatch.setenv('MNASNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # a "compiler" that always fails
  with pytest.raises(RuntimeError, match='depthwise_kernel.cc failed'):
    cpu.depthwise_kernel._build()
  assert os.listdir(tmp_path) == []  # no half-written library left to load later


def test_platform_picks_the_forms_by_backend_and_refuses_cpu_only_ones_elsewhere():
  assert [platform.conv_form(backend=b) for b in ('cpu', 'tpu')] == ['matmul', 'native']
  assert [platform.batch_norm_form(backend=b) for b in ('cpu', 'tpu')] == [
    'closed_form',
    'autodiff',
  ]
  assert platform.depthwise_form(backend='gpu') == 'native'
  # Forms in XLA alone run anywhere when set; the C++ custom call only on CPU.
  assert platform.depthwise_form('shifted', backend='tpu') == 'shifted'
  assert platform.conv_form('matmul', backend='tpu') == 'matmul'
  assert platform.depthwise_form('kernel', backend='cpu') == 'kernel'
  with pytest.raises(
    errors.UserError,
    match=r"depthwise form 'kernel' is an XLA:CPU custom "
    r'call and this run is on tpu: expected \"auto\" or one of '
    r"\('native', 'shifted'\)",
  ):
    platform.depthwise_form('kernel', backend='tpu')
  with pytest.raises(errors.UserError, match="batch_norm form must be .* got 'folded'"):
    platform.batch_norm_form('folded')


def test_padding_is_a_model_choice_and_a_bad_one_is_refused():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  outputs = {}
  for padding in ('same', 'symmetric'):
    model = models.create(TINY, num_classes=4, padding=padding, depthwise='native')
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    outputs[padding] = jax.jit(model.apply)(variables, x)
  assert not np.allclose(outputs['same'], outputs['symmetric'])  # stride 2 on even sizes differs
  with pytest.raises(errors.UserError, match="padding 'valid': expected one of"):
    models.create('mnasnet_small', padding='valid')
