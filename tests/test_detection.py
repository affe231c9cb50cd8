"""SSDLite: anchors, box coding and matching against values worked by hand, the loss on a case
worked by hand, NMS against a plain implementation, COCO mAP of perfect predictions, and the
detector's size against its variables and XLA's count of its multiply-adds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnasnet_jax import errors
from mnasnet_jax import models
from mnasnet_jax.detection import anchors
from mnasnet_jax.detection import boxes
from mnasnet_jax.detection import loss
from mnasnet_jax.detection import metric
from mnasnet_jax.detection import nms
from mnasnet_jax.detection import ssdlite

# Stem (stride 2) then strides 4, 8, 16 and 32: the last layer goes from stride 16 to 32.
TINY = [
  'r1_k3_s22_e1_i32_o16',
  'r1_k3_s22_e3_i16_o24',
  'r1_k3_s22_e3_i24_o32',
  'r1_k3_s22_e3_i32_o40',
]
SSDLITE_SPECS = anchors.box_specs(6, 0.2, 0.95, (1.0, 2.0, 0.5, 3.0, 1 / 3))


def test_box_specs_by_hand():
  assert SSDLITE_SPECS[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
  scales = [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0]
  for k in range(1, 6):
    assert [r for _, r in SSDLITE_SPECS[k]] == [1.0, 2.0, 0.5, 3.0, 1 / 3, 1.0]
    np.testing.assert_allclose([s for s, _ in SSDLITE_SPECS[k][:5]], scales[k])
    np.testing.assert_allclose(SSDLITE_SPECS[k][5][0], math.sqrt(scales[k] * scales[k + 1]))


def test_anchors_by_hand():
  sizes = ssdlite.feature_sizes(320, 4)
  assert sizes == [20, 10, 5, 3, 2, 1]
  grid = anchors.ssd_anchors(sizes, SSDLITE_SPECS)
  assert grid.shape == (20 * 20 * 3 + (100 + 25 + 9 + 4 + 1) * 6, 4) == (2034, 4)
  # The first cell of the 20 x 20 map, centre 0.025: (0.1, 1), then (0.2, 2): h 0.2/sqrt(2).
  np.testing.assert_allclose(grid[0], [-0.025, -0.025, 0.075, 0.075], atol=1e-7)
  h, w = 0.2 / math.sqrt(2), 0.2 * math.sqrt(2)
  np.testing.assert_allclose(grid[1], [0.025 - h / 2, 0.025 - w / 2, 0.025 + h / 2, 0.025 + w / 2])
  # The second cell of the first row: x moves by 1/20.
  np.testing.assert_allclose(grid[3], grid[0] + [0, 0.05, 0, 0.05], atol=1e-7)
  # The last anchor: the 1x1 map's interpolated box, sqrt(0.95 * 1) square, centred.
  s = math.sqrt(0.95)
  np.testing.assert_allclose(grid[-1], [0.5 - s / 2, 0.5 - s / 2, 0.5 + s / 2, 0.5 + s / 2], 1e-6)


def test_encoding_by_hand_and_decoding():
  anchor = jnp.array([0.0, 0.0, 0.2, 0.2])  # centre (0.1, 0.1), size 0.2 x 0.2
  box = jnp.array([0.05, 0.1, 0.25, 0.5])  # centre (0.15, 0.3), size 0.2 x 0.4
  codes = boxes.encode(box, anchor)
  np.testing.assert_allclose(codes, [2.5, 10.0, 0.0, 5 * math.log(2)], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(boxes.decode(codes, anchor), box, atol=1e-6)
  grid = jnp.asarray(anchors.ssd_anchors([3, 2], SSDLITE_SPECS[:2]))
  random = jax.random.uniform(jax.random.PRNGKey(0), (grid.shape[0], 4), minval=-2, maxval=2)
  np.testing.assert_allclose(boxes.encode(boxes.decode(random, grid), grid), random, atol=1e-4)


def test_iou_by_hand():
  a = jnp.array([[0.0, 0.0, 0.5, 0.5]])
  b = jnp.array([[0.0, 0.0, 0.5, 0.4], [0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 0.7, 0.7]])
  np.testing.assert_allclose(boxes.iou(a, b), [[0.8, 0.0625 / 0.4375, 0.0]], rtol=1e-6)


def test_matching_by_hand():
  grid = jnp.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0.5, 0.5, 1], [0.5, 0, 1, 0.5]])
  objects = jnp.array([[0, 0, 0.5, 0.4], [0.55, 0.55, 0.6, 0.6], [0, 0.5, 0.5, 1]])
  valid = jnp.array([True, True, False])  # the third is padding: it matches nothing
  # IoU 0.8 matches anchor 0; object 1 (IoU 0.01 with anchor 1) is forced onto its best anchor.
  np.testing.assert_array_equal(boxes.match(objects, valid, grid), [0, 1, -1, -1])
  codes, classes = boxes.targets(objects, jnp.array([3, 7, 5]), valid, grid)
  np.testing.assert_array_equal(classes, [3, 7, 0, 0])
  np.testing.assert_allclose(codes[0], boxes.encode(objects[0], grid[0]), atol=1e-6)
  np.testing.assert_array_equal(codes[2:], 0.0)


def softplus(x):
  return math.log1p(math.exp(x))


def test_loss_by_hand():
  # Five anchors, one class: anchor 0 is a match of class 1; 1-4 are negatives.
  logits = jnp.array([[[0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [5.0, -5.0], [0.0, -1.0]]])
  codes = jnp.zeros((1, 5, 4)).at[0, 0].set(jnp.array([2.5, 0.5, 0.0, 0.0]))
  target_codes = jnp.zeros((1, 5, 4)).at[0, 0].set(jnp.array([1.0, 0.0, 0.0, 0.0]))
  target_classes = jnp.array([[1, 0, 0, 0, 0]])
  result = loss.ssd_loss(codes, logits, target_codes, target_classes)
  # Huber: |1.5| -> 1.5 - 0.5; 0.5 -> 0.5 * 0.25.
  np.testing.assert_allclose(result['localization'], 1.0 + 0.125, rtol=1e-6)
  # Sigmoid cross-entropy, a column of target t and logit x: softplus(x) - t x.
  per_anchor = [
    2 * math.log(2),  # positive: both columns at 0
    2 * math.log(2),
    math.log(2) + softplus(2.0),
    2 * softplus(-5.0),  # the easiest negative: the 3 hardest (3 per positive) are mined
    math.log(2) + softplus(-1.0),
  ]
  expected = per_anchor[0] + per_anchor[1] + per_anchor[2] + per_anchor[4]
  np.testing.assert_allclose(result['classification'], expected, rtol=1e-5)
  assert int(result['matches']) == 1
  np.testing.assert_allclose(result['loss'], 1.125 + expected, rtol=1e-5)
  # No match: the 3 hardest negatives (min_negatives), divided by 1.
  none = loss.ssd_loss(codes, logits, target_codes, jnp.zeros((1, 5), jnp.int32))
  np.testing.assert_allclose(
    none['classification'], per_anchor[0] + per_anchor[1] + per_anchor[2], rtol=1e-5
  )
  assert float(none['localization']) == 0.0


def plain_nms(boxes_, scores, iou_threshold, max_per_class, max_total, score_threshold):
  """The textbook loops: per class, take the best box left, drop every box overlapping it."""

  def iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ih * iw
    return ih * iw / union if union > 0 else 0.0

  found = []
  for c in range(scores.shape[1]):
    left = [i for i in range(len(boxes_)) if scores[i, c] > score_threshold]
    kept = []
    while left and len(kept) < max_per_class:
      best = max(left, key=lambda i: (scores[i, c], -i))
      kept.append(best)
      left = [i for i in left if i != best and iou(boxes_[best], boxes_[i]) <= iou_threshold]
    found += [(scores[i, c], i, c + 1) for i in kept]
  found.sort(key=lambda f: -f[0])
  return found[:max_total]


def test_nms_against_plain_loops():
  rng = np.random.default_rng(0)
  centres = rng.uniform(0.1, 0.9, (300, 2))
  sizes = rng.uniform(0.05, 0.3, (300, 2))
  corners = np.clip(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1), 0, 1)
  scores = rng.uniform(0, 1, (300, 4)).astype(np.float32)
  scores[:, 3] = 0  # a class nobody scored
  got = nms.detect(corners, scores, 0.05, 0.6, 20, 50)
  want = plain_nms(corners.astype(np.float32), scores, 0.6, 20, 50, 0.05)
  assert len(want) == 50
  np.testing.assert_array_equal(got['classes'], [c for _, _, c in want])
  np.testing.assert_array_equal(got['scores'], [s for s, _, _ in want])
  np.testing.assert_allclose(got['boxes'], corners[[i for _, i, _ in want]], rtol=1e-6)


def test_map_is_one_on_perfect_predictions_and_less_otherwise():
  rng = np.random.default_rng(1)
  images, perfect, shifted = [], [], []
  for _ in range(6):
    n = int(rng.integers(1, 5))
    centres, sizes = rng.uniform(0.3, 0.7, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))
    b = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    classes = rng.integers(1, 4, n)
    images.append({'height': 200, 'width': 300, 'boxes': b, 'classes': classes})
    perfect.append({'boxes': b, 'scores': rng.uniform(0.5, 1, n), 'classes': classes})
    shifted.append({**perfect[-1], 'boxes': b + [0, 0.6 * sizes[0, 1], 0, 0.6 * sizes[0, 1]]})
  result = metric.coco_metrics(images, perfect, 3)
  for name in ('AP', 'AP50', 'AP75'):
    assert result[name] == pytest.approx(1.0)
  assert metric.coco_metrics(images, shifted, 3)['AP'] < 0.5


def test_stride32_layer_and_its_absence():
  specs = models.create('mnasnet_a1').layer_specs(320)
  i = ssdlite.stride32_layer(specs)
  assert specs[i].hidden_filters == 672 and specs[i].resolution == 20
  specs = models.create('mobilenet_v2').layer_specs(320)
  assert specs[ssdlite.stride32_layer(specs)].hidden_filters == 576  # layer_15/expansion_output
  with pytest.raises(errors.UserError, match='stride 16 to 32'):
    ssdlite.stride32_layer(models.create(TINY[:3]).layer_specs(64))


def test_paper_sizes():
  # MnasNet paper Table 3: MnasNet-A1 + SSDLite 4.9M parameters, 0.8B multiply-adds at 320 px.
  a1 = ssdlite.summary('mnasnet_a1', 320, 90)
  assert round(a1['params'] / 1e6, 1) == 4.9 and round(a1['macs'] / 1e9, 1) == 0.8
  assert a1['anchors'] == 2034
  # MobileNetV2 paper Table 6: 4.3M, 0.8B; with COCO's 90 ids 4.5M, with its 80 classes 4.3M.
  v2 = ssdlite.summary('mobilenet_v2', 320, 90)
  assert round(v2['params'] / 1e6, 1) == 4.5 and round(v2['macs'] / 1e9, 1) == 0.8
  assert round(ssdlite.summary('mobilenet_v2', 320, 80)['params'] / 1e6, 1) == 4.3


def tiny_detector(num_classes=3, **kwargs):
  backbone = models.create(TINY, feature_maps=True, depthwise='native', dtype='float32', **kwargs)
  return ssdlite.SSDLite(backbone, num_classes, extra_depths=(64, 32, 32, 16))


def test_detector_outputs_variables_and_counts():
  model = tiny_detector()
  x = jnp.zeros((2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  codes, logits = jax.jit(model.apply)(variables, x)
  sizes = ssdlite.feature_sizes(64, 4)
  assert sizes == [4, 2, 1, 1, 1, 1]
  n = anchors.ssd_anchors(sizes, SSDLITE_SPECS).shape[0]
  assert codes.shape == (2, n, 4) and logits.shape == (2, n, 4)
  # The class logits start at the prior's bias (-4.6: p = 0.01), the box codes at 0 on zeros.
  assert 'classifier' not in variables['params']['backbone']
  summary = ssdlite.summary(TINY, 64, 3, extra_depths=(64, 32, 32, 16))
  assert summary['params'] == models.count_params(variables['params'])
  cost = jax.jit(model.apply).lower(variables, x[:1]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # XLA also counts BN, ReLU6 and the additions of the biases, a few percent on top.
  assert summary['macs'] <= cost['flops'] / 2 <= 1.1 * summary['macs']
