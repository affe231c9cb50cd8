"""SSD's loss, as SSDLite's config in the TF OD API sets it: smooth L1 (Huber, delta 1) on the box
codes of matched anchors, sigmoid cross-entropy over the classes and the background on the matched
anchors and the hardest negatives, at most 3 per positive and at least 3 an image (hard example
mining on the classification loss), the sum divided by the number of matches.

TF's miner first drops near-duplicate anchors (NMS at IoU 0.99 on the predicted boxes) and keeps
3,000 at most; neither changes which negatives are hardest but in ties, and SSDLite at 320 px has
2,034 anchors, so both are left out here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_l1(x, delta: float = 1.0):
  absolute = jnp.abs(x)
  return jnp.where(absolute <= delta, 0.5 * x**2, delta * (absolute - 0.5 * delta))


def hard_negatives(class_loss, positive, ratio: float, minimum: int):
  """[N] mask of one image's negatives with the largest classification loss: the top
  max(minimum, ratio * positives)."""
  wanted = jnp.maximum(minimum, (ratio * jnp.sum(positive)).astype(jnp.int32))
  negative_loss = jnp.where(positive, -jnp.inf, class_loss)
  rank = jnp.argsort(jnp.argsort(-negative_loss))
  return (rank < wanted) & ~positive


def ssd_loss(
  box_codes,
  class_logits,
  target_codes,
  target_classes,
  negatives_per_positive: float = 3.0,
  min_negatives: int = 3,
):
  """{'loss', 'localization', 'classification', 'matches'} of a batch: predictions [B, N, 4] and
  [B, N, C + 1] (column 0 the background), targets [B, N, 4] and [B, N] (boxes.targets)."""
  positive = target_classes > 0
  one_hot = jax.nn.one_hot(target_classes, class_logits.shape[-1])
  class_loss = jnp.sum(optax.sigmoid_binary_cross_entropy(class_logits, one_hot), axis=-1)
  mined = jax.vmap(hard_negatives, (0, 0, None, None))(
    class_loss, positive, negatives_per_positive, min_negatives
  )
  box_loss = jnp.sum(smooth_l1(box_codes - target_codes), axis=-1)
  matches = jnp.sum(positive)
  normaliser = jnp.maximum(matches, 1).astype(jnp.float32)
  localization = jnp.sum(box_loss * positive) / normaliser
  classification = jnp.sum(class_loss * (positive | mined)) / normaliser
  return {
    'loss': localization + classification,
    'localization': localization,
    'classification': classification,
    'matches': matches,
  }
