import pytest

from mnasnet_jax import blocks
from mnasnet_jax import errors
from mnasnet_jax import models

OFFICIAL = [b for arch in models.ARCHITECTURES.values() for b in arch.blocks]


@pytest.mark.parametrize('block_string', OFFICIAL)
def test_official_strings_round_trip(block_string):
  assert blocks.encode(blocks.decode(block_string)) == block_string


def test_decode_fields_match_official_meaning():
  b = blocks.decode('r3_k5_s22_e3_i24_o40_se0.25')
  assert (b.repeats, b.kernel, b.stride, b.expand, b.in_filters, b.out_filters) == (
    3,
    5,
    2,
    3,
    24,
    40,
  )
  assert b.se_ratio == 0.25 and b.skip == 'identity' and b.op == 'mbconv'
  assert blocks.decode('r1_k3_s11_e1_i32_o16_noskip').skip == 'none'


@pytest.mark.parametrize(
  'block_string',
  [
    'r2_k3_s22_e1_i16_o24_conv',
    'r2_k5_s11_e6_i16_o24_se0.25_poolskip',
    'r1_k3_s22_e1_i16_o24_se0.25_conv_noskip',
    'r0_k3_s11_e3_i32_o16',
  ],
)
def test_extensions_round_trip(block_string):
  assert blocks.encode(blocks.decode(block_string)) == block_string


@pytest.mark.parametrize(
  'bad, part',
  [
    ('r3_k5_s22_e3_i24', 'missing o'),
    ('r3_k5_s2_e3_i24_o40', "'s2'"),
    ('r3_k5_s12_e3_i24_o40', "'s12'"),
    ('r3_k5_s22_e3_i24_o40_se0', "'se0'"),
    ('r3_k5_s22_e3_i24_o40_se1.5', "'se1.5'"),
    ('r3_k5_s22_e3_i24_o40_se0.2.5', "'se0.2.5'"),
    ('r3_k5_s22_e3_i24_o40_x7', "'x7'"),
    ('r3_k5_s22_e3_i24_o40_noskip5', "'noskip5'"),
    ('r3_k5_s22_e3_i24_o40_noskip_poolskip', "'poolskip'"),
    ('r3_r4_k5_s22_e3_i24_o40', "'r4'"),
    ('r3_k5_s22_e3.5_i24_o40', "'e3.5'"),
    ('r3_k5_s22_e3_i24_o40_', "''"),
    ('r3_k4_s22_e3_i24_o40', 'kernel must be odd'),
    ('r3_k3_s22_e3_i24_o40_conv', 'expected e1'),
    ('r3_k3_s22_e3_i0_o40', 'in_filters'),
    ('R3_k5_s22_e3_i24_o40', "'R3'"),
  ],
)
def test_malformed_strings_name_the_part_and_the_string(bad, part):
  with pytest.raises(errors.UserError) as info:
    blocks.decode(bad)
  assert part in str(info.value) and repr(bad) in str(info.value)


@pytest.mark.parametrize('bad', ['', None, 42])
def test_not_a_string(bad):
  with pytest.raises(errors.UserError, match='expected a block string'):
    blocks.decode(bad)


def test_round_filters_official_rule():
  # int(f*m + 4) // 8 * 8, at least 8, plus 8 when that is below 90% of f*m.
  assert blocks.round_filters(32, 1.0) == 32
  assert blocks.round_filters(32, 0.35) == 16  # 11.2 -> 8 < 10.08 -> 16
  assert blocks.round_filters(16, 0.5) == 8
  assert blocks.round_filters(24, 0.75) == 24  # 18 -> 16 < 16.2 -> 24
  assert blocks.round_filters(112, 1.4) == 160  # 156.8 -> 160
  assert blocks.round_filters(320, 0.35) == 112


def test_layers_follow_official_rules():
  a1 = blocks.layers(models.ARCHITECTURES['mnasnet_a1'].blocks, 32, 112)
  assert len(a1) == 16
  assert [l.residual for l in a1[:4]] == [False, False, True, False]
  assert a1[3].resolution == 56 and a1[3].out_resolution == 28
  se_layer = a1[3]  # first layer of r3_k5_s22_e3_i24_o40_se0.25: SE from the block's input filters.
  assert se_layer.se_filters == 6 and se_layer.hidden_filters == 72
  assert a1[4].se_filters == 10  # later repeats: i = o = 40
  # mnasnet_small quirk: i16 in the string, 8 channels in the tensor; the skip rule reads the string.
  small = blocks.layers(models.ARCHITECTURES['mnasnet_small'].blocks, 8, 112)
  assert small[0].in_filters == 8 and not small[0].residual


def test_pool_skip_shortcut_everywhere():
  specs = blocks.layers(['r2_k3_s22_e6_i16_o24_poolskip'], 16, 32)
  assert all(l.residual for l in specs)
  assert specs[0].projects_shortcut and not specs[1].projects_shortcut


def test_zero_repeats_adds_no_layers():
  assert blocks.layers(['r0_k3_s11_e1_i32_o16', 'r1_k3_s11_e6_i32_o32'], 32, 8)[0].in_filters == 32
