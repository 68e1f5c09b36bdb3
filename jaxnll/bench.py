"""Benchmark suite: jaxnll's losses against their peers at real language-model heads.

``jaxnll bench`` (or ``python -m jaxnll.bench``) measures, for each named head below and each
implementation of the same loss — the summed negative log-likelihood of the target span of
``hidden @ weight`` —

* **compile time** of the forward and of the forward + backward (``lower().compile()``);
* **temp memory** of both, from ``compiled.memory_analysis().temp_size_in_bytes`` (XLA's own
  accounting: deterministic, no run needed);
* **time** of both, as the median and the 20th / 80th percentiles over interleaved repetitions
  (every implementation once per repetition, the order rotated) after warm-up, and the median
  of the per-repetition ratio against optax (paired, so a slow drift of a shared machine
  cancels);
* **achieved FLOP/s** of the useful work — ``2·n·D·V`` forward and ``6·n·D·V`` forward +
  backward for ``n`` target tokens (the logits, then the gradients for ``hidden`` and
  ``weight``) — and its fraction of a plain ``[N, D] @ [D, V]`` matmul timed in the same run
  (the roofline of this machine for this shape).

Every implementation is checked against :mod:`jaxnll.reference` (value and both gradients)
before it is timed; one that differs is recorded as ``check_failed`` and not timed.

Implementations (:func:`implementations`):

``naive``
  ``hidden @ weight``, a full float32 ``log_softmax``, the target log-probability gathered.
``optax``
  ``optax.softmax_cross_entropy_with_integer_labels`` on the head's logits, masked sum.
``tokamax``
  ``tokamax.linear_softmax_cross_entropy_loss`` where it imports and runs (the reason is
  recorded where it does not).  It takes no mask: it always computes every position, so it is
  checked against the all-positions loss and costs the same at every span fraction.
``jaxnll_logits``
  :func:`jaxnll.sequence_nll` on the head's logits (the memory-lean ``custom_vjp``).
``jaxnll_fused``
  :func:`jaxnll.linear_sequence_nll` (per-sample entry, no ``[B, T, V]`` logits).
``jaxnll_fused_scalar``
  :func:`jaxnll.linear_nll_loss` (scalar training entry, gradients built in the forward).
``matmul``
  the plain head matmul: the roofline, not a loss.

Shapes (:data:`SPECS`) are named after real heads.  The backend picks the size: on CPU the
token count is scaled down (and the fused kernels' token chunk with it, to a quarter of the
tokens, so that span skipping has the same granularity as at full size) and the dtype is
float32; on GPU / TPU every head runs at ``4 × 2048`` tokens in bfloat16 with the library's
default chunks.  ``--quick`` runs one small case: on CPU the Mistral-7B vocabulary with the
hidden size scaled to 256 (a real-``D`` head does not fit two minutes on two cores).

Results are appended, one number per record (long format), to ``OUT/bench.csv`` and
``OUT/bench.jsonl`` with the device, jax version, git commit and date; :func:`report` turns
them into ``OUT/bench.md`` and one PNG per head and device.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32

# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Spec:
  """A named head: hidden size ``D``, vocabulary ``V`` and token counts per backend."""

  name: str
  model: str
  hidden: int
  vocab: int
  cpu: tuple[int, int]
  """``(B, T)`` on CPU (scaled down)."""
  accel: tuple[int, int] | None = (4, 2048)
  """``(B, T)`` on GPU / TPU; None: a CPU-only head."""
  quick: tuple[int, int] | None = None
  """``(B, T)`` for ``--quick`` on CPU (default: ``cpu``)."""


SPECS: dict[str, Spec] = {
  s.name: s
  for s in (
    Spec("gemma2-2b", "Gemma-2 2B", 2304, 256000, cpu=(1, 128)),
    Spec("llama3-8b", "Llama-3 8B", 4096, 128256, cpu=(1, 128)),
    Spec("qwen3-8b", "Qwen3 8B", 4096, 151936, cpu=(1, 128)),
    Spec("mistral-7b", "Mistral 7B", 4096, 32768, cpu=(2, 128)),
    Spec(
      "mistral-7b-d256",
      "Mistral 7B vocabulary, hidden size scaled to 256",
      256,
      32768,
      cpu=(4, 256),
      accel=None,
      quick=(2, 128),
    ),
  )
}
#: ``--quick`` runs this head on CPU, this one on accelerators.
QUICK_SPEC = {"cpu": "mistral-7b-d256", "accel": "llama3-8b"}
FRACTIONS = (1.0, 0.5, 0.25)
QUICK_FRACTIONS = (1.0, 0.25)


@dataclasses.dataclass(frozen=True)
class Case:
  """One spec resolved for a backend: the shapes and dtype that are actually run."""

  spec: Spec
  batch: int
  length: int
  dtype: str = "float32"
  token_chunk: int | None = None
  """The fused kernels' ``token_chunk`` (None: the library default)."""

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  @property
  def hidden(self) -> int:
    return self.spec.hidden

  @property
  def vocab(self) -> int:
    return self.spec.vocab


def is_accelerator(backend: str | None = None) -> bool:
  return (backend or jax.default_backend()) != "cpu"


def resolve(
  spec: Spec,
  *,
  backend: str | None = None,
  quick: bool = False,
  dtype: str | None = None,
  tokens: tuple[int, int] | None = None,
) -> Case:
  """The :class:`Case` of ``spec`` on ``backend`` (default: JAX's default backend)."""
  accel = is_accelerator(backend) and spec.accel is not None
  if tokens is None:
    tokens = spec.accel if accel else (spec.quick if quick and spec.quick else spec.cpu)
  b, t = tokens
  if dtype is None:
    dtype = "bfloat16" if accel else "float32"
  # Scaled-down token counts would fit one library-default chunk: no span skipping at all.
  chunk = None if accel else max(8, b * t // 4 // 8 * 8)
  return Case(spec, b, t, dtype, chunk)


def span_mask(batch: int, length: int, fraction: float) -> np.ndarray:
  """Fine-tuning layout: the last ``fraction`` of every row is the target span, the rest
  context."""
  start = length - int(round(fraction * length))
  return np.broadcast_to(np.arange(length) >= start, (batch, length)).copy()


def make_inputs(case: Case, seed: int = 0):
  """``(hidden [B, T, D], weight [D, V], targets [B, T])`` with unit-scale logits."""
  k = jax.random.split(jax.random.key(seed), 3)
  dtype = jnp.dtype(case.dtype)
  d, v = case.hidden, case.vocab
  hidden = jax.random.normal(k[0], (case.batch, case.length, d), dtype)
  # Uniform with the variance of N(0, 1/D): several times cheaper to draw than a normal, which
  # matters for a [4096, 256000] weight on a CPU.
  bound = math.sqrt(3.0 / d)
  weight = jax.random.uniform(k[1], (d, v), dtype, -bound, bound)
  targets = jax.random.randint(k[2], (case.batch, case.length), 0, v, jnp.int32)
  return hidden, weight, targets


# ----------------------------------------------------------------------------- implementations

Loss = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Impl:
  """``loss(hidden, weight, targets, mask) -> f32[]``: the summed span NLL."""

  name: str
  loss: Loss
  masked: bool = True
  """False: ignores the mask and computes every position (checked against that loss)."""
  differentiable: bool = True
  """False: forward only (the matmul roofline)."""


def _logits(hidden, weight):
  """The head as a model computes it: in the inputs' dtype, f32 accumulation."""
  return jnp.einsum("btd,dv->btv", hidden, weight)


def naive_loss(hidden, weight, targets, mask):
  logp = jax.nn.log_softmax(_logits(hidden, weight).astype(F32), axis=-1)
  tok = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, tok, 0.0))


def optax_loss(hidden, weight, targets, mask):
  import optax

  tok = optax.softmax_cross_entropy_with_integer_labels(_logits(hidden, weight), targets)
  return jnp.sum(jnp.where(mask, tok, 0.0), dtype=F32)


def _import_tokamax():
  import tokamax
  from absl import flags

  # tokamax reads absl flags; unparsed, absl would parse *our* command line and reject it.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def tokamax_loss(hidden, weight, targets, mask):
  del mask  # no mask argument: every position counts
  tokamax = _import_tokamax()
  d = hidden.shape[-1]
  return tokamax.linear_softmax_cross_entropy_loss(
    hidden.reshape(-1, d), targets.reshape(-1), weight, reduction="sum"
  ).astype(F32)


@functools.cache
def tokamax_unavailable() -> str | None:
  """``None`` if tokamax's op imports and runs on a tiny input here, else the reason."""
  try:
    tokamax = _import_tokamax()
    x = jnp.ones((4, 8), F32)
    out = tokamax.linear_softmax_cross_entropy_loss(
      x, jnp.zeros((4,), jnp.int32), jnp.ones((8, 16))
    )
    jax.block_until_ready(out)
  except Exception as e:  # noqa: BLE001 -- any failure means: not a peer here
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]
  return None


def implementations(case: Case) -> dict[str, Impl]:
  """The implementations compared at ``case``, in table order (tokamax only where it runs)."""
  import jaxnll

  chunk = case.token_chunk

  def logits_path(h, w, y, m):
    return jnp.sum(jaxnll.sequence_nll(_logits(h, w), y, m))

  def fused(h, w, y, m):
    return jnp.sum(jaxnll.linear_sequence_nll(h, w, y, m, token_chunk=chunk))

  def fused_scalar(h, w, y, m):
    return jaxnll.linear_nll_loss(h, w, y, m, normalize="sum", token_chunk=chunk)[0]

  impls = [
    Impl("naive", naive_loss),
    Impl("optax", optax_loss),
    Impl("tokamax", tokamax_loss, masked=False),
    Impl("jaxnll_logits", logits_path),
    Impl("jaxnll_fused", fused),
    Impl("jaxnll_fused_scalar", fused_scalar),
    Impl("matmul", lambda h, w, y, m: _logits(h, w), differentiable=False),
  ]
  return {i.name: i for i in impls}


def reference_loss(hidden, weight, targets, mask):
  """The summed span NLL by :func:`jaxnll.reference.linear_sequence_nll`, in float32 at full
  matmul precision, one row at a time and rematerialised in the backward: the float32 logits
  of a full-size head (8 GiB at 8k tokens and V = 256000) would not fit next to the others."""
  from jaxnll import reference

  w32 = weight.astype(F32)  # the weight gradient is summed over rows in float32

  def row(total, xs):
    h, y, m = xs
    with jax.default_matmul_precision("highest"):
      nll = reference.linear_sequence_nll(h[None].astype(F32), w32, y[None], m[None])
    return total + jnp.sum(nll), None

  total, _ = jax.lax.scan(jax.checkpoint(row), jnp.zeros((), F32), (hidden, targets, mask))
  return total


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


# ----------------------------------------------------------------------------- measuring

FIELDS = (
  "run_id",
  "date",
  "device",
  "backend",
  "jax_version",
  "jaxnll_version",
  "git_commit",
  "spec",
  "model",
  "batch",
  "length",
  "tokens",
  "hidden",
  "vocab",
  "dtype",
  "token_chunk",
  "span_fraction",
  "targets",
  "impl",
  "pass",
  "metric",
  "stat",
  "value",
  "unit",
  "note",
)
PASSES = ("fwd", "fwd_bwd")


def compile_fn(fn: Callable, args: Sequence) -> tuple[Callable, float, int]:
  """``(compiled, seconds to lower and compile, temp bytes)`` of ``jax.jit(fn)`` at ``args``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  temp = int(stats.temp_size_in_bytes) if stats is not None else -1
  return compiled, seconds, temp


def timed(fn: Callable, args: Sequence) -> float:
  """Wall seconds of one call, until its results are ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def fwd_bwd(loss: Loss) -> Loss:
  """Value and gradients with respect to ``hidden`` and ``weight``."""
  return jax.value_and_grad(loss, argnums=(0, 1))


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


def _percentiles(xs: Sequence[float]) -> dict[str, float]:
  a = np.asarray(xs, np.float64)
  return dict(
    median=float(np.median(a)), p20=float(np.percentile(a, 20)), p80=float(np.percentile(a, 80))
  )


def _useful_flops(impl: str, p: str, case: Case, targets: int) -> float:
  if impl == "matmul":
    return 2.0 * case.tokens * case.hidden * case.vocab
  return (2.0 if p == "fwd" else 6.0) * targets * case.hidden * case.vocab


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}".splitlines()[0][:300]


class _Progress:
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


def steps_of(n_impls: int, n_fractions: int, repeats: int, warmup: int) -> int:
  """Progress units of one case: compiles, then per fraction checks + warm-ups + repetitions."""
  return 2 * n_impls + n_fractions * (1 + n_impls * (1 + warmup + repeats))


def memory_case(case: Case, env: dict, *, impls: dict[str, Impl] | None = None) -> list[dict]:
  """Compile-only records of ``case``: compile time and temp memory of every implementation,
  lowered from shapes alone (nothing is allocated or run, so a full-size head fits a laptop).

  Recorded with ``span_fraction`` empty and ``note="compile only"``; no check, no timing."""
  impls = implementations(case) if impls is None else impls
  dtype = jnp.dtype(case.dtype)
  b, t, d, v = case.batch, case.length, case.hidden, case.vocab
  args = (
    jax.ShapeDtypeStruct((b, t, d), dtype),
    jax.ShapeDtypeStruct((d, v), dtype),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
  )
  base = _case_fields(case, env)
  rows = []
  if "tokamax" in impls and tokamax_unavailable() is not None:
    rows.append(_record(base, "tokamax", "", "status", "skipped", 1, note=tokamax_unavailable()))
    impls = {k: x for k, x in impls.items() if k != "tokamax"}
  for name, impl in impls.items():
    fns = {"fwd": impl.loss, "fwd_bwd": fwd_bwd(impl.loss)} if impl.differentiable else {}
    try:
      for p, fn in fns.items():
        _, seconds, temp = compile_fn(fn, args)
        rows.append(_record(base, name, p, "compile_s", "value", seconds, "s", note="compile only"))
        rows.append(_record(base, name, p, "temp_bytes", "value", temp, "B", note="compile only"))
    except Exception as e:  # noqa: BLE001
      rows.append(_record(base, name, "", "status", "failed", 1, note=f"compile: {_short(e)}"))
      continue
    if fns:
      rows.append(_record(base, name, "", "status", "ok", 1, note="compile only"))
  return rows


def _case_fields(case: Case, env: dict) -> dict:
  return dict(
    env,
    spec=case.spec.name,
    model=case.spec.model,
    batch=case.batch,
    length=case.length,
    tokens=case.tokens,
    hidden=case.hidden,
    vocab=case.vocab,
    dtype=case.dtype,
    token_chunk=case.token_chunk if case.token_chunk is not None else "",
  )


def _record(base, impl, p, metric, stat, value, unit="", fraction=None, targets=None, note=""):
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


def bench_case(
  case: Case,
  env: dict,
  *,
  fractions: Sequence[float] = FRACTIONS,
  repeats: int = 5,
  warmup: int = 1,
  impls: dict[str, Impl] | None = None,
  progress: _Progress | None = None,
  seed: int = 0,
) -> list[dict]:
  """All measurements of one case as long-format records (see :data:`FIELDS`)."""
  impls = implementations(case) if impls is None else impls
  progress = progress or _Progress(0, False)
  backend = env["backend"]
  rtol = tolerance(case.dtype, backend)
  base = _case_fields(case, env)
  rows: list[dict] = []

  def record(*a, **k):
    rows.append(_record(base, *a, **k))

  hidden, weight, targets = make_inputs(case, seed)
  mask0 = jnp.asarray(span_mask(case.batch, case.length, 1.0))
  args0 = (hidden, weight, targets, mask0)

  if "tokamax" in impls:
    why = tokamax_unavailable()
    if why is not None:
      record("tokamax", "", "status", "skipped", 1, note=why)
      impls = {k: v for k, v in impls.items() if k != "tokamax"}
      progress.step(n=2 + len(fractions) * (1 + warmup + repeats))

  # Compile every pass once: the span fraction is data, not shape.
  compiled: dict[str, dict[str, Callable]] = {}
  failed: dict[str, str] = {}
  for name, impl in impls.items():
    fns = {"fwd": impl.loss}
    if impl.differentiable:
      fns["fwd_bwd"] = fwd_bwd(impl.loss)
    compiled[name] = {}
    for p in PASSES:
      progress.step(f"{case.spec.name} compile {name}")
      if p not in fns or name in failed:
        continue
      try:
        fn, seconds, temp = compile_fn(fns[p], args0)
      except Exception as e:  # noqa: BLE001 -- recorded, the suite goes on
        failed[name] = f"compile {p}: {_short(e)}"
        continue
      compiled[name][p] = fn
      record(name, p, "compile_s", "value", seconds, "s")
      record(name, p, "temp_bytes", "value", temp, "B")
  ref = {p: jax.jit(f) for p, f in (("fwd", reference_loss), ("fwd_bwd", fwd_bwd(reference_loss)))}

  for fraction in fractions:
    mask = jnp.asarray(span_mask(case.batch, case.length, fraction))
    n = int(mask.sum())
    args = (hidden, weight, targets, mask)
    progress.step(f"{case.spec.name} span {fraction:g} reference")
    want = {}
    try:
      for masked in {impl.masked for k, impl in impls.items() if k not in failed}:
        m = mask if masked else mask0
        want[masked] = {p: ref[p](hidden, weight, targets, m) for p in PASSES}
    except Exception as e:  # noqa: BLE001 -- nothing can be checked, so nothing is timed
      for name in impls:
        failed.setdefault(name, f"reference: {_short(e)}")

    live = []
    for name, impl in impls.items():
      progress.step(f"{case.spec.name} span {fraction:g} check {name}")
      if name in failed:
        progress.step(n=warmup + repeats)
        continue
      try:
        err = 0.0
        for p, fn in compiled[name].items():
          got = fn(*args)
          if impl.differentiable:  # the matmul has no reference
            err = max(err, relative_error(got, want[impl.masked][p]))
      except Exception as e:  # noqa: BLE001
        failed[name] = f"run: {_short(e)}"
        progress.step(n=warmup + repeats)
        continue
      if impl.differentiable:
        record(name, "fwd_bwd", "max_rel_err", "value", err, "", fraction, n)
      if not err <= rtol:
        failed[name] = f"check_failed: differs from jaxnll.reference by {err:.3g} > {rtol:g}"
        progress.step(n=warmup + repeats)
        continue
      for _ in range(warmup):
        for fn in compiled[name].values():
          jax.block_until_ready(fn(*args))
        progress.step()
      live.append(name)

    times = {name: {p: [] for p in compiled[name]} for name in live}
    for r in range(repeats):
      k = r % max(len(live), 1)
      order = live[k:] + live[:k]
      if r % 2:
        order = order[::-1]
      for name in order:
        for p, fn in compiled[name].items():
          times[name][p].append(timed(fn, args))
        progress.step(f"{case.spec.name} span {fraction:g} rep {r + 1}/{repeats}")

    roof = None
    if "matmul" in times and times["matmul"]["fwd"]:
      roof = _useful_flops("matmul", "fwd", case, n) / float(np.median(times["matmul"]["fwd"]))
    for name in live:
      for p, ts in times[name].items():
        if not ts:
          continue
        for stat, v in _percentiles(ts).items():
          record(name, p, "time_s", stat, v, "s", fraction, n)
        if "optax" in times and name != "optax" and p in times["optax"]:
          ratios = np.asarray(ts) / np.asarray(times["optax"][p])
          for stat, v in _percentiles(ratios).items():
            record(name, p, "ratio_vs_optax", stat, v, "x", fraction, n)
        flops = _useful_flops(name, p, case, n) / float(np.median(ts))
        record(name, p, "flops_per_s", "median", flops, "FLOP/s", fraction, n)
        if roof:
          record(name, p, "matmul_fraction", "median", flops / roof, "", fraction, n)

  for name in impls:
    if name in failed:
      kind = "check_failed" if failed[name].startswith("check_failed") else "failed"
      record(name, "", "status", kind, 1, note=failed[name])
    else:
      record(name, "", "status", "ok", 1)
  return rows


# ----------------------------------------------------------------------------- files


def save(rows: Iterable[dict], out: str) -> None:
  """Appends ``rows`` to ``out/bench.csv`` and ``out/bench.jsonl``."""
  rows = list(rows)
  if not rows:
    return
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "bench.csv")
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    if new:
      w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "bench.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps({k: r.get(k, "") for k in FIELDS}) + "\n")


def load(out: str) -> list[dict]:
  """Every record of ``out/bench.jsonl``."""
  path = os.path.join(out, "bench.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- report

ORDER = (
  "naive",
  "optax",
  "tokamax",
  "jaxnll_logits",
  "jaxnll_fused",
  "jaxnll_fused_scalar",
  "torch_naive",
  "torch_linear_cross_entropy",
  "liger",
  "cce",
  "matmul",
  "torch_matmul",
)


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "x"


def _group_key(r: dict) -> tuple:
  return (r["device"], r["spec"], r["dtype"], int(r["tokens"]))


def latest(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  """Per ``(device, spec, dtype, tokens)``: the records of each implementation's latest run."""
  groups: dict[tuple, dict[str, dict[str, list[dict]]]] = {}
  for r in rows:
    groups.setdefault(_group_key(r), {}).setdefault(r["impl"], {}).setdefault(
      r["run_id"], []
    ).append(r)
  out = {}
  for key, by_impl in groups.items():
    chosen = []
    for runs in by_impl.values():
      run = max(runs.values(), key=lambda rs: rs[0]["date"])
      chosen += run
    out[key] = chosen
  return dict(sorted(out.items()))


def _index(rows: Sequence[dict]) -> dict[tuple, float]:
  idx = {}
  for r in rows:
    f = r["span_fraction"]
    f = None if f == "" else float(f)
    idx[(r["impl"], r["pass"], r["metric"], r["stat"], f)] = r["value"]
  return idx


def _impls_in(rows: Sequence[dict]) -> list[str]:
  names = {r["impl"] for r in rows}
  return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def _fmt(x, digits=3) -> str:
  if x is None or x == "" or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return f"{x:.{digits}g}"


def _ms(seconds: float) -> str:
  """Milliseconds with 3-4 significant digits, never in exponent notation."""
  x = seconds * 1e3
  for bound, digits in ((100, 0), (10, 1), (1, 2)):
    if x >= bound:
      return f"{x:.{digits}f}"
  return f"{x:.3g}"


def _memory_table(rows: Sequence[dict], idx: dict) -> list[str]:
  """Compile-only groups: temp memory and compile time, no timing."""
  lines = [
    "Compile only (`--memory-only`): nothing was run or timed. Buffers are those of this "
    "device's compiler; XLA:CPU computes 16-bit matmuls in float32, so on a CPU the logits "
    "paths hold float32 `[tokens, V]` copies that a GPU would not make.",
    "",
    "| implementation | temp MiB fwd | temp MiB fwd+bwd | × optax | compile s fwd+bwd |",
    "|---|---:|---:|---:|---:|",
  ]
  base = idx.get(("optax", "fwd_bwd", "temp_bytes", "value", None))
  notes = []
  for name in _impls_in(rows):
    status = next((r for r in rows if r["impl"] == name and r["metric"] == "status"), None)
    if status is not None and status["stat"] != "ok":
      notes.append(f"- `{name}`: {status['stat']} — {status['note']}")
      continue
    fwd = idx.get((name, "fwd", "temp_bytes", "value", None))
    both = idx.get((name, "fwd_bwd", "temp_bytes", "value", None))
    if both is None:
      continue
    ratio = _fmt(both / base) if base else "–"
    comp = _fmt(idx.get((name, "fwd_bwd", "compile_s", "value", None)))
    lines.append(f"| {name} | {fwd / 2**20:.5g} | {both / 2**20:.5g} | {ratio} | {comp} |")
  return lines + ([""] + notes if notes else [])


def markdown(groups: dict[tuple, list[dict]]) -> str:
  """The results as markdown: one table per head and device."""
  lines = []
  for key, rows in groups.items():
    device, spec, dtype, tokens = key
    r0 = rows[0]
    idx = _index(rows)
    fractions = sorted(
      {float(r["span_fraction"]) for r in rows if r["span_fraction"] != ""}, reverse=True
    )
    chunk = f", fused token chunk {r0['token_chunk']}" if r0["token_chunk"] != "" else ""
    lines += [
      f"### {spec}: {r0['model']}",
      "",
      f"{r0['batch']} × {r0['length']} tokens, D = {r0['hidden']}, V = {r0['vocab']}, {dtype}"
      f"{chunk}. Device: {device}.",
      "",
    ]
    runs = {}
    for r in rows:
      runs.setdefault(r["run_id"], r)
    for r in sorted(runs.values(), key=lambda r: r["date"]):
      impls = sorted({x["impl"] for x in rows if x["run_id"] == r["run_id"]})
      lines.append(
        f"- run `{r['run_id']}` ({', '.join(impls)}): {r['date']}, jax {r['jax_version']}, "
        f"jaxnll {r['jaxnll_version']} at `{r['git_commit']}`"
      )
    if not any(r["metric"] == "time_s" for r in rows):
      lines += ["", *_memory_table(rows, idx), ""]
      continue
    lines += [
      "",
      "| implementation | span | fwd+bwd ms (p20–p80) | × optax | fwd ms (p20–p80) | × optax "
      "| temp MiB fwd+bwd | × optax | % of matmul fwd+bwd | compile s fwd+bwd |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    optax_mem = idx.get(("optax", "fwd_bwd", "temp_bytes", "value", None))
    peer_runs = {r["run_id"] for r in rows if r["impl"] == "optax"}
    for name in _impls_in(rows):
      status = next((r for r in rows if r["impl"] == name and r["metric"] == "status"), None)
      if status is not None and status["stat"] != "ok":
        notes.append(f"- `{name}`: {status['stat']} — {status['note']}")
        continue
      paired = any(r["run_id"] in peer_runs for r in rows if r["impl"] == name)
      for f in fractions:
        cells = []
        for p in ("fwd_bwd", "fwd"):
          med = idx.get((name, p, "time_s", "median", f))
          if med is None:
            cells += ["–", "–"]
            continue
          lo, hi = idx.get((name, p, "time_s", "p20", f)), idx.get((name, p, "time_s", "p80", f))
          cells.append(f"{_ms(med)} ({_ms(lo)}–{_ms(hi)})")
          if name == "optax":
            cells.append("1")
          elif paired:
            cells.append(_fmt(idx.get((name, p, "ratio_vs_optax", "median", f))))
          else:  # another process: ratio of medians, not of interleaved pairs
            o = idx.get(("optax", p, "time_s", "median", f))
            cells.append(f"{_fmt(med / o)}†" if o else "–")
        if all(c == "–" for c in cells):
          continue
        mem = idx.get((name, "fwd_bwd", "temp_bytes", "value", None))
        mem_cells = ["–", "–"]
        if mem is not None and mem >= 0:
          mem_cells = [f"{mem / 2**20:.4g}", _fmt(mem / optax_mem) if optax_mem else "–"]
        frac = idx.get((name, "fwd_bwd", "matmul_fraction", "median", f))
        if frac is None:
          frac = idx.get((name, "fwd", "matmul_fraction", "median", f))
        comp = idx.get((name, "fwd_bwd", "compile_s", "value", None))
        if comp is None:
          comp = idx.get((name, "fwd", "compile_s", "value", None))
        lines.append(
          f"| {name} | {f:g} | "
          + " | ".join(cells)
          + " | "
          + " | ".join(mem_cells)
          + f" | {_fmt(None if frac is None else 100 * frac, 3)} | {_fmt(comp)} |"
        )
    lines += [""] + notes + ([""] if notes else [])
  lines += [
    "Time: median over interleaved repetitions after warm-up (p20–p80 in brackets); "
    "× optax: median of the per-repetition ratio (†: ratio of medians from a separate "
    "process). Temp memory: XLA's `memory_analysis()` of the compiled forward + backward "
    "(torch peers: peak allocation above inputs and outputs). % of matmul: useful FLOP/s "
    "(6·targets·D·V forward + backward, 2·targets·D·V forward) over the rate of a plain "
    "[tokens, D] @ [D, V] matmul timed in the same run (it writes the [tokens, V] logits, "
    "which the fused kernels never do, so at a small D they can exceed it). Every "
    "implementation was checked "
    "against `jaxnll.reference` before timing; tokamax takes no mask and computes every "
    "position.",
    "",
  ]
  return "\n".join(lines)


def plot(key: tuple, rows: Sequence[dict], path: str) -> None:
  """Three panels: fwd+bwd time × optax vs span fraction, temp memory, % of matmul."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  device, spec, dtype, tokens = key
  idx = _index(rows)
  names = [
    n for n in _impls_in(rows) if any(r["impl"] == n and r["metric"] == "time_s" for r in rows)
  ]
  fractions = sorted({float(r["span_fraction"]) for r in rows if r["span_fraction"] != ""})
  fig, (ax_t, ax_m, ax_f) = plt.subplots(1, 3, figsize=(15, 4.4))
  for name in names:
    if name in ("matmul", "torch_matmul"):
      continue
    pts = []
    for f in fractions:
      med = idx.get((name, "fwd_bwd", "ratio_vs_optax", "median", f))
      lo = idx.get((name, "fwd_bwd", "ratio_vs_optax", "p20", f))
      hi = idx.get((name, "fwd_bwd", "ratio_vs_optax", "p80", f))
      if name == "optax":
        med = lo = hi = 1.0
      elif med is None:
        t, o = (
          idx.get((name, "fwd_bwd", "time_s", "median", f)),
          idx.get(("optax", "fwd_bwd", "time_s", "median", f)),
        )
        if t is None or not o:
          continue
        med = lo = hi = t / o
      pts.append((f, med, med - lo, hi - med))
    if pts:
      f, m, el, eh = zip(*pts, strict=True)
      ax_t.errorbar(f, m, yerr=[el, eh], marker="o", capsize=3, label=name)
  ax_t.set_xlabel("span fraction (target tokens / tokens)")
  ax_t.set_ylabel("fwd+bwd time / optax (median, p20–p80)")
  ax_t.set_yscale("log")
  ax_t.grid(alpha=0.3, which="both")
  ax_t.legend(fontsize=7)

  mem = [
    (n, idx.get((n, "fwd_bwd", "temp_bytes", "value", None)))
    for n in names
    if n not in ("matmul", "torch_matmul")
  ]
  mem = [(n, b) for n, b in mem if b is not None and b > 0]
  if mem:
    base = dict(mem).get("optax")
    ax_m.barh([n for n, _ in mem][::-1], [b / 2**20 for _, b in mem][::-1], color="tab:blue")
    for n, b in mem:
      label = f" {b / 2**20:.3g} MiB" + (f" ({b / base:.2g}× optax)" if base else "")
      ax_m.text(b / 2**20, n, label, va="center", fontsize=7)
    top = max(b for _, b in mem) / 2**20
    if top / (min(b for _, b in mem) / 2**20) > 20:
      ax_m.set_xscale("log")
      ax_m.set_xlim(right=top * 30)
    else:
      ax_m.set_xlim(0, top * 1.6)
  ax_m.set_xlabel("temp memory, fwd+bwd (MiB)")
  ax_m.grid(alpha=0.3, axis="x", which="both")

  for name in names:
    p = "fwd" if name in ("matmul", "torch_matmul") else "fwd_bwd"
    pts = [
      (f, 100 * v)
      for f in fractions
      if (v := idx.get((name, p, "matmul_fraction", "median", f))) is not None
    ]
    if pts and name not in ("matmul", "torch_matmul"):
      ax_f.plot(*zip(*pts, strict=True), marker="o", label=name)
  ax_f.axhline(100, color="k", lw=0.8, ls="--", label="plain matmul")
  ax_f.set_xlabel("span fraction")
  ax_f.set_ylabel("useful FLOP/s, % of matmul (fwd+bwd)")
  ax_f.grid(alpha=0.3)
  ax_f.legend(fontsize=7)
  r0 = rows[0]
  fig.suptitle(
    f"{spec} ({r0['model']}): {r0['batch']}×{r0['length']} tokens, D={r0['hidden']}, "
    f"V={r0['vocab']}, {dtype} — {device}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(out: str) -> tuple[str, list[str]]:
  """Writes ``out/bench.md`` and one PNG per head and device from ``out/bench.jsonl``."""
  groups = latest(load(out))
  md = os.path.join(out, "bench.md")
  pngs = []
  for key, rows in groups.items():
    if not any(r["metric"] == "time_s" for r in rows):
      continue  # nothing ran (every implementation skipped or failed): the table says why
    path = os.path.join(out, f"bench_{_slug(key[1])}_{_slug(key[0])}_{key[2]}.png")
    plot(key, rows, path)
    pngs.append(path)
  text = "## Benchmark results\n\n" + markdown(groups)
  text += "\nPlots: " + ", ".join(f"`{os.path.basename(p)}`" for p in pngs) + "\n"
  with open(md, "w") as f:
    f.write(text)
  return md, pngs


# ----------------------------------------------------------------------------- command line


def _tokens(s: str) -> tuple[int, int]:
  b, t = s.lower().split("x")
  return int(b), int(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The options of ``jaxnll bench``."""
  from jaxnll.cli import (
    batch_tokens,
    fraction_list,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
  )

  p.add_argument("--quick", action="store_true", help="one small case, 2 span fractions, 3 reps")
  p.add_argument(
    "--spec",
    action="append",
    choices=sorted(SPECS),
    help="head to run (repeatable; default: all heads of this backend)",
  )
  p.add_argument(
    "--out",
    type=output_dir,
    default="bench/results",
    help="results directory (default: %(default)s)",
  )
  p.add_argument("--impl", action="append", help="implementation to run (repeatable; default: all)")
  p.add_argument(
    "--fractions", type=fraction_list, help="span fractions, comma separated (default: 1,0.5,0.25)"
  )
  p.add_argument(
    "--repeats", type=positive_int, help="interleaved repetitions (default: 5, quick: 3)"
  )
  p.add_argument(
    "--warmup", type=nonnegative_int, help="warm-up calls after the check (default: 1, quick: 0)"
  )
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the dtype")
  p.add_argument("--tokens", type=batch_tokens, help="override B x T, e.g. 2x128")
  p.add_argument(
    "--budget-s", type=positive_float, help="start no new head after this many seconds"
  )
  p.add_argument(
    "--memory-only",
    action="store_true",
    help="compile only, at the accelerator sizes (bf16, 4x2048 tokens) whatever the backend: "
    "temp memory and compile time of every implementation, nothing run",
  )
  p.add_argument("--no-report", action="store_true", help="do not write the table and plots")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  """Runs the suite for parsed ``args``; 0 if every implementation passed its check."""
  t_start = time.perf_counter()
  backend = jax.default_backend()
  accel = is_accelerator(backend)
  if args.spec:
    names = args.spec
  elif args.quick:
    names = [QUICK_SPEC["accel" if accel else "cpu"]]
  else:
    names = [n for n, s in SPECS.items() if s.accel is not None or not accel]
  fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
  if args.fractions:
    fractions = tuple(args.fractions)  # parsed by cli.fraction_list
  repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
  warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
  if args.memory_only and not args.spec:
    names = [n for n, s in SPECS.items() if s.accel is not None]
  size_of = "gpu" if args.memory_only else backend
  cases = [
    resolve(SPECS[n], backend=size_of, quick=args.quick, dtype=args.dtype, tokens=args.tokens)
    for n in names
  ]
  env = environment()
  what = (
    "compile only"
    if args.memory_only
    else f"span fractions {list(fractions)}, {repeats} repetitions"
  )
  print(
    f"jaxnll bench: {env['device']}, jax {env['jax_version']}, commit {env['git_commit']}; "
    f"{len(cases)} head(s), {what}",
    flush=True,
  )
  if args.memory_only:
    return _run_memory(args, cases, env)
  all_impls = [implementations(c) for c in cases]
  if args.impl:
    unknown = set(args.impl) - set(all_impls[0])
    if unknown:
      raise ValueError(f"unknown --impl {sorted(unknown)}; choose from {sorted(all_impls[0])}")
    keep = set(args.impl) | {"optax", "matmul"}
    all_impls = [{k: v for k, v in im.items() if k in keep} for im in all_impls]
  total = sum(steps_of(len(im), len(fractions), repeats, warmup) for im in all_impls)
  progress = _Progress(total, not args.no_progress)
  bad = 0
  try:
    for case, impls in zip(cases, all_impls, strict=True):
      if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
        progress.write(f"budget of {args.budget_s:g} s spent: {case.spec.name} not run")
        continue
      rows = bench_case(
        case,
        env,
        fractions=fractions,
        repeats=repeats,
        warmup=warmup,
        impls=impls,
        progress=progress,
      )
      save(rows, args.out)  # each head as soon as it is done: a killed run keeps the others
      for r in rows:
        if r["metric"] == "status" and r["stat"] in ("failed", "check_failed"):
          bad += 1
          progress.write(f"{case.spec.name} {r['impl']}: {r['note']}")
  finally:
    progress.close()
  if not args.no_report:
    md, pngs = report(args.out)
    print(f"results appended to {os.path.join(args.out, 'bench.csv')} (and .jsonl)")
    print(f"table: {md}; plots: {', '.join(pngs)}")
  print(f"done in {time.perf_counter() - t_start:.0f} s")
  return 1 if bad else 0


def _run_memory(args: argparse.Namespace, cases: Sequence[Case], env: dict) -> int:
  bad = 0
  for case in cases:
    rows = memory_case(case, env)
    save(rows, args.out)
    for r in rows:
      if r["metric"] == "temp_bytes" and r["pass"] == "fwd_bwd":
        print(f"{case.spec.name:10s} {r['impl']:20s} temp fwd+bwd {r['value'] / 2**20:10.1f} MiB")
      if r["metric"] == "status" and r["stat"] == "failed":
        bad += 1
        print(f"{case.spec.name} {r['impl']}: {r['note']}")
  if not args.no_report:
    md, _ = report(args.out)
    print(f"table: {md}")
  return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m jaxnll.bench [--quick] [--spec NAME] [--out DIR]``."""
  parser = argparse.ArgumentParser(prog="jaxnll bench", description=__doc__.split("\n")[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
