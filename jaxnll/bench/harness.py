"""Measuring: compile-only memory, the reference check, interleaved timing, medians.

* **compile time** and **temp memory** of the forward and of the forward + backward, from
  ``lower().compile()`` and ``compiled.memory_analysis()`` (XLA's own accounting:
  deterministic, no run needed; :func:`memory_case` lowers from shapes alone);
* the **reference check**: every implementation's value and gradients against its reference,
  before anything is timed (:func:`check`); one that differs is recorded as ``check_failed``
  and not timed;
* **time** as the median and the 20th / 80th percentiles over interleaved repetitions (every
  implementation once per repetition, the order rotated, :func:`interleave`) after warm-up,
  and the median of the per-repetition ratio against optax (paired, so a slow drift of a
  shared machine cancels);
* **useful FLOP/s** (:attr:`Op.flops`) and its fraction of a plain ``[N, D] @ [D, V]``
  matmul timed in the same run (the roofline of this machine for this shape).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxnll.bench import records
from jaxnll.bench.impls import (
  FUSED_DISTILL,
  FUSED_DISTILL_SUITE,
  HEAD,
  Impl,
  Loss,
  Op,
  fused_distill_implementations,
  implementations,
  short,
  tokamax_unavailable,
)
from jaxnll.bench.specs import FRACTIONS, Case, distill_case, span_mask

F32 = jnp.float32
PASSES = ("fwd", "fwd_bwd")
Record = Callable[..., None]
"""``record(impl, pass, metric, stat, value, unit="", fraction=None, targets=None, note="")``"""


# ----------------------------------------------------------------------------- primitives


def compile_fn(fn: Callable, args: Sequence) -> tuple[Callable, float, int]:
  """``(compiled, seconds to lower and compile, temp bytes)`` of ``jax.jit(fn)`` at ``args``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, memory_stats(compiled)["temp_bytes"]


def memory_stats(compiled) -> dict[str, int]:
  """Temp, argument and output bytes of a compiled program (-1 where XLA does not say)."""
  stats = compiled.memory_analysis()
  names = ("temp", "argument", "output")
  if stats is None:
    return {f"{k}_bytes": -1 for k in names}
  return {f"{k}_bytes": int(getattr(stats, f"{k}_size_in_bytes")) for k in names}


def ready_seconds(call: Callable[[], object]) -> float:
  """Wall seconds of ``call()``, until its results are ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - t0


def fwd_bwd(loss: Loss, argnums: tuple[int, ...] = (0, 1)) -> Loss:
  """Value and gradients (default: with respect to ``hidden`` and ``weight``)."""
  return jax.value_and_grad(loss, argnums=argnums)


def passes_of(impl: Impl, op: Op, passes: Sequence[str] = PASSES) -> dict[str, Loss]:
  """The functions compiled for ``impl``: its forward and, if differentiable, forward +
  backward (``passes`` keeps some)."""
  fns = {"fwd": impl.loss}
  if impl.differentiable:
    fns["fwd_bwd"] = fwd_bwd(impl.loss, op.argnums)
  return {p: f for p, f in fns.items() if p in passes}


@functools.cache
def _jitted_reference(ref: Loss, argnums: tuple[int, ...]) -> dict[str, Callable]:
  return {"fwd": jax.jit(ref), "fwd_bwd": jax.jit(fwd_bwd(ref, argnums))}


def tolerance(dtype: str, backend: str) -> float:
  """Relative tolerance of the reference check (per array, against its largest entry).

  16-bit logits round each logit to 8 bits of mantissa; GPUs may run float32 matmuls in
  TF32.  A wrong loss (a dropped token, a shifted span, a mean for a sum) is off by far more.
  """
  if dtype == "float32":
    return 2e-3 if backend == "cpu" else 1e-2
  return 3e-2


def relative_error(got, want) -> float:
  """Largest ``|got - want|`` over the arrays of a pytree, each relative to ``max |want|``."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g = jnp.asarray(g, F32)
    w = jnp.asarray(w, F32)
    scale = max(float(jnp.max(jnp.abs(w))), 1e-30)
    err = float(jnp.max(jnp.abs(g - w))) / scale
    worst = max(worst, err if math.isfinite(err) else math.inf)
  return worst


def percentiles(xs: Sequence[float]) -> dict[str, float]:
  """Median, 20th and 80th percentile."""
  a = np.asarray(xs, np.float64)
  return dict(
    median=float(np.median(a)), p20=float(np.percentile(a, 20)), p80=float(np.percentile(a, 80))
  )


class Progress:
  """A tqdm bar when wanted, a no-op otherwise."""

  def __init__(self, total: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)

  def step(self, desc: str | None = None, n: int = 1):
    if self.bar is not None:
      if desc is not None:
        self.bar.set_description(desc, refresh=False)
      self.bar.update(n)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def steps_of(n_impls: int, n_fractions: int, repeats: int) -> int:
  """Progress units of one case: a compile per implementation, then per fraction the
  reference, the checks and one unit per repetition."""
  return n_impls + n_fractions * (2 + repeats)


def within_budget(items: Iterable, budget_s: float | None, say: Callable[[str], None] = print):
  """``items`` while less than ``budget_s`` seconds have passed since the first (each item
  is a head: a started one runs to its end; the rest are named as not run)."""
  t0 = time.perf_counter()
  for item in items:
    if budget_s is not None and time.perf_counter() - t0 > budget_s:
      say(f"budget of {budget_s:g} s spent: {getattr(item, 'name', item)} not run")
      continue
    yield item


# ----------------------------------------------------------------------------- the steps


def unavailable(impls: Iterable[str]) -> dict[str, str]:
  """``{name: "skipped: why"}`` for the peers among ``impls`` that do not run here."""
  if "tokamax" in impls and (why := tokamax_unavailable()) is not None:
    return {"tokamax": f"skipped: {why}"}
  return {}


def abstract_args(case: Case, op: Op = HEAD) -> tuple:
  """The shapes and dtypes of ``op``'s arguments at ``case``, nothing allocated."""
  arrays = jax.eval_shape(lambda: op.inputs(case, 0))
  return (*arrays, jax.ShapeDtypeStruct((case.batch, case.length), jnp.bool_))


def compile_all(
  impls: dict[str, Impl],
  op: Op,
  args: Sequence,
  record: Record,
  failed: dict[str, str],
  *,
  passes: Sequence[str] = PASSES,
  metrics: Sequence[str] = ("temp_bytes",),
  note: str = "",
  progress: Progress | None = None,
) -> dict[str, dict[str, Callable]]:
  """Compiles every pass of every implementation not in ``failed`` at ``args`` (the span
  fraction is data, not shape: once for all fractions), recording compile time and memory;
  a failure goes to ``failed``."""
  compiled = {}
  for name, impl in impls.items():
    if progress is not None:
      progress.step(f"compile {name}")
    if name in failed:
      continue
    out, p = {}, ""
    try:
      for p, fn in passes_of(impl, op, passes).items():
        out[p], seconds, _ = compile_fn(fn, args)
        record(name, p, "compile_s", "value", seconds, "s", note=note)
        for metric, value in memory_stats(out[p]).items():
          if metric in metrics:
            record(name, p, metric, "value", value, "B", note=note)
    except Exception as e:  # noqa: BLE001 -- recorded, the suite goes on
      failed[name] = f"compile {p}: {short(e)}"
      continue
    compiled[name] = out
  return compiled


def check(
  compiled: dict[str, dict[str, Callable]],
  impls: dict[str, Impl],
  op: Op,
  args: Sequence,
  record: Record,
  failed: dict[str, str],
  *,
  rtol: float,
  fraction: float | None = None,
  targets: int | None = None,
) -> list[str]:
  """Runs every compiled pass at ``args`` and compares value and gradients with the
  implementation's reference; returns the names that pass (``failed`` gets the others)."""
  wants: dict[Loss, dict | Exception] = {}
  for name in compiled:
    ref = impls[name].reference or op.reference
    if name in failed or not impls[name].differentiable or ref in wants:
      continue
    try:
      wants[ref] = {p: f(*args) for p, f in _jitted_reference(ref, op.argnums).items()}
    except Exception as e:  # noqa: BLE001 -- nothing can be checked against it
      wants[ref] = e
  live = []
  for name, fns in compiled.items():
    impl = impls[name]
    want = wants.get(impl.reference or op.reference)
    if name in failed:
      continue
    if isinstance(want, Exception):
      failed[name] = f"reference: {short(want)}"
      continue
    try:
      got = {p: fn(*args) for p, fn in fns.items()}
    except Exception as e:  # noqa: BLE001
      failed[name] = f"run: {short(e)}"
      continue
    if impl.differentiable:  # the matmul has no reference
      err = max(relative_error(g, want[p]) for p, g in got.items())
      record(name, "fwd_bwd", "max_rel_err", "value", err, "", fraction, targets)
      if not err <= rtol:
        failed[name] = f"check_failed: differs from jaxnll.reference by {err:.3g} > {rtol:g}"
        continue
    live.append(name)
  return live


def interleave(
  calls: dict[str, dict[str, Callable[[], object]]],
  repeats: int,
  *,
  timer: Callable[[Callable[[], object]], float] = ready_seconds,
  step: Callable[[int], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
  """Seconds of every call, ``{name: {pass: [one per repetition]}}``: each repetition runs
  every implementation once, the order rotated by one and reversed every other repetition,
  so a slow drift of a shared machine's load falls on all alike."""
  names = list(calls)
  times = {n: {p: [] for p in calls[n]} for n in names}
  for r in range(repeats):
    k = r % max(len(names), 1)
    order = names[k:] + names[:k]
    for n in order[::-1] if r % 2 else order:
      for p, call in calls[n].items():
        times[n][p].append(timer(call))
    if step is not None:
      step(r)
  return times


def summarize(
  times: dict[str, dict[str, list[float]]],
  case: Case,
  targets: int,
  record: Record,
  *,
  fraction: float,
  flops: Callable[[str, str, Case, int], float] | None = None,
  roof: str = "matmul",
) -> None:
  """Records percentiles of the times, the per-repetition ratio against ``optax`` and, given
  ``flops``, the useful FLOP/s and its fraction of the ``roof`` matmul's rate."""
  rate_of_roof = None
  if flops is not None and times.get(roof, {}).get("fwd"):
    rate_of_roof = flops(roof, "fwd", case, targets) / float(np.median(times[roof]["fwd"]))
  for name, by_pass in times.items():
    for p, ts in by_pass.items():
      if not ts:
        continue
      for stat, v in percentiles(ts).items():
        record(name, p, "time_s", stat, v, "s", fraction, targets)
      base = times.get("optax", {}).get(p)
      if base and name != "optax":
        for stat, v in percentiles(np.asarray(ts) / np.asarray(base)).items():
          record(name, p, "ratio_vs_optax", stat, v, "x", fraction, targets)
      if flops is None:
        continue
      rate = flops(name, p, case, targets) / float(np.median(ts))
      record(name, p, "flops_per_s", "median", rate, "FLOP/s", fraction, targets)
      if rate_of_roof:
        record(name, p, "matmul_fraction", "median", rate / rate_of_roof, "", fraction, targets)


# ----------------------------------------------------------------------------- whole cases


def _recorder(case: Case, env: dict, **columns) -> tuple[list[dict], dict, Record]:
  rows: list[dict] = []
  base = records.case_fields(case, env, **columns)

  def record(*a, **k):
    rows.append(records.record(base, *a, **k))

  return rows, base, record


def memory_case(
  case: Case,
  env: dict,
  *,
  impls: dict[str, Impl] | None = None,
  op: Op = HEAD,
  args: Sequence | None = None,
  passes: Sequence[str] = PASSES,
  metrics: Sequence[str] = ("temp_bytes",),
  bench: str = "bench",
  shards: int = 1,
) -> list[dict]:
  """Compile-only records of ``case``: compile time and memory of every implementation,
  lowered from shapes alone (:func:`abstract_args`, or ``args``; nothing is allocated or run,
  so a full-size head fits a laptop).

  Recorded with ``span_fraction`` empty and ``note="compile only"``; no check, no timing."""
  impls = implementations(case) if impls is None else impls
  impls = {k: v for k, v in impls.items() if v.differentiable}
  rows, base, record = _recorder(case, env, bench=bench, shards=shards)
  failed = unavailable(impls)
  args = abstract_args(case, op) if args is None else args
  compile_all(impls, op, args, record, failed, passes=passes, metrics=metrics, note="compile only")
  return rows + records.statuses(base, impls, failed, note="compile only")


def check_case(
  case: Case,
  env: dict,
  *,
  impls: dict[str, Impl],
  op: Op = HEAD,
  fraction: float = 0.5,
  bench: str = "bench",
  shards: int = 1,
  seed: int = 0,
) -> list[dict]:
  """The reference check alone at ``case`` (a small one, ahead of compile-only memory at
  full size): ``max_rel_err`` and ``status`` records, nothing timed."""
  rows, base, record = _recorder(case, env, bench=bench, shards=shards)
  failed = unavailable(impls)
  mask = jnp.asarray(span_mask(case.batch, case.length, fraction))
  args = (*op.inputs(case, seed), mask)
  jitted = {
    n: {p: jax.jit(f) for p, f in passes_of(impl, op).items()}
    for n, impl in impls.items()
    if n not in failed
  }
  rtol = tolerance(case.dtype, env["backend"])
  check(
    jitted, impls, op, args, record, failed, rtol=rtol, fraction=fraction, targets=int(mask.sum())
  )
  return rows + records.statuses(base, impls, failed)


def bench_case(
  case: Case,
  env: dict,
  *,
  fractions: Sequence[float] = FRACTIONS,
  repeats: int = 5,
  warmup: int = 1,
  impls: dict[str, Impl] | None = None,
  op: Op = HEAD,
  passes: Sequence[str] = PASSES,
  progress: Progress | None = None,
  seed: int = 0,
  bench: str = "bench",
) -> list[dict]:
  """All measurements of one case as long-format records (see :data:`records.FIELDS`):
  compile once, then per span fraction check, warm up, time interleaved, summarize."""
  impls = implementations(case) if impls is None else impls
  progress = progress or Progress(0, False)
  rows, base, record = _recorder(case, env, bench=bench)
  failed = unavailable(impls)
  inputs = op.inputs(case, seed)
  full = jnp.asarray(span_mask(case.batch, case.length, 1.0))
  compiled = compile_all(
    impls, op, (*inputs, full), record, failed, passes=passes, progress=progress
  )
  rtol = tolerance(case.dtype, env["backend"])
  for fraction in fractions:
    label = f"{case.spec.name} span {fraction:g}"
    mask = jnp.asarray(span_mask(case.batch, case.length, fraction))
    n = int(mask.sum())
    args = (*inputs, mask)
    progress.step(f"{label} check")
    live = check(compiled, impls, op, args, record, failed, rtol=rtol, fraction=fraction, targets=n)
    calls = {
      name: {p: functools.partial(f, *args) for p, f in compiled[name].items()} for name in live
    }
    for _ in range(warmup):
      for by_pass in calls.values():
        for call in by_pass.values():
          jax.block_until_ready(call())
    progress.step(f"{label} warm-up")
    times = interleave(
      calls, repeats, step=lambda r, label=label: progress.step(f"{label} rep {r + 1}/{repeats}")
    )
    summarize(times, case, n, record, fraction=fraction, flops=op.flops)
  return rows + records.statuses(base, impls, failed)


def fused_distill_case(
  case: Case, env: dict, *, names: Sequence[str] = FUSED_DISTILL_SUITE, **options
) -> list[dict]:
  """:func:`bench_case` of the fused distillation at ``case``'s student head and tokens (a
  teacher of :attr:`~jaxnll.bench.specs.Spec.teacher_hidden`, the case named ``NAME+kd``):
  ``optax`` and ``jaxnll_logits`` on both materialised logits, ``jaxnll_fused`` through both
  heads (``names``: which); ``ratio_vs_optax`` is the time against the logits path.
  ``options``: those of :func:`bench_case` but ``impls``, ``op`` and ``bench``."""
  kd = distill_case(case)
  impls = fused_distill_implementations(kd, names)
  return bench_case(kd, env, impls=impls, op=FUSED_DISTILL, bench="fused_distill", **options)
