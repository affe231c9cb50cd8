"""SSD's anchors (Liu et al. 2016, section 2.2), as the TF Object Detection API's
`multiple_grid_anchor_generator.create_ssd_anchors` makes them for SSDLite.

Layer k of K has scale s_k = min + (max - min) k / (K - 1) and a box per aspect ratio r
(height s_k / sqrt(r), width s_k sqrt(r)), plus one of ratio 1 at sqrt(s_k s_{k+1}) (s_K = 1). The
lowest layer has 3 boxes only: (0.1, 1), (s_0, 2), (s_0, 1/2). A layer's boxes sit at the centres
of its grid's cells, (i + 0.5) / size. Boxes are (ymin, xmin, ymax, xmax), normalised to the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def box_specs(
  num_layers: int,
  min_scale: float,
  max_scale: float,
  aspect_ratios: Sequence[float],
  interpolated_scale_aspect_ratio: float = 1.0,
  reduce_boxes_in_lowest_layer: bool = True,
) -> list[list[tuple[float, float]]]:
  """Per layer, its (scale, aspect ratio) pairs."""
  scales = [
    min_scale + (max_scale - min_scale) * i / max(num_layers - 1, 1) for i in range(num_layers)
  ] + [1.0]
  specs = []
  for layer in range(num_layers):
    scale, following = scales[layer], scales[layer + 1]
    if layer == 0 and reduce_boxes_in_lowest_layer:
      specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
      continue
    layer_specs = [(scale, r) for r in aspect_ratios]
    if interpolated_scale_aspect_ratio > 0:
      layer_specs.append((math.sqrt(scale * following), interpolated_scale_aspect_ratio))
    specs.append(layer_specs)
  return specs


def grid_anchors(size: int, specs: Sequence[tuple[float, float]]) -> np.ndarray:
  """[size * size * len(specs), 4] corner boxes of one square feature map, ordered (row, column,
  box) as the predictors' outputs are reshaped."""
  scales, ratios = np.array(specs, np.float64).T
  heights, widths = scales / np.sqrt(ratios), scales * np.sqrt(ratios)
  centres = (np.arange(size) + 0.5) / size
  y, x = np.meshgrid(centres, centres, indexing='ij')
  y, x = y[..., None], x[..., None]
  boxes = np.stack([y - heights / 2, x - widths / 2, y + heights / 2, x + widths / 2], axis=-1)
  return boxes.reshape(-1, 4).astype(np.float32)


def ssd_anchors(feature_sizes: Sequence[int], specs) -> np.ndarray:
  """All anchors [N, 4], the feature maps' in order."""
  if len(feature_sizes) != len(specs):
    raise ValueError(f'{len(feature_sizes)} feature maps for {len(specs)} layers of anchors')
  return np.concatenate([grid_anchors(s, layer) for s, layer in zip(feature_sizes, specs)])
