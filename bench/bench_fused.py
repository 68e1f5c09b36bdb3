"""Benchmark of the fused head + loss (``jaxnll.fused``) against the materialised-logits paths.

Two measurements, side by side in one process:

* **memory** — ``jax.jit(step).lower(...).compile().memory_analysis()`` temp bytes of
  forward + backward (gradients w.r.t. ``hidden`` and ``weight``) at real model heads; compile
  only, nothing runs, so a Llama-3-8B head fits on a laptop CPU;
* **time** — forward + backward at a CPU-sized head for several span fractions (the share of
  positions that are targets), as the median over interleaved pairs ``(optax, candidate)`` of
  ``t_candidate / t_optax``.  Every path is checked against the reference before it is timed.

Paths: ``optax`` (``softmax_cross_entropy_with_integer_labels`` on ``hidden @ weight``, masked
sum), ``reference`` (``linear_sequence_nll(implementation="xla")``: materialised logits +
``jaxnll.sequence_nll``), ``per_sample`` (``linear_sequence_nll``), ``scalar``
(``linear_nll_loss``) and, where it imports, ``tokamax``
(``tokamax.linear_softmax_cross_entropy_loss``, which takes no mask: it always computes every
position, i.e. it is timed at full cost whatever the span).

Run ``python bench/bench_fused.py`` (``--help`` for options); results are appended to
``bench/results/fused.json`` (long format) and plotted to ``bench/results/fused.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnll.fused import linear_nll_loss, linear_sequence_nll

# Named heads: (hidden size D, vocabulary V).  "cpu" is scaled to time on a laptop CPU.
HEADS = {
  "llama3-8b": (4096, 128256),
  "qwen3-8b": (4096, 151936),
  "gemma2-2b": (2304, 256000),
  "cpu": (256, 32768),
}
PATHS = ("optax", "reference", "per_sample", "scalar", "tokamax")
# Plot styles: overlapping curves (equal memory, for instance) stay visible.
STYLE = {
  "optax": dict(marker="o", linestyle="-", color="tab:blue"),
  "reference": dict(marker="s", linestyle="--", color="tab:orange"),
  "per_sample": dict(marker="^", linestyle="-", color="tab:green"),
  "scalar": dict(marker="v", linestyle=":", color="tab:red"),
  "tokamax": dict(marker="x", linestyle="-.", color="tab:purple"),
}
LABELS = {"tokamax": "tokamax (no mask: all positions)"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  length: int
  head: str
  dtype: str = "float32"

  @property
  def hidden_size(self) -> int:
    return HEADS[self.head][0]

  @property
  def vocab(self) -> int:
    return HEADS[self.head][1]


# ----------------------------------------------------------------------------- the paths


def _optax_loss(hidden, weight, targets, mask):
  logits = hidden @ weight
  tok = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(jnp.where(mask, tok, 0.0), dtype=jnp.float32)


def _import_tokamax():
  import tokamax
  from absl import flags

  # tokamax reads absl flags; unparsed, absl would parse *our* command line and reject it.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def _tokamax_loss(hidden, weight, targets, mask):
  del mask  # tokamax has no mask: every position counts.
  tokamax = _import_tokamax()

  d = hidden.shape[-1]
  return tokamax.linear_softmax_cross_entropy_loss(
    hidden.reshape(-1, d), targets.reshape(-1), weight, reduction="sum"
  )


def loss_fns(token_chunk=None, vocab_chunk=None) -> dict[str, Callable]:
  """Each path as ``loss(hidden, weight, targets, mask) -> f32[]`` (the summed span NLL)."""
  chunks = dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk)
  fns = {
    "optax": _optax_loss,
    "reference": lambda h, w, y, m: jnp.sum(linear_sequence_nll(h, w, y, m, implementation="xla")),
    "per_sample": lambda h, w, y, m: jnp.sum(linear_sequence_nll(h, w, y, m, **chunks)),
    "scalar": lambda h, w, y, m: linear_nll_loss(h, w, y, m, normalize="sum", **chunks)[0],
  }
  why = tokamax_unavailable()
  if why is None:
    fns["tokamax"] = _tokamax_loss
  return fns


def tokamax_unavailable() -> str | None:
  """``None`` if tokamax's op imports and runs on a tiny input, else the reason."""
  try:
    tokamax = _import_tokamax()
    x = jnp.ones((4, 8), jnp.float32)
    tokamax.linear_softmax_cross_entropy_loss(x, jnp.zeros((4,), jnp.int32), jnp.ones((8, 16)))
  except Exception as e:  # noqa: BLE001 -- any failure means: not a peer here
    return f"{type(e).__name__}: {e}"
  return None


def train_step(loss: Callable) -> Callable:
  """Forward + backward: value and gradients w.r.t. ``hidden`` and ``weight``."""
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def span_mask(batch: int, length: int, fraction: float) -> np.ndarray:
  """SFT layout: the last ``fraction`` of every row is the target span, the rest context."""
  start = length - int(round(fraction * length))
  return np.broadcast_to(np.arange(length) >= start, (batch, length)).copy()


def make_inputs(shape: Shape, fraction: float, seed: int = 0):
  d, v = shape.hidden_size, shape.vocab
  k = jax.random.split(jax.random.key(seed), 3)
  dtype = jnp.dtype(shape.dtype)
  hidden = jax.random.normal(k[0], (shape.batch, shape.length, d)).astype(dtype)
  weight = (jax.random.normal(k[1], (d, v)) / np.sqrt(d)).astype(dtype)
  targets = jax.random.randint(k[2], (shape.batch, shape.length), 0, v)
  return hidden, weight, targets, jnp.asarray(span_mask(shape.batch, shape.length, fraction))


def check(name: str, got, want, *, rtol: float = 2e-4) -> None:
  """Value and gradients of ``name`` against the reference (relative to each array's scale)."""
  for part, g, w in zip(
    ("value", "dhidden", "dweight"), jax.tree.leaves(got), jax.tree.leaves(want), strict=True
  ):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(float(np.abs(w).max()), 1e-30)
    err = float(np.abs(g - w).max()) / scale
    if not err <= rtol:
      raise AssertionError(f"{name}: {part} differs from the reference by {err:.2e} (relative)")


# ----------------------------------------------------------------------------- memory


def temp_bytes(loss: Callable, shape: Shape) -> int:
  """Temp bytes of the compiled forward + backward (lowered from shapes only, never run)."""
  d, v = shape.hidden_size, shape.vocab
  dtype = jnp.dtype(shape.dtype)
  args = (
    jax.ShapeDtypeStruct((shape.batch, shape.length, d), dtype),
    jax.ShapeDtypeStruct((d, v), dtype),
    jax.ShapeDtypeStruct((shape.batch, shape.length), jnp.int32),
    jax.ShapeDtypeStruct((shape.batch, shape.length), jnp.bool_),
  )
  compiled = train_step(loss).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def memory_table(shapes: list[Shape], paths=PATHS) -> list[dict]:
  fns = loss_fns()
  rows = []
  for shape in shapes:
    base = temp_bytes(fns["optax"], shape)
    for name in paths:
      if name not in fns:
        continue
      b = base if name == "optax" else temp_bytes(fns[name], shape)
      rows.append(
        dict(
          bench="memory",
          path=name,
          **dataclasses.asdict(shape),
          hidden_size=shape.hidden_size,
          vocab=shape.vocab,
          metric="temp_bytes",
          value=b,
          ratio_vs_optax=b / base,
        )
      )
      print(
        f"memory {shape.head:10s} V={shape.vocab:6d} {shape.dtype:8s} {name:10s} "
        f"{b / 2**30:8.3f} GiB  ({b / base:.4f} x optax)",
        flush=True,
      )
  return rows


# ----------------------------------------------------------------------------- time


def _time_once(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def time_table(
  shape: Shape,
  fractions: list[float],
  *,
  repeats: int = 7,
  warmup: int = 1,
  paths=PATHS,
  token_chunk=None,
  vocab_chunk=None,
) -> list[dict]:
  """Median over ``repeats`` interleaved pairs of ``t_path / t_optax`` at each span fraction.

  Within a pair the order alternates (optax first on even repeats, last on odd ones) so a
  slow drift of the shared machine's load cancels out.
  """
  fns = loss_fns(token_chunk, vocab_chunk)
  steps = {name: train_step(fns[name]) for name in paths if name in fns}
  rows = []
  for fraction in fractions:
    args = make_inputs(shape, fraction)
    want = steps["reference"](*args)
    for name, step in steps.items():
      if name == "tokamax" and fraction != 1.0:
        continue  # no mask: its value is not the span's loss (its cost is the full one)
      check(name, step(*args), want)
    for _ in range(warmup):
      for step in steps.values():
        jax.block_until_ready(step(*args))
    ratios = {name: [] for name in steps if name != "optax"}
    seconds = {name: [] for name in steps}
    for rep in range(repeats):
      for name in ratios:
        pair = ("optax", name) if rep % 2 == 0 else (name, "optax")
        t = {p: _time_once(steps[p], args) for p in pair}
        ratios[name].append(t[name] / t["optax"])
        seconds[name].append(t[name])
        seconds["optax"].append(t["optax"])
    for name in steps:
      ratio = 1.0 if name == "optax" else statistics.median(ratios[name])
      sec = statistics.median(seconds[name])
      rows.append(
        dict(
          bench="time",
          path=name,
          **dataclasses.asdict(shape),
          hidden_size=shape.hidden_size,
          vocab=shape.vocab,
          span_fraction=fraction,
          metric="fwd_bwd_seconds",
          value=sec,
          ratio_vs_optax=ratio,
          ratio_min=min(ratios.get(name, [1.0])),
          ratio_max=max(ratios.get(name, [1.0])),
          repeats=repeats,
        )
      )
      print(
        f"time span={fraction:5.3f} {name:10s} median {sec * 1e3:8.1f} ms  "
        f"{ratio:6.3f} x optax (pairs: {min(ratios.get(name, [1.0])):.3f}"
        f"..{max(ratios.get(name, [1.0])):.3f})",
        flush=True,
      )
  return rows


# ----------------------------------------------------------------------------- records and plot


def environment() -> dict:
  """The columns every record carries (device, versions, commit, date): jaxnll.bench's."""
  from jaxnll import bench

  return bench.environment()


def save(rows: list[dict], path: str) -> None:
  """Appends ``rows`` to the JSON list at ``path`` (long format: one record per number)."""
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  with open(path, "w") as f:
    json.dump(old + rows, f, indent=1)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  timed = [r for r in rows if r["bench"] == "time"]
  for name in PATHS:
    pts = sorted((r["span_fraction"], r["ratio_vs_optax"]) for r in timed if r["path"] == name)
    if pts:
      ax_t.plot(*zip(*pts, strict=True), label=LABELS.get(name, name), **STYLE[name])
  ax_t.set_xlabel("span fraction (targets / positions)")
  ax_t.set_ylabel("fwd+bwd time / optax")
  if timed:
    r = timed[0]
    ax_t.set_title(
      f"time, {r['batch']}x{r['length']} tokens, D={r['hidden_size']}, "
      f"V={r['vocab']}, {r['dtype']}",
      fontsize=9,
    )
  ax_t.grid(alpha=0.3)
  if timed:
    ax_t.legend(fontsize=8)
  mem = [r for r in rows if r["bench"] == "memory"]
  for name in PATHS:
    pts = sorted((r["vocab"], r["value"] / 2**30) for r in mem if r["path"] == name)
    if pts:
      ax_m.plot(*zip(*pts, strict=True), label=LABELS.get(name, name), **STYLE[name])
  ax_m.set_xlabel("vocabulary V")
  ax_m.set_ylabel("temp memory, fwd+bwd (GiB)")
  ax_m.set_yscale("log")
  if mem:
    r = mem[0]
    ax_m.set_title(
      f"memory, {r['batch']}x{r['length']} tokens, D={r['hidden_size']}, {r['dtype']}", fontsize=9
    )
  ax_m.grid(alpha=0.3, which="both")
  if mem:
    ax_m.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", default=RESULTS, help="results directory (default: bench/results)")
  p.add_argument("--quick", action="store_true", help="fewer repeats and fractions")
  p.add_argument("--skip-time", action="store_true")
  p.add_argument("--skip-memory", action="store_true")
  p.add_argument("--repeats", type=int, default=7, help="interleaved pairs per point")
  p.add_argument("--fractions", default="1,0.5,0.25,0.125", help="span fractions to time")
  p.add_argument("--time-shape", default="4x512:cpu:float32", help="BxT:head:dtype to time")
  p.add_argument("--memory-shape", default="8x2048:llama3-8b:bfloat16", help="BxT:head:dtype")
  p.add_argument(
    "--memory-vocabs",
    default="32768,65536,128256,256000",
    help="vocabulary sizes of the memory-vs-vocabulary curve (at --memory-shape)",
  )
  p.add_argument("--token-chunk", type=int, default=None)
  p.add_argument("--vocab-chunk", type=int, default=None)


def _shape(spec: str) -> Shape:
  bt, head, dtype = spec.split(":")
  b, t = (int(x) for x in bt.split("x"))
  return Shape(b, t, head, dtype)


def run(args: argparse.Namespace) -> int:
  os.makedirs(args.out, exist_ok=True)
  env = environment()
  print(json.dumps(env))
  why = tokamax_unavailable()
  if why is not None:
    print(f"tokamax peer skipped: {why}")
  rows = []
  if not args.skip_memory:
    base = _shape(args.memory_shape)
    shapes = [base]
    for v in (int(x) for x in args.memory_vocabs.split(",") if x):
      if v != base.vocab:
        name = f"{base.head}@V={v}"
        HEADS[name] = (base.hidden_size, v)
        shapes.append(Shape(base.batch, base.length, name, base.dtype))
    rows += memory_table(shapes)
  if not args.skip_time:
    fractions = [float(x) for x in args.fractions.split(",")]
    repeats = args.repeats
    if args.quick:
      fractions, repeats = [1.0, 0.25], 3
    rows += time_table(
      _shape(args.time_shape),
      fractions,
      repeats=repeats,
      token_chunk=args.token_chunk,
      vocab_chunk=args.vocab_chunk,
    )
  rows = [dict(r, **env, tokamax=why or "ok") for r in rows]
  save(rows, os.path.join(args.out, "fused.json"))
  plot(rows, os.path.join(args.out, "fused.png"))
  print(f"wrote {len(rows)} records to {args.out}/fused.json and the plot fused.png")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
