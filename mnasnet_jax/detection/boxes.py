"""Boxes: IoU, the Faster R-CNN box coding SSD uses, and argmax matching of anchors to objects.

Boxes are (ymin, xmin, ymax, xmax). The coding (TF OD API's `faster_rcnn_box_coder`, scales
10, 10, 5, 5 in SSDLite) of a box against an anchor of centre (ya, xa) and size (ha, wa) is
(10 (y - ya) / ha, 10 (x - xa) / wa, 5 log(h / ha), 5 log(w / wa)). Matching (`argmax_matcher`,
thresholds 0.5, forced matches for each object): an anchor takes the object it overlaps most when
their IoU is >= 0.5, and every object also takes the anchor it overlaps most. Written in jax.numpy
for one image (vmap makes a batch's), so the train step computes its targets on the device.
"""

from __future__ import annotations

import jax.numpy as jnp

SCALES = (10.0, 10.0, 5.0, 5.0)
EPSILON = 1e-8  # TF's box coder keeps sizes and logarithms finite with it


def area(boxes):
  return jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) * jnp.maximum(
    boxes[..., 3] - boxes[..., 1], 0
  )


def iou(a, b):
  """[N, M] intersection over union of boxes a [N, 4] and b [M, 4] (0 where both are empty)."""
  top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = jnp.prod(jnp.maximum(bottom_right - top_left, 0), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)


def centre_size(boxes):
  """(ycentre, xcentre, height, width) of corner boxes."""
  h, w = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + h / 2, boxes[..., 1] + w / 2, h, w


def encode(boxes, anchors, scales=SCALES):
  """[..., 4] codes of `boxes` against `anchors` (same leading shape)."""
  y, x, h, w = centre_size(boxes)
  ya, xa, ha, wa = centre_size(anchors)
  ha, wa, h, w = ha + EPSILON, wa + EPSILON, h + EPSILON, w + EPSILON
  sy, sx, sh, sw = scales
  return jnp.stack(
    [sy * (y - ya) / ha, sx * (x - xa) / wa, sh * jnp.log(h / ha), sw * jnp.log(w / wa)], -1
  )


def decode(codes, anchors, scales=SCALES):
  """The boxes whose codes against `anchors` are `codes`: encode's inverse."""
  ya, xa, ha, wa = centre_size(anchors)
  sy, sx, sh, sw = scales
  y, x = codes[..., 0] / sy * ha + ya, codes[..., 1] / sx * wa + xa
  h, w = jnp.exp(codes[..., 2] / sh) * ha, jnp.exp(codes[..., 3] / sw) * wa
  return jnp.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], -1)


def match(objects, valid, anchors, threshold: float = 0.5):
  """[N] index of the object each anchor is matched to, -1 for none (a negative).

  `objects` [M, 4] are padded; `valid` [M] marks the real ones. As TF's ArgMaxMatcher with
  matched = unmatched threshold and force_match_for_each_row: each real object's best anchor is
  its match even below the threshold (the lowest-numbered object wins an anchor two pick)."""
  overlaps = jnp.where(valid[:, None], iou(objects, anchors), -1.0)  # [M, N]
  best_object = jnp.argmax(overlaps, axis=0)
  matches = jnp.where(jnp.max(overlaps, axis=0) >= threshold, best_object, -1)
  best_anchor = jnp.argmax(overlaps, axis=1)  # [M]
  forced = (best_anchor[:, None] == jnp.arange(anchors.shape[0])[None, :]) & valid[:, None]
  return jnp.where(jnp.any(forced, axis=0), jnp.argmax(forced, axis=0), matches)


def targets(objects, labels, valid, anchors, threshold: float = 0.5, scales=SCALES):
  """(box codes [N, 4], classes [N] with 0 the background) for one image's padded objects
  (`labels` 1..C)."""
  matches = match(objects, valid, anchors, threshold)
  matched = matches >= 0
  index = jnp.maximum(matches, 0)
  codes = encode(objects[index], anchors, scales)
  return jnp.where(matched[:, None], codes, 0.0), jnp.where(matched, labels[index], 0)
