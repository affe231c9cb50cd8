"""Post-processing of SSD's outputs, after the graph (TFLite's models end at boxes and scores):
per-class greedy non-maximum suppression, then the best detections over all classes, as the TF OD
API's `batch_multiclass_non_max_suppression` with SSDLite's settings (score > 1e-8, IoU > 0.6
suppresses, 100 a class, 100 an image)."""

from __future__ import annotations

import numpy as np


def iou_one(box, boxes):
  """IoU of one box [4] with boxes [K, 4] (0 where the union is empty)."""
  top_left = np.maximum(box[:2], boxes[:, :2])
  bottom_right = np.minimum(box[2:], boxes[:, 2:])
  inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
  size = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
  union = size(box) + size(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def non_max_suppression(boxes, scores, iou_threshold: float, max_output: int) -> np.ndarray:
  """Indices of the kept boxes, best first: greedily the best remaining box, whose overlaps above
  `iou_threshold` are dropped."""
  order = np.argsort(-scores, kind='stable')
  keep = []
  while order.size and len(keep) < max_output:
    best, order = order[0], order[1:]
    keep.append(best)
    order = order[iou_one(boxes[best], boxes[order]) <= iou_threshold]
  return np.asarray(keep, np.int64)


def detect(
  boxes,
  scores,
  score_threshold: float = 1e-8,
  iou_threshold: float = 0.6,
  max_per_class: int = 100,
  max_total: int = 100,
) -> dict:
  """One image's detections from its decoded boxes [N, 4] (clipped to the image here) and class
  scores [N, C] (sigmoids, background dropped): {'boxes' [K, 4], 'scores' [K], 'classes' [K]
  (1..C)}, best first."""
  boxes = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0)
  scores = np.asarray(scores, np.float32)
  found = []
  for c in range(scores.shape[1]):
    candidates = np.flatnonzero(scores[:, c] > score_threshold)
    kept = candidates[
      non_max_suppression(boxes[candidates], scores[candidates, c], iou_threshold, max_per_class)
    ]
    found.extend((scores[i, c], i, c + 1) for i in kept)
  found.sort(key=lambda f: -f[0])
  found = found[:max_total]
  return {
    'boxes': boxes[[i for _, i, _ in found]].reshape(-1, 4),
    'scores': np.array([s for s, _, _ in found], np.float32),
    'classes': np.array([c for _, _, c in found], np.int64),
  }
