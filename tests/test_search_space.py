import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import blocks
from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax import search_space
from mnasnet_jax.configs.search import get_config


@pytest.fixture(scope='module')
def space():
  return search_space.SearchSpace(get_config().search_space)


def random_tokens(space, rng, n):
  return [[int(rng.integers(c)) for c in space.choices] for _ in range(n)]


def test_default_space_is_the_papers(space):
  assert space.size == 432**7
  assert space.choices == (4, 2, 2, 3, 3, 3) * 7
  assert space.stem_filters == 32


def test_mobilenet_v2_tokens_by_hand(space):
  # sepconv, k3, no SE, identity, x1.0, +0; block 0's x0.75 also rounds to 16, so it encodes as 0.
  first = [1, 0, 0, 1, 0, 1]
  rest = [3, 0, 0, 1, 1, 1]
  second = [3, 0, 0, 1, 0, 1]  # 24 x 0.75 = 18 rounds up to 24 (never 10% down)
  tokens = first + second + rest * 5
  mobilenet_v2 = list(models.ARCHITECTURES['mobilenet_v2'].blocks)
  assert space.encode(mobilenet_v2) == tokens
  assert space.decode(tokens) == mobilenet_v2


def test_decoding_by_hand(space):
  # Block 0: regular conv, k5, SE, pool skip, x1.25, -1 layers: removed, so block 1 gets the stem.
  # Block 6: mbconv3, k3, no SE, no skip, x0.75, +1 layers.
  tokens = [0, 1, 1, 0, 2, 0] + [3, 0, 0, 1, 1, 1] * 5 + [2, 0, 0, 2, 0, 2]
  assert space.decode(tokens) == [
    'r0_k5_s11_e1_i32_o24_se0.25_conv_poolskip',
    'r2_k3_s22_e6_i32_o24',
    'r3_k3_s22_e6_i24_o32',
    'r4_k3_s22_e6_i32_o64',
    'r3_k3_s11_e6_i64_o96',
    'r3_k3_s22_e6_i96_o160',
    'r2_k3_s11_e3_i160_o240_noskip',
  ]


def test_round_trips_over_random_tokens(space):
  rng = np.random.default_rng(0)
  filters = [p for p in range(len(space.choices)) if p % 6 == 4]
  for tokens in random_tokens(space, rng, 200):
    strings = space.decode(tokens)
    back = space.encode(strings)
    assert space.decode(back) == strings
    # Only width rounding (two multipliers, one width) or a removed block's moot choices differ.
    for p, (a, b) in enumerate(zip(tokens, back)):
      if a != b:
        assert p in filters, (p, tokens, back)
    # Every block's `i` is the width of the tensor reaching it.
    width = space.stem_filters
    for s in strings:
      block = blocks.decode(s)
      assert block.in_filters == width
      width = block.out_filters if block.repeats else width


@pytest.mark.parametrize(
  'tokens, message',
  [
    ([0] * 41, 'expected 42 tokens'),
    ([0] * 43, 'expected 42 tokens'),
    (
      [0] * 6 + [4] + [0] * 35,
      r'token 4 at position 6 \(block 1, conv_op\): expected an integer in 0..3',
    ),
    ([0] * 41 + [3], r'position 41 \(block 6, layers\)'),
    ([0] * 10 + [-1] + [0] * 31, 'position 10'),
    ([0] * 5 + [1.5] + [0] * 36, 'position 5'),
    ([0] * 5 + ['x'] + [0] * 36, 'position 5'),
  ],
)
def test_bad_tokens(space, tokens, message):
  with pytest.raises(ValueError, match=message):
    space.decode(tokens)


def test_strings_outside_the_space(space):
  with pytest.raises(ValueError, match='expected 7 block strings'):
    space.encode(['r1_k3_s11_e1_i32_o16'])
  with pytest.raises(ValueError, match=r'block 4 .*filters 112'):
    space.encode(list(models.ARCHITECTURES['mnasnet_a1'].blocks))
  inconsistent = list(models.ARCHITECTURES['mobilenet_v2'].blocks)
  inconsistent[2] = 'r3_k3_s22_e6_i40_o32'
  with pytest.raises(ValueError, match='block 2 .* incoming width'):
    space.encode(inconsistent)


def test_widened_space_needs_only_config():
  config = get_config().search_space
  config.kernels = (3, 5, 7)
  config.conv_ops = ('conv', 'sepconv', 'mbconv3', 'mbconv4', 'mbconv6')
  config.filter_multipliers = (0.5, 0.75, 1.0, 1.25, 1.5)
  space = search_space.SearchSpace(config)
  assert space.size == (5 * 3 * 2 * 3 * 5 * 3) ** 7
  tokens = [1, 2, 1, 2, 3, 1] + [3, 2, 1, 1, 3, 1] * 6  # block 0: sepconv k7 SE none x1.25
  strings = space.decode(tokens)
  assert strings[0] == 'r1_k7_s11_e1_i32_o24_se0.25_noskip'
  assert strings[1] == 'r2_k7_s22_e4_i24_o32_se0.25'
  assert space.encode(strings) == tokens
  tokens[4] = 4  # x1.5 of 16 also rounds to 24
  assert space.decode(tokens)[0] == strings[0]


def test_largest_child(space):
  # mbconv6, k5, SE, identity, x1.25, +1 layer in every block: MobileNetV2's table at its widest.
  assert space.largest() == [3, 1, 1, 1, 2, 2] * 7
  assert space.decode(space.largest())[6] == 'r2_k5_s11_e6_i200_o400_se0.25'
  config = get_config().search_space
  config.conv_ops = ('mbconv3', 'conv', 'sepconv')  # an expansion above the regular conv
  config.skip_ops = ('none', 'pool')  # a residual above none
  config.kernels, config.layer_deltas = (7, 3, 5), (1, -1, 0)
  assert search_space.SearchSpace(config).largest()[:6] == [0, 0, 1, 1, 2, 0]
  config.conv_ops = ('conv', 'sepconv')  # sepconv's stack (mbconv, expansion 1) above the conv
  assert search_space.SearchSpace(config).largest()[0] == 1


def test_fixed_blocks_keep_base_strings_with_consistent_widths():
  config = get_config().search_space
  config.searched_blocks = (1, 5)
  space = search_space.SearchSpace(config)
  assert space.choices == (4, 2, 2, 3, 3, 3) * 2
  strings = space.decode([3, 1, 1, 1, 2, 2] + [0, 0, 0, 0, 0, 0])
  assert strings == [
    'r1_k3_s11_e1_i32_o16',
    'r3_k5_s22_e6_i16_o32_se0.25',
    'r3_k3_s22_e6_i32_o32',
    'r4_k3_s22_e6_i32_o64',
    'r3_k3_s11_e6_i64_o96',
    'r2_k3_s22_e1_i96_o120_conv_poolskip',
    'r1_k3_s11_e6_i120_o320',
  ]


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('layer_deltas', (-2, 0, 1), r'block 0 \(r1_k3_s11_e1_i32_o16\) could have -1 layers'),
    ('conv_ops', ('conv', 'mbconv'), "unknown conv op 'mbconv'"),
    ('skip_ops', ('pool', 'residual'), "unknown skip op 'residual'"),
    ('kernels', (3, 4), 'kernel 4'),
    ('searched_blocks', (0, 7), 'searched block 7'),
  ],
)
def test_bad_configs(field, value, message):
  config = get_config().search_space
  config[field] = value
  with pytest.raises(errors.UserError, match=message):
    search_space.SearchSpace(config)


def test_distinct_layers_and_head_widths_cover_decoded_networks(space):
  resolution = 32
  layers = space.distinct_layers(resolution)
  heads = space.head_input_widths()
  assert heads == {120, 160, 200, 240, 320, 400}
  rng = np.random.default_rng(1)
  for tokens in random_tokens(space, rng, 100):
    arch = space.decode(tokens)
    specs = models.create(arch).layer_specs(resolution)
    assert set(specs) <= layers
    assert specs[-1].out_filters in heads
  # Removing block 6 (x0.75 ... x1.25 of 160 at block 5) is what lets 120..200 reach the head.
  candidates = space.block_candidates(6)
  assert {b.in_filters for b in candidates} == {120, 160, 200}
  assert {b.repeats for b in candidates} == {0, 1, 2}
  assert len(candidates) == 432 * 3


def test_decoded_networks_build_and_match_summary(space):
  rng = np.random.default_rng(2)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for tokens in random_tokens(space, rng, 2):
    arch = space.decode(tokens)
    model = models.create(arch, num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert (
      models.count_params(shapes['params'])
      == models.summary(arch, resolution=32, num_classes=10)['params']
    )


def test_a_strided_block_may_not_be_removed():
  config = get_config().search_space
  config.searched_blocks = (1, 2, 3, 4, 5)  # block 1 is r2 with stride 2
  config.layer_deltas = (-2, 0)
  with pytest.raises(ValueError, match=r'block 1 \(r2_k3_s22_e6_i16_o24\) could have 0 layers'):
    search_space.SearchSpace(config)
  config.searched_blocks = (4, 5, 6)
  config.layer_deltas = (-3, 0)  # block 5 (r3, stride 2) could reach 0
  with pytest.raises(ValueError, match=r'block 5 .* could have 0 layers'):
    search_space.SearchSpace(config)
  config.searched_blocks = (4,)  # r3 with stride 1: removable
  space = search_space.SearchSpace(config)
  strings = space.decode([3, 0, 0, 1, 1, 0])
  assert strings[4:] == ['r0_k3_s11_e6_i64_o96', 'r3_k3_s22_e6_i64_o160', 'r1_k3_s11_e6_i160_o320']
  assert models.summary(strings, resolution=32)['layers'] == 1 + 2 + 3 + 4 + 3 + 1
