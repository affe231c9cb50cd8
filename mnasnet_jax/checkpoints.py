"""Orbax checkpoints as every job writes them: `<workdir>/checkpoints`, each array by one device.

Orbax writes a replicated array "replica-parallel" by default: every device holding a copy writes a
slice of it, cut on the device by a slicing program compiled for each array's shape and slice. On
a host of 8 devices the first save of the one-shot search's supernet state (1,374 arrays, 124 MiB)
so took 31 s, most of it compiling those programs (CPU devices; 1,374 arrays of assorted shapes:
90 s the first save, 2.7 s the next, against 2.0 s and 1.8 s written by one device each). The
states here are tens of MiB, which one copy writes in a second or two; so each array is written
by the device holding its first replica, as Orbax does on GPU.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


def manager(workdir: str, item_handlers=None, **options) -> ocp.CheckpointManager:
  """The checkpoints of the job in `workdir`, with ocp.CheckpointManagerOptions(**options)."""
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=ocp.CheckpointManagerOptions(**options),
    item_handlers=item_handlers,
  )
