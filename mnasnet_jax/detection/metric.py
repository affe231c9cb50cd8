"""COCO's detection metric through pycocotools (the official evaluation code): AP averaged over
IoU 0.5:0.95, AP50, AP75 and AP of small, medium and large objects, from boxes in memory."""

from __future__ import annotations

import contextlib
import io

import numpy as np

NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large')


def _xywh(boxes, height: int, width: int) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) -> COCO's pixel (x, y, width, height)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4) * [height, width, height, width]
  return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=1)


def coco_metrics(images: list[dict], detections: list[dict], num_classes: int) -> dict:
  """{'AP', 'AP50', ...} in [0, 1] (-1 where no object is of that size, as pycocotools says).

  `images[i]`: {'height', 'width', 'boxes' [K, 4] normalised, 'classes' [K] (1..C), and optionally
  'areas' [K] (COCO's segment areas, which set small/medium/large; else the boxes' pixels) and
  'crowd' [K]}; `detections[i]`: nms.detect's output for that image."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  annotations, results = [], []
  for i, (image, found) in enumerate(zip(images, detections)):
    h, w = image['height'], image['width']
    boxes = _xywh(image['boxes'], h, w)
    areas = image.get('areas')
    areas = boxes[:, 2] * boxes[:, 3] if areas is None else np.asarray(areas, np.float64)
    crowd = image.get('crowd')
    crowd = np.zeros(len(boxes), bool) if crowd is None else np.asarray(crowd, bool)
    for box, label, a, c in zip(boxes, image['classes'], areas, crowd):
      annotations.append(
        {
          'id': len(annotations) + 1,
          'image_id': i,
          'category_id': int(label),
          'bbox': box.tolist(),
          'area': float(a),
          'iscrowd': int(c),
        }
      )
    for box, score, label in zip(_xywh(found['boxes'], h, w), found['scores'], found['classes']):
      results.append(
        {'image_id': i, 'category_id': int(label), 'bbox': box.tolist(), 'score': float(score)}
      )
  truth = COCO()
  truth.dataset = {
    'images': [
      {'id': i, 'height': im['height'], 'width': im['width']} for i, im in enumerate(images)
    ],
    'annotations': annotations,
    'categories': [{'id': c} for c in range(1, num_classes + 1)],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    truth.createIndex()
    if not results:
      return {name: 0.0 for name in NAMES}
    evaluation = COCOeval(truth, truth.loadRes(results), 'bbox')
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return {name: float(v) for name, v in zip(NAMES, evaluation.stats[:6])}
