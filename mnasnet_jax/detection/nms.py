"""Post-processing of SSD's outputs, after the graph (TFLite's models end at boxes and scores):
per-class greedy non-maximum suppression, then the best detections over all classes, as the TF OD
API's `batch_multiclass_non_max_suppression` with SSDLite's settings (score > 1e-8, IoU > 0.6
suppresses, 100 a class, 100 an image)."""

from __future__ import annotations

import heapq

import numpy as np


def non_max_suppression(
  boxes, scores, iou_threshold: float, max_output: int, floor: float = -np.inf
) -> np.ndarray:
  """Indices of the kept boxes, best first: greedily the best remaining box, whose overlaps above
  `iou_threshold` are dropped; it stops at `max_output` kept or at a score below `floor`."""
  order = np.argsort(-scores, kind='stable')
  y0, x0, y1, x1 = (np.ascontiguousarray(boxes[order, i]) for i in range(4))
  area = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
  alive = np.ones(len(order), bool)
  keep = []
  for i in range(len(order)):
    if len(keep) == max_output or scores[order[i]] < floor:
      break
    if not alive[i]:
      continue
    keep.append(order[i])
    rest = slice(i + 1, None)
    ih = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
    iw = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
    inter = ih * iw
    union = area[i] + area[rest] - inter
    overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
    alive[rest] &= overlap <= iou_threshold
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
  (1..C)}, best first. A class's suppression stops below the `max_total`-th best score kept so
  far: nothing under it can be among the image's best."""
  boxes = np.clip(np.asarray(boxes, np.float32), 0.0, 1.0)
  scores = np.asarray(scores, np.float32)
  found, best = [], []  # best: a min-heap of the max_total highest scores kept
  for c in range(scores.shape[1]):
    candidates = np.flatnonzero(scores[:, c] > score_threshold)
    floor = best[0] if len(best) == max_total else -np.inf
    kept = candidates[
      non_max_suppression(
        boxes[candidates], scores[candidates, c], iou_threshold, max_per_class, floor
      )
    ]
    for i in kept:
      found.append((scores[i, c], i, c + 1))
      if len(best) < max_total:
        heapq.heappush(best, scores[i, c])
      else:
        heapq.heappushpop(best, scores[i, c])
  found.sort(key=lambda f: -f[0])
  found = found[:max_total]
  return {
    'boxes': boxes[[i for _, i, _ in found]].reshape(-1, 4),
    'scores': np.array([s for s, _, _ in found], np.float32),
    'classes': np.array([c for _, _, c in found], np.int64),
  }
