import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mnasnet_jax import bn_groups
from mnasnet_jax import platform
from mnasnet_jax.cpu import batch_norm as closed_form

FORMS = {'autodiff': bn_groups.BatchNorm, 'closed_form': closed_form.BatchNorm}
MOMENTUM, EPSILON = 0.9, 1e-3
C = 3


def test_grouping_tiles_any_batch_and_device_count():
  layout = bn_groups.grouping
  # The official recipe's 128 images per statistic on a 4-chip host at 1024 images per chip...
  assert layout(1024, 4, 128) == bn_groups.Grouping(1024, 8, 1, 4)
  # ... and on micro-batches of fewer than 128: groups across 2 and 4 devices.
  assert layout(64, 4, 128).devices_per_group == 2 and layout(32, 4, 128).images == 128
  # 16 images on each of 4 devices cannot make 128: the largest group there is, 64.
  assert layout(16, 4, 128) == bn_groups.Grouping(16, 1, 4, 4) and layout(16, 4, 128).images == 64
  # No group size, or a batch smaller than a group: the whole global batch.
  assert layout(8, 8, None) == layout(8, 8, 128) == bn_groups.Grouping(8, 1, 8, 8)
  assert layout(96, 1, 64).images == 48  # the nearest smaller groups that tile the batch
  with pytest.raises(ValueError, match='bn_group_size = 0'):
    layout(8, 1, 0)


def _by_hand(x, group):
  """Per-group normalisation of the global batch `x` in numpy, and the running averages (mean over
  groups; Bessel-corrected variance) after one update from mean 0, variance 1."""
  groups = x.reshape((-1, group) + x.shape[1:]).astype(np.float64)
  mean = groups.mean((1, 2, 3), keepdims=True)
  var = groups.var((1, 2, 3), keepdims=True)
  scale, bias = np.linspace(0.5, 2.0, C), np.linspace(-1.0, 1.0, C)
  y = ((groups - mean) / np.sqrt(var + EPSILON) * scale + bias).reshape(x.shape)
  count = group * x.shape[1] * x.shape[2]
  corrected = groups.reshape(len(groups), -1, C).var(1, ddof=1)
  assert np.allclose(corrected, var.reshape(-1, C) * count / (count - 1))
  running = {
    'mean': (1 - MOMENTUM) * mean.reshape(-1, C).mean(0),
    'var': MOMENTUM + (1 - MOMENTUM) * corrected.mean(0),
  }
  return y, running


def _reference_gradients(x, target, group):
  """Gradients of sum(sin(y) * target) through per-group normalisation written plainly."""

  def loss(params, x):
    groups = x.reshape((-1, group) + x.shape[1:])
    mean = jnp.mean(groups, (1, 2, 3), keepdims=True)
    var = jnp.var(groups, (1, 2, 3), keepdims=True)
    y = (groups - mean) * lax.rsqrt(var + EPSILON) * params['scale'] + params['bias']
    return jnp.sum(jnp.sin(y.reshape(x.shape)) * target)

  return jax.grad(loss, argnums=(0, 1))(_params(), x)


def _params():
  return {'scale': jnp.linspace(0.5, 2.0, C), 'bias': jnp.linspace(-1.0, 1.0, C)}


def _data(n):
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 4, C)) * 3 + 1
  return x, jax.random.normal(jax.random.PRNGKey(1), x.shape)


def _run(module, x, target, devices: int):
  """Outputs, running averages (one row per device), parameter and input gradients of
  sum(sin(y) * target) with `x` split over `devices` devices."""
  stats = {'mean': jnp.zeros(C), 'var': jnp.ones(C)}

  def step(params, x, target):
    def loss(params, x):
      y, updates = module.apply(
        {'params': params, 'batch_stats': stats}, x, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(y) * target), (y, updates['batch_stats'])

    (_, (y, running)), (grad_params, grad_x) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True
    )(params, x)
    return (
      y,
      jax.tree.map(lambda s: s[None], running),
      lax.psum(grad_params, platform.BATCH_AXIS),
      grad_x,
    )

  mesh = platform.data_mesh(jax.devices()[:devices])
  split = P(platform.BATCH_AXIS)
  return jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), split, split),
      out_specs=(split, split, P(), split),
      check_vma=False,
    )
  )(_params(), x, target)


@pytest.mark.parametrize('form', sorted(FORMS))
@pytest.mark.parametrize(
  'devices, group',
  [(1, 4), (2, 4), (8, 4), (8, 64), (8, None)],
  ids=[
    '4_groups_in_1_device',
    '2_groups_per_device',
    'groups_across_2_devices',
    'whole_batch',
    'none',
  ],
)
def test_group_statistics_equal_hand_computed_ones(form, devices, group):
  # 16 images: within one device, 2 per device on 8 devices (a group of 4 spans 2 of them).
  x, target = _data(16)
  module = FORMS[form](
    use_running_average=False,
    momentum=MOMENTUM,
    epsilon=EPSILON,
    axis_name=platform.BATCH_AXIS,
    group_size=group,
  )
  y, running, grad_params, grad_x = _run(module, x, target, devices)
  expected_y, expected_running = _by_hand(np.asarray(x), min(group or 16, 16))
  np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-4)
  for name, value in expected_running.items():  # every device keeps the same running averages
    np.testing.assert_allclose(
      running[name], np.broadcast_to(value, (devices, C)), rtol=1e-5, atol=1e-6
    )
  expected_params, expected_x = _reference_gradients(x, target, min(group or 16, 16))
  np.testing.assert_allclose(grad_x, expected_x, rtol=1e-4, atol=1e-4)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(grad_params[name], expected_params[name], rtol=1e-4, atol=1e-4)


def test_running_variance_is_bessel_corrected():
  # TF's fused BatchNorm keeps n / (n - 1) times the variance it normalises with.
  x = jnp.asarray([[[[1.0]]], [[[3.0]]]])  # two pixels: biased variance 1, corrected 2
  module = bn_groups.BatchNorm(use_running_average=False, momentum=0.0)
  variables = module.init(jax.random.PRNGKey(0), x)
  y, updates = module.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(updates['batch_stats']['var'], [2.0])
  np.testing.assert_allclose(y.ravel(), np.array([-1.0, 1.0]) / np.sqrt(1 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize('form', sorted(FORMS))
def test_inference_uses_the_running_averages(form):
  x, _ = _data(4)
  module = FORMS[form](use_running_average=True, epsilon=EPSILON, group_size=2)
  variables = {
    'params': _params(),
    'batch_stats': {'mean': jnp.full(C, 0.5), 'var': jnp.full(C, 2.0)},
  }
  expected = (x - 0.5) / np.sqrt(2.0 + EPSILON) * _params()['scale'] + _params()['bias']
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_forms_share_variables_with_flax():
  x, _ = _data(2)
  structure = jax.tree.structure(
    nn.BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x)
  )
  for module in FORMS.values():
    assert (
      jax.tree.structure(module(use_running_average=True).init(jax.random.PRNGKey(0), x))
      == structure
    )
