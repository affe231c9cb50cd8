import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax.cpu import batch_norm

pytestmark = pytest.mark.cpu_only  # the closed-form BatchNorm of mnasnet_jax/cpu/


@pytest.mark.parametrize('axis_name', [None, 'devices'])
def test_equals_flax_batch_norm_in_outputs_statistics_and_gradients(axis_name):
  # Four 'devices' as a vmapped axis: with axis_name the statistics and the gradient's batch
  # means are over all of them, as under shard_map.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 5, 5, 6)) * 3 + 1
  target = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  params = {'scale': jnp.linspace(0.5, 2.0, 6), 'bias': jnp.linspace(-1.0, 1.0, 6)}
  stats = {'mean': jnp.linspace(-0.1, 0.1, 6), 'var': jnp.linspace(0.5, 1.5, 6)}

  def run(module):
    def loss(params, x, target):
      y, updates = module.apply(
        {'params': params, 'batch_stats': stats}, x, mutable=['batch_stats']
      )
      return jnp.sum(jnp.sin(y) * target), (y, updates['batch_stats'])

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.vmap(step, in_axes=(None, 0, 0), axis_name=axis_name)(params, x, target)

  settings = dict(use_running_average=False, momentum=0.9, epsilon=1e-3, axis_name=axis_name)
  (loss_a, aux_a), grads_a = run(nn.BatchNorm(**settings))
  (loss_b, aux_b), grads_b = run(batch_norm.BatchNorm(**settings))
  # The running variance takes the Bessel-corrected batch variance, as TF's fused BN (nn.BatchNorm
  # takes the biased one): n = 2 images x 5 x 5 per device, 4 devices' worth with the axis.
  n = 50 * (4 if axis_name else 1)
  aux_a[1]['var'] = 0.9 * stats['var'] + (aux_a[1]['var'] - 0.9 * stats['var']) * n / (n - 1)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((aux_a, grads_a)), jax.tree.leaves((aux_b, grads_b))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_same_variables_and_inference_as_flax():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
  flax_bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
  ours = batch_norm.BatchNorm(epsilon=1e-3)  # the mode given when called, as models.py does
  variables = flax_bn.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x, use_running_average=True)) == (
    jax.tree.structure(variables)
  )
  variables = jax.tree.map(lambda v: v + 0.3, variables)
  np.testing.assert_allclose(
    ours.apply(variables, x, use_running_average=True), flax_bn.apply(variables, x), rtol=1e-6
  )
