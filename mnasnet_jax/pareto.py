"""The search's report: the accuracy/latency Pareto front, its plots, and the best architectures.

`pareto.png` is the paper's Figure 6 for this search: every evaluated child as accuracy against
latency, the front of children that no other child beats on both, and the target latency T.
`latency_histogram.png` shows where the controller spent its samples relative to T. `best.md` lists
the best children by reward with everything needed to train one in full, after the architecture the
strategy's policy prefers, where it has one (TuNAS's answer), and after a search on shared weights
its finalists, trained alone, the best of them its answer.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

# What a record's accuracy is, as best.md says it (the one-shot search measures another).
PROXY_ACCURACY = 'top-1 on the held-out part after proxy training'


def pareto_front(accuracy: Sequence[float], latency_ms: Sequence[float]) -> np.ndarray:
  """Indices of the non-dominated points (higher accuracy, lower latency), by increasing latency.

  A point is dominated when another is at least as good on both axes and better on one; of exact
  duplicates only the first is kept.
  """
  accuracy = np.asarray(accuracy, np.float64)
  latency_ms = np.asarray(latency_ms, np.float64)
  if accuracy.shape != latency_ms.shape or accuracy.ndim != 1:
    raise ValueError(
      f'accuracy {accuracy.shape} and latency {latency_ms.shape} must be two 1-D '
      'arrays of the same length'
    )
  order = np.lexsort((-accuracy, latency_ms))  # by latency, then best accuracy first
  front, best = [], -np.inf
  for i in order:
    if accuracy[i] > best:
      front.append(int(i))
      best = accuracy[i]
  return np.asarray(front, np.int64)


def _ok(records: Sequence[dict]) -> list[dict]:
  return [r for r in records if r['status'] == 'ok' and r.get('accuracy') is not None]


def _unevaluated(records: Sequence[dict]) -> tuple[int, int]:
  """(failed, did not fit the device) among the children without an accuracy."""
  oom = sum(r['status'] == 'oom' for r in records)
  return len(records) - len(_ok(records)) - oom, oom


def front_records(records: Sequence[dict]) -> list[dict]:
  ok = _ok(records)
  if not ok:
    return []
  idx = pareto_front([r['accuracy'] for r in ok], [r['latency_ms'] for r in ok])
  return [ok[i] for i in idx]


def best_records(records: Sequence[dict], top_k: int) -> list[dict]:
  """The `top_k` successfully evaluated children of highest reward (ties: the earlier trial)."""
  return sorted(_ok(records), key=lambda r: (-r['reward'], r['trial']))[:top_k]


def mean_reward_per_step(records: Sequence[dict]) -> list[tuple[int, float]]:
  """(step, mean reward) of every controller step, over the children it told the strategy (those
  with a reward: failures count at the failure reward, children that did not fit not at all)."""
  by_step = {}
  for r in records:
    if r.get('reward') is not None:
      by_step.setdefault(r['step'], []).append(r['reward'])
  return [(step, float(np.mean(by_step[step]))) for step in sorted(by_step)]


def plot_pareto(records: Sequence[dict], target_ms: float, path: str, title: str) -> None:
  ok = _ok(records)
  fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
  if ok:
    lat = np.array([r['latency_ms'] for r in ok])
    acc = np.array([r['accuracy'] for r in ok]) * 100
    steps = np.array([r['step'] for r in ok])
    points = ax.scatter(
      lat,
      acc,
      c=steps,
      cmap='viridis',
      s=22,
      alpha=0.8,
      edgecolors='none',
      label='sampled child',
      zorder=2,
    )
    if steps.max() > steps.min():
      bar = fig.colorbar(points, ax=ax, label='controller step')
      bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
      bar.update_ticks()
    front = front_records(ok)
    flat = [r['latency_ms'] for r in front]
    facc = [r['accuracy'] * 100 for r in front]
    ax.step(flat, facc, where='post', color='tab:red', lw=1.5, zorder=3)
    ax.scatter(
      flat,
      facc,
      facecolors='none',
      edgecolors='tab:red',
      s=60,
      lw=1.5,
      zorder=4,
      label=f'Pareto front ({len(front)})',
    )
    best = best_records(ok, 1)[0]
    ax.scatter(
      [best['latency_ms']],
      [best['accuracy'] * 100],
      marker='*',
      s=240,
      color='gold',
      edgecolors='black',
      lw=0.8,
      zorder=5,
      label=f'best reward: trial {best["trial"]}',
    )
    lo, hi = min(lat.min(), target_ms), max(lat.max(), target_ms)
    ax.set_xlim(lo - 0.06 * (hi - lo), hi + 0.06 * (hi - lo))
  ax.axvline(
    target_ms, color='tab:gray', ls='--', lw=1.2, zorder=1, label=f'target T = {target_ms:.3g} ms'
  )
  failed, oom = _unevaluated(records)
  ax.set_title(
    f'{title}\n{len(ok)} children evaluated'
    + (f', {failed} failed' if failed else '')
    + (f', {oom} did not fit' if oom else '')
  )
  ax.set_xlabel('latency from the lookup table (ms)')
  ax.set_ylabel('held-out top-1 accuracy (%)')
  ax.grid(True, alpha=0.3)
  ax.legend(loc='best', fontsize=8, framealpha=0.9)  # where it hides the fewest children
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_latency_histogram(
  records: Sequence[dict], target_ms: float, path: str, title: str
) -> None:
  lat = np.array([r['latency_ms'] for r in records if r.get('latency_ms') is not None])
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
  if lat.size:
    ax.hist(
      lat, bins=min(40, max(8, lat.size // 4)), color='tab:blue', alpha=0.8, edgecolor='white'
    )
  ax.axvline(target_ms, color='tab:red', ls='--', lw=1.5, label=f'target T = {target_ms:.3g} ms')
  below = int((lat <= target_ms).sum())
  ax.set_title(f'{title}\n{lat.size} children sampled, {below} at or under T')
  ax.set_xlabel('latency from the lookup table (ms)')
  ax.set_ylabel('children')
  ax.grid(True, axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def train_command(train_config: str, blocks: Sequence[str]) -> str:
  return (
    f'python launch/main.py --config={train_config} --config.arch={",".join(blocks)} '
    '--workdir=/tmp/mnasnet_train'
  )


def _table(records: Sequence[dict], last: str, last_cell) -> list[str]:
  """A markdown table of `records` by rank, its last column `last` (`last_cell(record)`)."""
  lines = [
    '| rank | trial | step | reward | accuracy (%) | latency (ms) | params | mult-adds (M) '
    f'| {last} |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|:---:|',
  ]
  return lines + [
    f'| {i + 1} | {r["trial"]} | {r["step"]} | {r["reward"]:.4f} | {100 * r["accuracy"]:.2f} | '
    f'{r["latency_ms"]:.3f} | {r["params"]:,} | {r["macs"] / 1e6:.2f} | {last_cell(r)} |'
    for i, r in enumerate(records)
  ]


def _blocks_and_command(blocks: Sequence[str], train_config: str) -> list[str]:
  """An architecture's block strings and the command that trains it in full."""
  lines = ['Blocks:', ''] + [f'    {b}' for b in blocks]
  return lines + ['', 'Train it in full:', '', '```', train_command(train_config, blocks), '```']


def _policy_answer(records: Sequence[dict], answer: dict, train_config: str) -> list[str]:
  """best.md's section on the policy's preferred architecture `answer` (search.Search.describe's)."""
  sampled = [r for r in _ok(records) if r['tokens'] == answer['tokens']]
  seen = (
    f'It was sampled as trial {sampled[0]["trial"]} (reward {sampled[0]["reward"]:.4f}).'
    if sampled
    else 'It was not sampled as such: its accuracy is not measured.'
  )
  lines = [
    "## The policy's answer",
    '',
    "Each decision at the controller's most likely option (TuNAS's answer: the policy averages "
    "every reward it was told; the table's best child is partly its one measurement's luck). "
    f'Latency {answer["latency_ms"]:.3f} ms, {answer["params"]:,} parameters, '
    f'{answer["macs"] / 1e6:.2f} M mult-adds. {seen}',
    '',
  ]
  return lines + _blocks_and_command(answer['blocks'], train_config) + ['']


def _finalists(
  finalists: Sequence[dict], policy_answer: dict | None, train_config: str
) -> list[str]:
  """best.md's section on the children trained alone after a search on shared weights: the best
  of them by reward is the search's answer."""
  ranked = best_records(finalists, len(finalists))
  lines = [
    "## The answer: the best of the search's finalists, each trained alone",
    '',
    f"{len(finalists)} children: the policy's answer, where the strategy has a policy, and the "
    'next distinct children the strategy samples, each proxy-trained alone as the multi-trial '
    f'search trains a child (accuracy: {PROXY_ACCURACY}). Shared weights cannot tell how fast a '
    'child trains from scratch.',
    '',
  ]
  policy = None if policy_answer is None else policy_answer['tokens']
  lines += _table(ranked, "the policy's answer", lambda r: 'yes' if r['tokens'] == policy else '')
  untrained = [
    f'- finalist {r["trial"]}, no accuracy: {r["status"]}, {r["reason"]}'
    for r in finalists
    if r not in ranked
  ]
  if untrained:
    lines += [''] + untrained
  if ranked:
    lines += ['', f'The answer, finalist {ranked[0]["trial"]}:', '']
    lines += _blocks_and_command(ranked[0]['blocks'], train_config)
  return lines + ['']


def write_best(
  records: Sequence[dict],
  path: str,
  *,
  target_ms: float,
  top_k: int,
  train_config: str,
  description: str,
  accuracy: str = PROXY_ACCURACY,
  policy_answer: dict | None = None,
  finalists: Sequence[dict] | None = None,
) -> None:
  best = best_records(records, top_k)
  front_trials = {r['trial'] for r in front_records(records)}
  ok = _ok(records)
  failed, oom = _unevaluated(records)
  lines = [
    '# Best architectures of the search',
    '',
    description,
    '',
    f'{len(records)} children recorded, {len(ok)} evaluated, {failed} failed'
    + (f', {oom} did not fit the device' if oom else '')
    + '; '
    f'target latency T = {target_ms:.4g} ms. Accuracy is {accuracy}; '
    "latency is the lookup table's prediction; multiply-adds and parameters are "
    'counted analytically (`models.summary`).',
    '',
  ]
  means = mean_reward_per_step(records)
  if means:
    half = len(means) // 2
    trend = (
      f' (first {half} steps {np.mean([m for _, m in means[:half]]):.4f}, last {len(means) - half} '
      f'{np.mean([m for _, m in means[half:]]):.4f})'
      if half
      else ''
    )
    lines += [
      'Mean reward per controller step: ' + ', '.join(f'{m:.4f}' for _, m in means) + trend + '.',
      '',
    ]
  if finalists:
    lines += _finalists(finalists, policy_answer, train_config)
  if policy_answer is not None:
    lines += _policy_answer(records, policy_answer, train_config)
  if finalists or policy_answer is not None:
    lines += ['## The best children by reward', '']
  lines += _table(best, 'Pareto', lambda r: 'yes' if r['trial'] in front_trials else '')
  for i, r in enumerate(best):
    lines += ['', f'## {i + 1}. trial {r["trial"]}', '']
    lines += _blocks_and_command(r['blocks'], train_config)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def write_report(
  records: Sequence[dict],
  workdir: str,
  *,
  target_ms: float,
  top_k: int,
  train_config: str,
  description: str,
  accuracy: str = PROXY_ACCURACY,
  policy_answer: dict | None = None,
  finalists: Sequence[dict] | None = None,
) -> dict:
  """Writes pareto.json, pareto.png, latency_histogram.png and best.md; returns their paths.
  `policy_answer`: the architecture the strategy's policy prefers, as search.Search.describe gives
  it (None: a strategy without a policy). `finalists`: the records of children trained alone after
  a search on shared weights (their accuracy is a proxy training's, not `accuracy`), the best
  of them by reward the search's answer."""
  front = front_records(records)
  paths = {
    name: os.path.join(workdir, name)
    for name in ('pareto.json', 'pareto.png', 'latency_histogram.png', 'best.md')
  }
  summary = {
    'target_ms': target_ms,
    'children': len(records),
    'evaluated': len(_ok(records)),
    'front': [
      {
        k: r[k]
        for k in ('trial', 'step', 'accuracy', 'latency_ms', 'reward', 'params', 'macs', 'blocks')
      }
      for r in front
    ],
    'best': [r['trial'] for r in best_records(records, top_k)],
    'policy_answer': policy_answer,
  }
  if finalists is not None:  # by reward: the first is the answer
    summary['finalists'] = [
      {k: r[k] for k in ('trial', 'accuracy', 'latency_ms', 'reward', 'blocks', 'tokens')}
      for r in best_records(finalists, len(finalists))
    ]
  tmp = paths['pareto.json'] + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, paths['pareto.json'])
  plot_pareto(records, target_ms, paths['pareto.png'], description)
  plot_latency_histogram(records, target_ms, paths['latency_histogram.png'], description)
  write_best(
    records,
    paths['best.md'],
    target_ms=target_ms,
    top_k=top_k,
    train_config=train_config,
    description=description,
    accuracy=accuracy,
    policy_answer=policy_answer,
    finalists=finalists,
  )
  return paths
