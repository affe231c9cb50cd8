"""The latency lookup table: every layer profiled once on the device, a model's latency is their sum.

The paper never times a child on the phone during the search; it sums per-layer latencies from a table
profiled once. An entry is keyed by `layer_key`: the fields of a `blocks.Layer` that decide its compute
(op, kernel, stride, expansion, tensor widths, SE width, the shortcut actually added, input resolution),
plus one entry for the stem and one per (head input width, resolution, classes).

    predict(arch) = scale * (stem + sum(layers) + head - (units - 1) * unit_ms)

Each entry was timed as its own interpreter invoke with the core's caches emptied first, as inside a
network (profiler.LiteRTBackend), so it carries the fixed cost of a cold invoke, which a whole network
pays once: `unit_ms` is taken off all but one unit. Unfitted, `unit_ms` is `overhead_ms` (a one-add
model's invoke, measured when profiling) and `scale` is 1; benchmarks/latency_table.py fits both by
relative least squares on whole-model timings of architectures other than those the table is
validated on (a real layer's fixed cost exceeds a one-add model's). The file is JSON:

    {"format": "mnasnet_jax.latency_table", "version": 2, "resolution": 224, "num_classes": 1000,
     "backend": "litert", "device": {...}, "precision": "float32", "versions": {...},
     "date": "...", "timing": {...},
     "calibration": {"overhead_ms": .., "unit_ms": .., "scale": 1.0, "note": ..,
                     "recalibrated": {"device": .., "date": .., ...} (when refitted elsewhere)},
     "entries": {"<key>": {"ms": <timing.statistic>, "min_ms": .., "median_ms": .., "mean_ms": ..,
                           "std_ms": .., "count": .., "params": ..}}}
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Iterable

import numpy as np

from mnasnet_jax import blocks as blocks_lib
from mnasnet_jax import errors
from mnasnet_jax import models

FORMAT = 'mnasnet_jax.latency_table'
VERSION = 2  # 2: entries timed with the caches emptied, calibration (scale, unit_ms)
TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tables')
_REQUIRED = ('resolution', 'num_classes', 'backend', 'device', 'entries')


def shipped_table(name: str) -> str:
  """The path of a table shipped in mnasnet_jax/latency/tables/ (e.g. 'litert_cpu_224.json')."""
  path = os.path.join(TABLES_DIR, name)
  if not os.path.isfile(path):
    available = sorted(f for f in os.listdir(TABLES_DIR) if f.endswith('.json'))
    raise errors.UserError(
      f'no shipped latency table {name!r} in {TABLES_DIR}: expected one of {available}'
    )
  return path


def shortcut_kind(layer: blocks_lib.Layer) -> str:
  """What the skip adds to the compute: nothing, an add, and a pool and/or 1x1 projection first."""
  if not layer.residual:
    return 'none'
  return ''.join(
    ('pool' if layer.stride > 1 else '', 'proj' if layer.projects_shortcut else '', 'add')
  )


def layer_key(layer: blocks_lib.Layer) -> str:
  return (
    f'{layer.op}_k{layer.kernel}_s{layer.stride}_e{layer.expand}_i{layer.in_filters}'
    f'_o{layer.out_filters}_se{layer.se_filters}_{shortcut_kind(layer)}_r{layer.resolution}'
  )


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
  return (
    [stem_key(spec.stem_filters, resolution)]
    + [layer_key(l) for l in layers]
    + [head_key(width, res, num_classes)]
  )


def fit_calibration(sums, units, measured) -> tuple[float, float]:
  """(scale, unit_ms) for which scale * (sums - (units - 1) * unit_ms) best matches `measured`
  whole-model times in relative error (least squares with rows weighted by 1 / time)."""
  sums, units, measured = (np.asarray(x, np.float64) for x in (sums, units, measured))
  design = np.stack([sums, 1 - units], axis=1) / measured[:, None]
  (scale, scaled_unit_ms), *_ = np.linalg.lstsq(design, np.ones_like(measured), rcond=None)
  return float(scale), float(scaled_unit_ms / scale)


def fit_scale(sums, units, measured, unit_ms: float) -> float:
  """The scale for which scale * (sums - (units - 1) * unit_ms) best matches `measured` in
  relative error, `unit_ms` kept: one number, which a handful of noisy timings pin down."""
  sums, units, measured = (np.asarray(x, np.float64) for x in (sums, units, measured))
  ratio = (sums - (units - 1) * unit_ms) / measured
  return float(np.sum(ratio) / np.sum(ratio**2))


def _corrupt(path, what):
  return errors.UserError(f'corrupt latency table {path}: {what}')


class LatencyTable:
  """Per-layer latencies of one device at one resolution and number of classes."""

  def __init__(
    self,
    entries: dict,
    *,
    resolution: int,
    num_classes: int,
    backend: str,
    device: dict,
    path: str | None = None,
    **metadata,
  ):
    self.entries = dict(entries)
    self.resolution = int(resolution)
    self.num_classes = int(num_classes)
    self.backend = backend
    self.device = device
    self.path = path
    self.metadata = metadata
    # 'float32' or 'int8' (every unit quantized as a whole int8 model is; quantize.py).
    self.precision = metadata.get('precision', 'float32')
    calibration = metadata.get('calibration') or {}
    self.overhead_ms = float(calibration.get('overhead_ms', 0.0))
    self.unit_ms = float(calibration.get('unit_ms', self.overhead_ms))
    self.scale = float(calibration.get('scale', 1.0))
    self._ms = {key: float(entry['ms']) for key, entry in self.entries.items()}
    self._params = {key: int(entry.get('params', 0)) for key, entry in self.entries.items()}
    self._blocks = {}  # (block string, input width, resolution) -> (ms, units, width, resolution)
    self._space = None
    self._tokens = {}  # id(space) -> (space, per-block arrays) for predict_tokens
    self._ends_cache = {}  # (stem width, head input width, head resolution) -> ms

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
      raise _corrupt(
        path,
        f'expected version {VERSION}, got {data.get("version")!r}: profile it '
        'again with this version (its timing protocol and calibration changed)',
      )
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
    return {
      'format': FORMAT,
      'version': VERSION,
      'resolution': self.resolution,
      'num_classes': self.num_classes,
      'backend': self.backend,
      'device': self.device,
      **self.metadata,
      'entries': dict(sorted(self.entries.items())),
    }

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
      raise KeyError(
        f'layer {key!r} is not in the latency table {self.path} '
        f'({self.resolution}px, {self.num_classes} classes, {len(self._ms)} entries): '
        'profile it with the profile_latency job'
      ) from None

  def layer_ms(self, layer: blocks_lib.Layer) -> float:
    return self.entry_ms(layer_key(layer))

  def _calibrate(self, total_ms, units):
    return self.scale * (total_ms - (units - 1) * self.unit_ms)

  def sums(self, arch) -> tuple[float, int]:
    """(sum of entries in ms, number of units) of `arch`: the calibration's inputs."""
    units = network_units(arch, self.resolution, self.num_classes)
    return sum(self.entry_ms(k) for k in units), len(units)

  def params(self, arch) -> int:
    """The folded parameters of `arch`, from its entries' counts."""
    return sum(self._params[k] for k in network_units(arch, self.resolution, self.num_classes))

  def predict(self, arch) -> float:
    """Milliseconds of `arch` (a name, block strings, or a models.Architecture) on the device."""
    return float(self._calibrate(*self.sums(arch)))

  def _block(self, block: str, width: int, res: int):
    key = (block, width, res)
    cached = self._blocks.get(key)
    if cached is None:
      layers = blocks_lib.layers([block], width, res)
      cached = (
        sum(self.layer_ms(l) for l in layers),
        len(layers),
        layers[-1].out_filters if layers else width,
        layers[-1].out_resolution if layers else res,
      )
      self._blocks[key] = cached
    return cached

  def _ends(self, stem: int, width: int, res: int) -> float:
    """Milliseconds of the stem and the head together."""
    key = (stem, width, res)
    cached = self._ends_cache.get(key)
    if cached is None:
      cached = self._ends_cache[key] = self.entry_ms(
        stem_key(stem, self.resolution)
      ) + self.entry_ms(head_key(width, res, self.num_classes))
    return cached

  @property
  def space(self):
    """The search space the table was profiled for (recorded in the file), or None."""
    if self._space is None and self.metadata.get('search_space'):
      import ml_collections

      from mnasnet_jax import search_space as search_space_lib

      self._space = search_space_lib.SearchSpace(
        ml_collections.ConfigDict(self.metadata['search_space'])
      )
    return self._space

  def predict_batch(self, archs: Iterable) -> np.ndarray:
    """Milliseconds of many architectures; equal to `predict` on each, cached per block.

    `archs` may also be an integer array of token rows of the table's own search space
    (`self.space`): that path is vectorised (`predict_tokens`), the fastest by far.
    """
    if isinstance(archs, np.ndarray) and archs.dtype.kind in 'iu':
      if self.space is None:
        raise ValueError(
          f'{self.path} records no search space: pass block strings, or tokens to '
          'predict_tokens(space, tokens)'
        )
      return self.predict_tokens(self.space, archs)
    stem_res = blocks_lib.same_output_size(self.resolution, 2)
    default_stem = models.Architecture.stem_filters
    cache = self._blocks
    out = []
    for arch in archs:
      if isinstance(arch, (list, tuple)):
        stem = default_stem
      else:
        spec = models.architecture(arch)
        arch, stem = spec.blocks, spec.stem_filters
      width, res = stem, stem_res
      total, units = 0.0, 2
      for block in arch:
        cached = cache.get((block, width, res))
        if cached is None:
          cached = self._block(block, width, res)
        ms, n, width, res = cached
        total += ms
        units += n
      out.append((total + self._ends(stem, width, res), units))
    totals = np.asarray(out, np.float64).reshape(-1, 2)
    return self._calibrate(totals[:, 0], totals[:, 1])

  def _token_tables(self, space):
    """Per block: its input widths (sorted) and [width, choice] arrays of ms, units, out width."""
    from mnasnet_jax import search_space as search_space_lib

    decisions = search_space_lib.DECISIONS
    tables = []
    widths = {space.stem_filters}
    for b, res in enumerate(space.block_resolutions(self.resolution)):
      if b in space.searched:
        choices = [space.options[d] for d in decisions]
        grid = [dict(zip(decisions, values)) for values in itertools.product(*choices)]
        make = lambda picks, w, b=b: space._searched_block(b, picks, w)  # pylint: disable=protected-access
      else:
        grid = [None]
        make = lambda picks, w, b=b: space.base[b].replace(in_filters=w)
      sorted_widths = np.asarray(sorted(widths))
      values = np.zeros((3, len(sorted_widths), len(grid)))
      for i, w in enumerate(sorted_widths):
        for c, picks in enumerate(grid):
          ms, n, out, _ = self._block(blocks_lib.encode(make(picks, int(w))), int(w), res)
          values[:, i, c] = ms, n, out
      tables.append((b in space.searched, sorted_widths, values))
      widths = {int(w) for w in np.unique(values[2])}
    return tables

  def predict_tokens(self, space, tokens) -> np.ndarray:
    """Milliseconds of the architectures `space.decode(t)` for each row of `tokens` [N, positions],
    vectorised: one gather per block (millions per second). Equal to `predict_batch`."""
    tokens = np.asarray(tokens, np.int64).reshape(-1, len(space.choices))
    if np.any(tokens < 0) or np.any(tokens >= np.asarray(space.choices)):
      raise ValueError(f'tokens out of range: position p takes 0..choices[p]-1, {space.choices}')
    cached = self._tokens.get(id(space))
    if cached is None or cached[0] is not space:
      cached = self._tokens[id(space)] = (space, self._token_tables(space))
    per_block = len(space.choices) // max(len(space.searched), 1)
    widths = np.full(len(tokens), space.stem_filters)
    total, units = np.zeros(len(tokens)), np.full(len(tokens), 2.0)
    k = 0
    for searched, sorted_widths, values in cached[1]:
      if searched:
        block_tokens = tokens[:, k * per_block : (k + 1) * per_block]
        choice = np.ravel_multi_index(
          block_tokens.T, space.choices[k * per_block : (k + 1) * per_block]
        )
        k += 1
      else:
        choice = 0
      row = np.searchsorted(sorted_widths, widths)
      total += values[0, row, choice]
      units += values[1, row, choice]
      widths = values[2, row, choice].astype(np.int64)
    stem_res = blocks_lib.same_output_size(self.resolution, 2)
    final_res = space.block_resolutions(self.resolution)[-1] if space.base else stem_res
    final_res = blocks_lib.same_output_size(final_res, space.base[-1].stride)
    for w in np.unique(widths):
      total[widths == w] += self._ends(space.stem_filters, int(w), final_res)
    return self._calibrate(total, units)

  def __len__(self):
    return len(self._ms)

  def __repr__(self):
    return (
      f'LatencyTable({self.path!r}, {self.resolution}px, {self.num_classes} classes, '
      f'{len(self)} {self.precision} entries, {self.backend} on {self.device.get("name", "?")})'
    )
