"""Training metrics: per-sample loss (metric A), data-set aggregate (metric B), perplexity.

Two readings of "the loss" of a fine-tuning run are worth keeping apart:

* **metric A**, the per-sample loss: ``-log Pr(y | x)`` of each sample, shown per target
  token (:func:`per_sample_loss`). One value per sample, it fluctuates from sample to sample
  and step to step.
* **metric B**, the aggregate over a data set or an epoch: the global token mean

  .. math::

     \\bar L = \\frac{\\sum_i \\text{NLL}_i}{\\sum_i |y_i|},

  (:class:`EpochAggregate`), whose exponential is the target perplexity (:func:`perplexity`).

Everything here is host-side NumPy on values the train step already returned, plus the small
file formats of a run directory (``metrics.jsonl``, ``loss.png``, the sample table).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def per_sample_loss(sums, counts) -> np.ndarray:
  """Metric A: each sample's NLL per target token, ``sums / counts`` (0 for no targets).

  Examples:
    >>> per_sample_loss([2.0, 24.0, 0.0], [2, 8, 0]).tolist()
    [1.0, 3.0, 0.0]
  """
  sums = np.asarray(sums, np.float64)
  counts = np.asarray(counts, np.float64)
  return np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), 0.0)


def aggregate_loss(sums, counts) -> float:
  """Metric B: ``Σ sums / Σ counts`` (0 for no targets).

  Examples:
    Two target tokens at NLL 1 and eight at NLL 3: the token mean is 2.6, not 2.0.

    >>> aggregate_loss([2.0, 24.0], [2, 8])
    2.6
  """
  total = float(np.sum(np.asarray(counts, np.float64)))
  return float(np.sum(np.asarray(sums, np.float64)) / total) if total else 0.0


def perplexity(nll_per_token: float) -> float:
  """Perplexity over target tokens, ``exp`` of the token-mean NLL."""
  return float(math.exp(min(nll_per_token, 700.0)))


class EpochAggregate:
  """Running metric B over the samples seen so far in an epoch."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.sum = 0.0
    self.count = 0.0

  def add(self, sums, counts, sample_ids=None) -> None:
    """Adds per-sample sums and counts (entries whose ``sample_ids`` is -1 are padding)."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    if sample_ids is not None:
      keep = np.asarray(sample_ids) >= 0
      sums, counts = sums[keep], counts[keep]
    self.sum += float(sums.sum())
    self.count += float(counts.sum())

  def value(self) -> float:
    return self.sum / self.count if self.count else 0.0

  def restore(self, records: Sequence[dict[str, Any]], epoch: int) -> None:
    """Takes up the running sums of ``epoch`` from its logged records (for a resumed run).

    A record carries the epoch's exact running totals (``epoch_sum``, ``epoch_count``: floats
    written with ``repr``, so they read back bit for bit), so the aggregate of an epoch that
    spans a resume equals the uninterrupted one exactly. Records of older runs without them
    fall back to the (rounded) per-sample values.
    """
    self.reset()
    mine = [r for r in records if r.get("epoch") == epoch]
    if mine and "epoch_sum" in mine[-1]:
      self.sum, self.count = float(mine[-1]["epoch_sum"]), float(mine[-1]["epoch_count"])
      return
    for r in mine:
      self.add(r["sample_nll"], r["sample_tokens"])


def tokens_per_second(tokens: float, seconds: float) -> float:
  return float(tokens / seconds) if seconds > 0 else 0.0


# ----------------------------------------------------------------------------- run files


def step_record(
  *, step, epoch, out, sample_ids, seconds, lr, means: Sequence[str] = ("full_loss",)
) -> dict[str, Any]:
  """The ``metrics.jsonl`` record of one step from the train step's (host) metrics.

  Per-sample figures are lists aligned with ``sample_ids`` (data-set indices): NLL sums
  (``sample_nll``) and target-token counts (``sample_tokens``); the objective's ``means``
  (its logged names, :attr:`jaxnll.train.objectives.Objective.means`) under those names,
  where the step reported them.
  """
  ids = np.asarray(sample_ids)
  keep = ids >= 0
  record = {
    "step": int(step),
    "epoch": int(epoch),
    "loss": float(out["loss"]),
    "target_loss": float(out["target_loss"]),
    "target_tokens": int(out["target_count"]),
    "tokens": int(out["tokens"]),
    "tokens_per_s": round(tokens_per_second(float(out["tokens"]), seconds), 1),
    "grad_norm": float(out["grad_norm"]),
    "skipped": not bool(out["finite"]),
    "lr": float(lr),
    "sample_ids": ids[keep].tolist(),
    "sample_nll": [round(float(x), 5) for x in np.asarray(out["sample_sums"])[keep]],
    "sample_tokens": [int(x) for x in np.asarray(out["sample_counts"])[keep]],
  }
  for name in means:
    if name in out and name not in record:
      record[name] = float(out[name])
  return record


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically: a temporary file beside it, then ``os.replace``
  (a reader, or a run killed at any moment, sees the old file or the new one, never a part)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path``, atomically (:func:`write_atomic`)."""
  write_atomic(path, json.dumps(obj, indent=2))


def append_record(path: str, record: dict[str, Any]) -> None:
  """Appends one ``metrics.jsonl`` line (flushed to the file system before returning)."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _parse_lines(text: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` text.

  Records are appended one line at a time, so a kill in the middle of a write can only damage
  the last line, which has then no newline: it is dropped (a complete record just missing its
  newline is kept). A damaged line anywhere else means the file was edited, and is an error.
  """
  lines = text.split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      if i == len(lines) - 1:
        continue
      raise ValueError(f"line {i + 1} is not a step record")
    records.append(record)
  return records


def read_records(path: str) -> list[dict[str, Any]]:
  """The step records of ``metrics.jsonl`` (a truncated last line is ignored)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return _parse_lines(text)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def repair_records(path: str, step: int, *, write: bool = True) -> list[dict[str, Any]]:
  """The records of steps ``1 .. step`` (what a run resumed at ``step`` keeps).

  Drops records after ``step`` (steps the resumed run computes again) and a last line cut by
  a kill in the middle of a write; with ``write`` rewrites the file atomically.

  Raises:
    ValueError: the file does not hold exactly the steps ``1 .. step`` (naming it).
  """
  records = [r for r in read_records(path) if r["step"] <= step]
  steps = [r["step"] for r in records]
  if steps != list(range(1, step + 1)):
    raise ValueError(
      f"{path}: the checkpoint is at step {step} but the records hold steps "
      f"{_ranges(steps) or 'none'}; the run directory was changed by hand"
    )
  if write:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
  return records


def _ranges(steps: Sequence[int]) -> str:
  if not steps:
    return ""
  parts, lo = [], steps[0]
  for a, b in zip(steps, [*steps[1:], None], strict=True):
    if b != a + 1:
      parts.append(f"{lo}" if lo == a else f"{lo}..{a}")
      lo = b
  return ", ".join(parts)


def plot_losses(records: Sequence[dict[str, Any]], path: str) -> None:
  """``loss.png``: metric A as points (one per sample and step), metric B as a line."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  fig = Figure(figsize=(8, 4.5), dpi=110)
  ax = fig.subplots()
  xs, ys = [], []
  for r in records:
    per = per_sample_loss(r["sample_nll"], r["sample_tokens"])
    xs += [r["step"]] * len(per)
    ys += per.tolist()
  ax.scatter(xs, ys, s=2, alpha=0.15, color="tab:blue", label="per-sample target NLL (A)")
  ax.plot(
    [r["step"] for r in records],
    [r["target_loss"] for r in records],
    color="tab:blue",
    lw=0.8,
    label="batch target NLL",
  )
  epochs = [r for r in records if "epoch_loss" in r]
  if epochs:
    ax.plot(
      [r["step"] for r in epochs],
      [r["epoch_loss"] for r in epochs],
      "o-",
      color="tab:red",
      lw=2,
      label="epoch aggregate (B)",
    )
  evals = [r for r in records if "heldout_loss" in r]
  if evals:
    ax.plot(
      [r["step"] for r in evals],
      [r["heldout_loss"] for r in evals],
      "s--",
      color="tab:green",
      label="held-out target NLL",
    )
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("NLL per target token (nats)")
  ax.set_title("sub-sequence NLL -log Pr(y|x) while fine-tuning")
  ax.legend(loc="upper right", fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{ext}"
  fig.savefig(tmp)
  os.replace(tmp, path)


def _clip(text: str, width: int, *, keep_end: bool = False) -> str:
  text = text.replace("\n", " ")
  if len(text) <= width:
    return text
  return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def format_table(rows: Sequence[dict[str, Any]], *, width: int = 44) -> str:
  """The held-out sample table: prompt (its end), reference, greedy output, NLL.

  Examples:
    >>> row = dict(prompt="2+2", reference="4", greedy="4", nll=0.01, tokens=2)
    >>> print(format_table([row]))
    prompt | reference | greedy | NLL (sum) | NLL/token
    -------+-----------+--------+-----------+----------
    2+2    | 4         | 4      |    0.0100 |    0.0050
  """
  header = ("prompt", "reference", "greedy", "NLL (sum)", "NLL/token")
  body = [
    (
      _clip(r["prompt"], width, keep_end=True),
      _clip(r["reference"], width // 2),
      _clip(r["greedy"], width // 2),
      f"{r['nll']:.4f}",
      f"{r['nll'] / max(r['tokens'], 1):.4f}",
    )
    for r in rows
  ]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
  align = ["<", "<", "<", ">", ">"]

  def line(cells):
    return " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))

  lines = [line(header), "-+-".join("-" * w for w in widths)]
  lines += [line(b) for b in body]
  return "\n".join(x.rstrip() for x in lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Writes dict rows (same keys) as CSV."""
  if not rows:
    raise ValueError("no rows to write")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
