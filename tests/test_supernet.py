"""The supernet with one child's choices fixed is that child: models.MnasNet on the weights sliced
out of it computes the same logits, in inference (running BN statistics, set at random here so they
count) and in training (batch statistics), for children that differ in every decision."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import models
from mnasnet_jax import search_space
from mnasnet_jax import supernet
from mnasnet_jax.configs import search as search_config


def small_space(**changes):
  """Two searched blocks of the local space's options, at 16 px: every decision, a strided block,
  widths that change, a removable block and one that can grow."""
  space = search_config.get_config('local').search_space
  space.stem_filters = 8
  space.base_blocks = ('r1_k3_s11_e1_i8_o8', 'r2_k3_s22_e6_i8_o16', 'r1_k3_s11_e6_i16_o16')
  space.searched_blocks = (0, 1)
  space.layer_deltas = (-1, 0, 1)
  space.update(changes)
  return search_space.SearchSpace(space)


def children(space):
  """Named children covering each option of each decision, and a few at random."""

  def tokens(conv_op, kernel, se, skip, filters, layers):
    return [conv_op, kernel, se, skip, filters, layers] * 2

  chosen = [
    tokens(3, 1, 1, 1, 2, 2),  # mbconv6, k5, SE, identity skip, x1.25, one layer more
    tokens(0, 0, 1, 0, 0, 1),  # regular conv, k3, SE, pooling skip with projection, x0.75
    tokens(1, 1, 0, 2, 1, 1),  # sepconv, no skip
    tokens(2, 0, 0, 0, 1, 0),  # mbconv3, block 0 removed (block 1 one layer fewer)
  ]
  rng = np.random.default_rng(0)
  chosen.append([int(rng.integers(c)) for c in space.choices])
  return chosen


@pytest.fixture(scope='module')
def supernet_and_variables():
  space = small_space()
  config = search_config.get_config('local').proxy
  net = supernet.create(config, space, num_classes=10).clone(bn_axis_name=None)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  variables = jax.jit(net.init)(jax.random.PRNGKey(0), images, jnp.zeros(len(space.choices), int))
  # Running statistics away from (0, 1), so inference tests them too.
  flat = flax.traverse_util.flatten_dict(variables['batch_stats'])
  keys = jax.random.split(jax.random.PRNGKey(2), len(flat))
  flat = {
    path: jax.random.uniform(key, value.shape, minval=0.5, maxval=1.5)
    if path[-1] == 'var'
    else 0.3 * jax.random.normal(key, value.shape)
    for key, (path, value) in zip(keys, flat.items())
  }
  variables = {**variables, 'batch_stats': flax.traverse_util.unflatten_dict(flat)}
  return space, net, variables, images


def test_children_cover_every_option():
  space = small_space()
  picked = np.array(children(space))[:, :6]
  assert all(len(set(picked[:, d])) == n for d, n in enumerate(space.choices[:6]))


@pytest.mark.slow  # 47 s here at load 5 (the supernet's init and apply, each child's apply)
def test_fixed_choices_compute_the_standalone_child(supernet_and_variables):
  space, net, variables, images = supernet_and_variables

  def apply(module, variables, train, *tokens):
    mutable = ['batch_stats'] if train else False
    out = module.apply(variables, images, *tokens, train=train, mutable=mutable)
    return out[0] if train else out

  # One program for every child: the tokens are data.
  ours = jax.jit(functools.partial(apply, net), static_argnums=1)
  for tokens in children(space):
    model, child_variables = supernet.extract(net, space, variables, tokens)
    assert model.blocks == tuple(space.decode(tokens))
    shapes = models.variable_shapes(model, images.shape)
    assert jax.tree.map(jnp.shape, child_variables) == jax.tree.map(jnp.shape, shapes)
    theirs = jax.jit(functools.partial(apply, model), static_argnums=1)
    for train in (False, True):
      want = theirs(child_variables, train)
      scale = float(jnp.max(jnp.abs(want)))
      assert scale > 0
      got = ours(variables, train, jnp.asarray(tokens, jnp.int32))
      np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=0, err_msg=str(tokens))


@pytest.mark.slow  # the supernet's and each child's gradient programs
def test_fixed_choices_train_as_the_standalone_child(supernet_and_variables):
  """The supernet's gradients, sliced as `extract` slices weights, are the standalone child's, and
  every weight outside the child (the ops not chosen, the channels and kernel ring masked) gets none:
  the shared weights train as the child alone would."""
  space, net, variables, images = supernet_and_variables
  probe = jax.random.normal(jax.random.PRNGKey(3), (images.shape[0], 10))

  def gradients(module, variables, *tokens):
    def loss(params):
      logits, _ = module.apply(
        {**variables, 'params': params}, images, *tokens, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits * probe)

    return jax.grad(loss)(variables['params'])

  ours = jax.jit(functools.partial(gradients, net))
  for tokens in children(space):
    got = ours(variables, jnp.asarray(tokens, jnp.int32))
    sliced = {'params': got, 'batch_stats': variables['batch_stats']}
    model, child_variables = supernet.extract(net, space, sliced, tokens)
    _, child_variables_now = supernet.extract(net, space, variables, tokens)
    want = jax.jit(functools.partial(gradients, model))(child_variables_now)
    flat_got = flax.traverse_util.flatten_dict(child_variables['params'])
    flat_want = flax.traverse_util.flatten_dict(want)
    assert flat_got.keys() == flat_want.keys()
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_want.values())
    for path, g in flat_want.items():
      np.testing.assert_allclose(
        flat_got[path], g, atol=2e-5 * scale, rtol=0, err_msg=f'{tokens} {path}'
      )
    outside = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(got)) - sum(
      float(jnp.sum(jnp.square(g))) for g in flat_got.values()
    )
    assert abs(outside) <= 1e-6 * sum(float(jnp.sum(jnp.square(g))) for g in flat_got.values())
