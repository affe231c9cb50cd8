"""The latency lookup table: every layer profiled once on the device, a model's latency is their sum.

The paper never times a child on the phone during the search; it sums per-layer latencies from a table
profiled once. An entry is keyed by `layer_key`: the fields of a `blocks.Layer` that decide its compute
(op, kernel, stride, expansion, tensor widths, SE width, the shortcut actually added, input resolution),
plus one entry for the stem and one per (head input width, resolution, classes).

    predict(arch) = scale * (stem + sum(layers) + head - (units - 1) * overhead_ms) + offset_ms

Each entry was timed as its own interpreter invoke, so it carries one invoke's fixed cost, while a
whole model pays it once: `overhead_ms` (an empty model's invoke, measured when profiling) is taken
off all but one unit. `scale` and `offset_ms` are a linear correction fitted on whole-model timings of
architectures other than those the table is validated on (benchmarks/latency_table.py); 1 and 0
when not fitted. The file is JSON:

    {"format": "mnasnet_jax.latency_table", "version": 1, "resolution": 224, "num_classes": 1000,
     "backend": "litert", "device": {...}, "versions": {...}, "date": "...", "timing": {...},
     "calibration": {"overhead_ms": 0.01, "scale": 1.0, "offset_ms": 0.0, ...},
     "entries": {"<key>": {"ms": median, "mean_ms": .., "std_ms": .., "count": ..}, ...}}
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import models

FORMAT = 'mnasnet_jax.latency_table'
VERSION = 1
TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tables')
_REQUIRED = ('resolution', 'num_classes', 'backend', 'device', 'entries')


def shipped_table(name: str) -> str:
  """The path of a table shipped in mnasnet_jax/latency/tables/ (e.g. 'litert_cpu_224.json')."""
  path = os.path.join(TABLES_DIR, name)
  if not os.path.isfile(path):
    available = sorted(f for f in os.listdir(TABLES_DIR) if f.endswith('.json'))
    raise FileNotFoundError(f'no shipped latency table {name!r} in {TABLES_DIR}: expected one of '
                            f'{available}')
  return path


def shortcut_kind(layer: blocks_lib.Layer) -> str:
  """What the skip adds to the compute: nothing, an add, and a pool and/or 1x1 projection first."""
  if not layer.residual:
    return 'none'
  return ''.join(('pool' if layer.stride > 1 else '', 'proj' if layer.projects_shortcut else '',
                  'add'))


def layer_key(layer: blocks_lib.Layer) -> str:
  return (f'{layer.op}_k{layer.kernel}_s{layer.stride}_e{layer.expand}_i{layer.in_filters}'
          f'_o{layer.out_filters}_se{layer.se_filters}_{shortcut_kind(layer)}_r{layer.resolution}')


def stem_key(filters: int, resolution: int) -> str:
  return f'stem_o{filters}_r{resolution}'


def head_key(in_filters: int, resolution: int, num_classes: int) -> str:
  """The head at `resolution` (its input's): 1x1 conv to 1280, ReLU, global mean, classifier."""
  return f'head_i{in_filters}_r{resolution}_c{num_classes}'


def network_units(arch, resolution: int, num_classes: int) -> list[str]:
  """The table keys a whole network is made of, stem first and head last."""
  spec = models.architecture(arch)
  stem_res = blocks_lib.same_output_size(resolution, 2)
  layers = blocks_lib.layers(spec.blocks, spec.stem_filters, stem_res)
  width = layers[-1].out_filters if layers else spec.stem_filters
  res = layers[-1].out_resolution if layers else stem_res
  return ([stem_key(spec.stem_filters, resolution)] + [layer_key(l) for l in layers]
          + [head_key(width, res, num_classes)])


def _corrupt(path, what):
  return ValueError(f'corrupt latency table {path}: {what}')


class LatencyTable:
  """Per-layer latencies of one device at one resolution and number of classes."""

  def __init__(self, entries: dict, *, resolution: int, num_classes: int, backend: str,
               device: dict, path: str | None = None, **metadata):
    self.entries = dict(entries)
    self.resolution = int(resolution)
    self.num_classes = int(num_classes)
    self.backend = backend
    self.device = device
    self.path = path
    self.metadata = metadata
    calibration = metadata.get('calibration') or {}
    self.overhead_ms = float(calibration.get('overhead_ms', 0.0))
    self.scale = float(calibration.get('scale', 1.0))
    self.offset_ms = float(calibration.get('offset_ms', 0.0))
    self._ms = {key: float(entry['ms']) for key, entry in self.entries.items()}
    self._blocks = {}  # (block string, input width, resolution) -> (ms, units, width, resolution)

  # --- files ---------------------------------------------------------------------------------

  @classmethod
  def load(cls, path) -> LatencyTable:
    """Loads a table file; a bare name that is not a file names a shipped table."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.basename(path) == path:
      path = shipped_table(path)
    try:
      with open(path) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise _corrupt(path, f'not valid JSON ({e})') from None
    if not isinstance(data, dict) or data.get('format') != FORMAT:
      raise _corrupt(path, f'expected a JSON object with "format": "{FORMAT}"')
    if data.get('version') != VERSION:
      raise _corrupt(path, f'expected version {VERSION}, got {data.get("version")!r}')
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
      raise _corrupt(path, f'missing field(s) {", ".join(missing)}')
    entries = data.pop('entries')
    if not isinstance(entries, dict) or not entries:
      raise _corrupt(path, '"entries" must be a non-empty object of key -> {"ms": ...}')
    for key, entry in entries.items():
      ms = entry.get('ms') if isinstance(entry, dict) else None
      if not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0:
        raise _corrupt(path, f'entry {key!r} needs a finite "ms" >= 0, got {entry!r}')
    for field in ('format', 'version'):
      data.pop(field)
    data.pop('path', None)
    return cls(entries, path=path, **data)

  def to_json(self) -> dict:
    return {'format': FORMAT, 'version': VERSION, 'resolution': self.resolution,
            'num_classes': self.num_classes, 'backend': self.backend, 'device': self.device,
            **self.metadata, 'entries': dict(sorted(self.entries.items()))}

  def save(self, path) -> str:
    path = os.fspath(path)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.to_json(), f, indent=1)
      f.write('\n')
    os.replace(tmp, path)
    self.path = path
    return path

  # --- prediction ------------------------------------------------------------------------------

  def entry_ms(self, key: str) -> float:
    try:
      return self._ms[key]
    except KeyError:
      raise KeyError(f'layer {key!r} is not in the latency table {self.path} '
                     f'({self.resolution}px, {self.num_classes} classes, {len(self._ms)} entries): '
                     'profile it with the profile_latency job') from None

  def layer_ms(self, layer: blocks_lib.Layer) -> float:
    return self.entry_ms(layer_key(layer))

  def _calibrate(self, total_ms, units):
    return self.scale * (total_ms - (units - 1) * self.overhead_ms) + self.offset_ms

  def predict(self, arch) -> float:
    """Milliseconds of `arch` (a name, block strings, or a models.Architecture) on the device."""
    units = network_units(arch, self.resolution, self.num_classes)
    return float(self._calibrate(sum(self.entry_ms(k) for k in units), len(units)))

  def _block(self, block: str, width: int, res: int):
    key = (block, width, res)
    cached = self._blocks.get(key)
    if cached is None:
      layers = blocks_lib.layers([block], width, res)
      ms = sum(self.layer_ms(l) for l in layers)
      cached = (ms, len(layers), layers[-1].out_filters if layers else width,
                layers[-1].out_resolution if layers else res)
      self._blocks[key] = cached
    return cached

  def predict_batch(self, archs: Iterable) -> np.ndarray:
    """Milliseconds of many architectures; equal to `predict` on each, cached per block."""
    stem_res = blocks_lib.same_output_size(self.resolution, 2)
    out = []
    for arch in archs:
      if isinstance(arch, str) or not isinstance(arch, Sequence):
        spec = models.architecture(arch)
        arch, stem = spec.blocks, spec.stem_filters
      else:
        stem = models.Architecture.stem_filters
      width, res = stem, stem_res
      total = self.entry_ms(stem_key(stem, self.resolution))
      units = 2
      for block in arch:
        ms, n, width, res = self._block(block, width, res)
        total += ms
        units += n
      total += self.entry_ms(head_key(width, res, self.num_classes))
      out.append(self._calibrate(total, units))
    return np.asarray(out, np.float64)

  def __len__(self):
    return len(self._ms)

  def __repr__(self):
    return (f'LatencyTable({self.path!r}, {self.resolution}px, {self.num_classes} classes, '
            f'{len(self)} entries, {self.backend} on {self.device.get("name", "?")})')
