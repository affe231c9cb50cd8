"""Memory that fits by construction: the micro-batch with which a train step fits a device.

The paper's proxy trains with 4096 images a step, which on one host's chips is 1024 images per chip
on a 4-chip host: XLA's memory analysis of the widest child's train step at that size asks for an
order of magnitude more than a v5e (16 GiB) or v4 (32 GiB) chip holds. The global batch and the
recipe stay the paper's: each device runs its part of the batch as micro-batches whose gradients
add up to the whole batch's (train.train_step), and `fit` picks the largest micro-batch whose
compiled program fits the device's memory, by XLA's own memory analysis of that program.

A child that fits in no way raises `DoesNotFit`, which the search records as status 'oom' rather
than as a failure of the child's training.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any
from typing import Callable
from typing import Sequence

from absl import logging
import jax

from mnasnet_jax import errors

GIB = 2**30


class DoesNotFit(RuntimeError):
  """No micro-batch of the train step fits the device's memory, even with rematerialisation."""


def budget_bytes(device_memory_gib: float | None, device=None) -> int | None:
  """The per-device memory budget: `device_memory_gib` when set, else what the device reports
  (`memory_stats()['bytes_limit']`, as TPU and GPU do), else None: XLA:CPU reports nothing, and
  with no budget nothing is fitted."""
  if device_memory_gib is not None:
    if device_memory_gib <= 0:
      raise errors.UserError(
        f'device_memory_gib = {device_memory_gib}: expected a positive size '
        "in GiB, or None for the device's own"
      )
    return int(device_memory_gib * GIB)
  stats = (device or jax.local_devices()[0]).memory_stats()
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def program_bytes(compiled) -> tuple[int, int]:
  """(bytes, of which temporaries) a compiled program holds on one device by XLA's memory analysis:
  arguments, outputs not aliasing a donated argument, and temporaries."""
  analysis = compiled.memory_analysis()
  temp = analysis.temp_size_in_bytes
  return (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + temp
  ), temp


def _resource_exhausted(error: Exception) -> bool:
  return isinstance(error, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(error)


@contextlib.contextmanager
def out_of_memory_does_not_fit(what: str):
  """Re-raises XLA's RESOURCE_EXHAUSTED (memory the analysis did not foresee, or another program's
  on the device) as DoesNotFit."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if not _resource_exhausted(e):
      raise
    raise DoesNotFit(f'{what} ran out of device memory: {str(e).splitlines()[0]}') from e


@dataclasses.dataclass(frozen=True)
class Fit:
  """The chosen way to run the step: `micro_batch` images at a time, rematerialised or not."""

  micro_batch: int
  remat: bool
  bytes: int  # per device, by XLA's memory analysis
  compiled: Any  # the step compiled so


def fit(
  compile_step: Callable[[int, bool], Any],
  options: Sequence[tuple[int, bool]],
  budget: int | None,
  what: str = 'the train step',
) -> Fit:
  """The first of `options` ((micro_batch, remat), in order of preference) whose compiled
  `compile_step(micro_batch, remat)` fits `budget` bytes per device; the first option unfitted when
  there is no budget.

  Every compile is measured; an option is compiled only if the measurements so far (temporaries
  linear in the micro-batch, through the origin, from the last compile with the same remat setting)
  do not already rule it out. Temporaries hold a part that does not shrink with the micro-batch,
  so the extrapolation to smaller micro-batches errs low and never skips an option that fits; the
  compile verifies it. A compiler whose schedule keeps the recomputed activations alive as long as
  the saved ones (XLA:CPU's does) gains nothing from rematerialising: once a rematerialised compile
  saves under 5% of the memory of the same micro-batch without, the remaining options go without.
  Raises DoesNotFit when none fits.
  """
  if not options:
    raise ValueError(f'no micro-batch to try for {what}')
  measured = {}  # (micro_batch, remat) -> (bytes, temp bytes); None: the compiler refused it
  last = {}  # remat -> the micro-batch of the last measured compile with it
  remat_saves = True
  tried = []
  for micro_batch, remat in options:
    remat = remat and remat_saves
    if (micro_batch, remat) in measured:
      continue
    if budget is not None and remat in last:
      total, temp = measured[last[remat], remat]
      if total - temp + temp * micro_batch / last[remat] > budget:
        continue
    name = f'{micro_batch}{" with remat" if remat else ""}'
    try:
      compiled = compile_step(micro_batch, remat)
    except jax.errors.JaxRuntimeError as e:  # a compiler that checks memory itself
      if not _resource_exhausted(e):
        raise
      measured[micro_batch, remat] = None
      tried.append(f'{name}: compiler out of memory')
      continue
    total, temp = measured[micro_batch, remat] = program_bytes(compiled)
    last[remat] = micro_batch
    if budget is None or total <= budget:
      if budget is not None:
        logging.info(
          '%s fits at micro-batch %s: %.2f GiB of %.2f GiB%s',
          what,
          name,
          total / GIB,
          budget / GIB,
          f' (tried {"; ".join(tried)})' if tried else '',
        )
      return Fit(micro_batch, remat, total, compiled)
    tried.append(f'{name}: {total / GIB:.2f} GiB')
    without = measured.get((micro_batch, False))
    if remat and without and total > 0.95 * without[0]:
      remat_saves = False
      logging.info(
        '%s: rematerialising saves no memory here (%.2f GiB, %.2f without, at '
        'micro-batch %d): going on without',
        what,
        total / GIB,
        without[0] / GIB,
        micro_batch,
      )
  raise DoesNotFit(
    f'{what} fits no micro-batch in {budget / GIB:.2f} GiB per device (tried '
    f'{"; ".join(tried) or "none"}; the others are estimated larger)'
  )
