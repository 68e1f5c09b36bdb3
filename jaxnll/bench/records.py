"""The one record schema of every benchmark: one number per record (long format).

A :data:`Record` carries the environment (device, versions, commit, date: :func:`environment`),
the case (head, shapes, dtype), what was measured (implementation, pass, metric, statistic) and
the number.  Every benchmark appends its records to ``OUT/NAME.csv`` and ``OUT/NAME.jsonl``
(:func:`save`; ``NAME`` is the ``bench`` column) and reads them back with :func:`load`.
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import platform
import subprocess
import uuid
from collections.abc import Iterable
from typing import TypedDict

from jaxnll.bench.specs import Case

Record = TypedDict(
  "Record",
  {
    "run_id": str,
    "date": str,
    "device": str,
    "backend": str,
    "jax_version": str,
    "jaxnll_version": str,
    "git_commit": str,
    "bench": str,
    "spec": str,
    "model": str,
    "batch": int,
    "length": int,
    "tokens": int,
    "hidden": int,
    "vocab": int,
    "dtype": str,
    "token_chunk": "int | str",
    "shards": int,
    "span_fraction": "float | str",
    "targets": "int | str",
    "impl": str,
    "pass": str,
    "metric": str,
    "stat": str,
    "value": float,
    "unit": str,
    "note": str,
  },
)
"""One measured number and everything needed to compare it: environment, case, measurement.

``pass`` is ``fwd``, ``fwd_bwd`` or empty (a status); ``span_fraction`` and ``targets`` are
empty where the number does not depend on the span (compile time, memory, status)."""
FIELDS: tuple[str, ...] = tuple(Record.__annotations__)
#: Columns that older records lack, and what they meant there (``bench``: the file's name).
DEFAULTS = {"shards": 1, "token_chunk": "", "note": ""}


# ----------------------------------------------------------------------------- environment


def _git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, cwd=here)
    commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe_device(backend: str, kind: str) -> str:
  """One device string for every framework: the accelerator's name, or the CPU's."""
  if backend == "cpu":
    return f"cpu: {_cpu_name()} ({os.cpu_count()} cores)"
  return kind


def environment(*, backend: str | None = None, device: str | None = None) -> dict:
  """Device, versions, commit and date of this run (the columns every record carries)."""
  import jax

  import jaxnll

  if device is None:
    dev = jax.devices()[0]
    backend = dev.platform
    device = describe_device(backend, dev.device_kind)
  return dict(
    run_id=uuid.uuid4().hex[:10],
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    device=device,
    backend=backend,
    jax_version=jax.__version__,
    jaxnll_version=jaxnll.__version__,
    git_commit=_git_commit(),
  )


# ----------------------------------------------------------------------------- building


def case_fields(case: Case, env: dict, *, bench: str = "bench", shards: int = 1) -> dict:
  """The environment and case columns shared by every record of ``case``."""
  return dict(
    env,
    bench=bench,
    spec=case.spec.name,
    model=case.spec.model,
    batch=case.batch,
    length=case.length,
    tokens=case.tokens,
    hidden=case.hidden,
    vocab=case.vocab,
    dtype=case.dtype,
    token_chunk=case.token_chunk if case.token_chunk is not None else "",
    shards=shards,
  )


def record(base, impl, p, metric, stat, value, unit="", fraction=None, targets=None, note=""):
  """One :data:`Record`: ``base`` (:func:`case_fields`) and one measured number."""
  return dict(
    base,
    span_fraction="" if fraction is None else fraction,
    targets="" if targets is None else targets,
    impl=impl,
    **{"pass": p},
    metric=metric,
    stat=stat,
    value=value,
    unit=unit,
    note=note,
  )


def statuses(base: dict, names: Iterable[str], failed: dict[str, str], note: str = "") -> list:
  """One ``status`` record per implementation: ``ok`` or why not (``failed[name]``, whose
  prefix ``check_failed`` / ``skipped`` names the kind)."""
  rows = []
  for name in names:
    why = failed.get(name)
    if why is None:
      rows.append(record(base, name, "", "status", "ok", 1, note=note))
      continue
    kind = next((k for k in ("check_failed", "skipped") if why.startswith(k)), "failed")
    rows.append(record(base, name, "", "status", kind, 1, note=why.removeprefix("skipped: ")))
  return rows


# ----------------------------------------------------------------------------- files


def _complete(r: dict, name: str) -> dict:
  return {k: r.get(k, DEFAULTS.get(k, name if k == "bench" else "")) for k in FIELDS}


def save(rows: Iterable[dict], out: str, name: str = "bench") -> None:
  """Appends ``rows`` to ``out/NAME.csv`` and ``out/NAME.jsonl`` (a CSV file with older
  columns is rewritten with these first)."""
  rows = [_complete(r, name) for r in rows]
  if not rows:
    return
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"{name}.csv")
  old, mode = [], "w"
  if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if tuple(reader.fieldnames or ()) == FIELDS:
        mode = "a"
      else:
        old = [_complete(r, name) for r in reader]
  with open(path, mode, newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    if mode == "w":
      w.writeheader()
    w.writerows(old + rows)
  with open(os.path.join(out, f"{name}.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def load(out: str, name: str = "bench") -> list[dict]:
  """Every record of ``out/NAME.jsonl``, with every column of :data:`FIELDS`."""
  path = os.path.join(out, f"{name}.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [_complete(json.loads(line), name) for line in f if line.strip()]
