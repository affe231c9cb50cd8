"""The search history: one JSON line per child, on disk the moment the child is evaluated.

Append-only and crash-safe: each record is written with one `write`, flushed and fsynced, so a
process killed at any moment (kill -9, preemption) leaves every earlier record intact and at most a
truncated last line. Opening the file again drops that partial line (it was never a recorded child)
and truncates the file back to the last complete record, so the next append starts on a clean line.
Records are keyed by `trial`; a trial already on disk is never written again.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

from absl import logging

from mnasnet_jax import errors

# Fields of every record, in the order they are written (the reader accepts extra fields).
FIELDS = (
  'trial',
  'step',
  'tokens',
  'blocks',
  'accuracy',
  'latency_ms',
  'reward',
  'params',
  'macs',
  'status',
  'reason',
  'eval_seconds',
  'compile_seconds',
  'train_seconds',
  'process',
)
# 'oom': the child fits no way of running on the device (memory.DoesNotFit); its reward is null.
STATUSES = ('ok', 'failed', 'oom')


class HistoryError(errors.UserError):
  """A history file that cannot be a record of this search (not a harmless truncated line): the
  workdir holds something else, which the user fixes by choosing another."""


def _clean(value):
  """JSON has no NaN or infinity: non-finite floats become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read(path: str) -> list[dict]:
  """The complete records of a history file (none if it does not exist); never modifies the file."""
  records, _ = _parse(path)
  return records


def _parse(path: str) -> tuple[list[dict], int]:
  """(records, byte length of the complete part of the file)."""
  if not os.path.exists(path):
    return [], 0
  with open(path, 'rb') as f:
    data = f.read()
  end = data.rfind(b'\n') + 1  # everything after the last newline is a line cut short by a kill
  if end < len(data):
    logging.warning(
      '%s: dropping a truncated last line of %d bytes (the process was killed while '
      'writing it; that child will be evaluated again)',
      path,
      len(data) - end,
    )
  records, seen = [], set()
  for number, line in enumerate(data[:end].splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise HistoryError(
        f'{path}, line {number}: not a JSON record ({e}); expected one JSON object '
        'per line as written by mnasnet_jax.history'
      ) from None
    if not isinstance(record, dict) or 'trial' not in record:
      raise HistoryError(
        f'{path}, line {number}: expected a JSON object with a "trial" field, got {line[:80]!r}'
      )
    if record['trial'] in seen:
      raise HistoryError(f'{path}, line {number}: trial {record["trial"]} is recorded twice')
    seen.add(record['trial'])
    records.append(record)
  return records, end


class History:
  """The open history of one search; `append` is the only way records reach the file."""

  def __init__(self, path: str, writable: bool = True):
    self.path = path
    self.writable = writable
    self.records, end = _parse(path)
    self._trials = {r['trial']: r for r in self.records}
    if writable and os.path.exists(path) and os.path.getsize(path) != end:
      with open(path, 'r+b') as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())

  def __len__(self) -> int:
    return len(self.records)

  def __contains__(self, trial: int) -> bool:
    return trial in self._trials

  def get(self, trial: int) -> dict | None:
    return self._trials.get(trial)

  def step_records(self, step: int) -> list[dict]:
    return [r for r in self.records if r['step'] == step]

  def append(self, record: dict) -> None:
    """Writes one child's record and waits until the operating system has it on disk."""
    missing = [k for k in ('trial', 'step', 'status') if k not in record]
    if missing:
      raise ValueError(f'a history record needs the fields {missing}; got {sorted(record)}')
    if record['status'] not in STATUSES:
      raise ValueError(f'status {record["status"]!r}: expected one of {STATUSES}')
    if record['trial'] in self._trials:
      raise ValueError(f'trial {record["trial"]} is already in {self.path}')
    ordered = {k: _clean(record[k]) for k in FIELDS if k in record}
    ordered.update({k: _clean(v) for k, v in record.items() if k not in ordered})
    if self.writable:
      line = json.dumps(ordered, separators=(',', ':')) + '\n'
      with open(self.path, 'ab') as f:
        f.write(line.encode('utf-8'))
        f.flush()
        os.fsync(f.fileno())
    self.records.append(ordered)
    self._trials[ordered['trial']] = ordered

  def extend(self, records: Iterable[dict]) -> None:
    for record in records:
      self.append(record)
