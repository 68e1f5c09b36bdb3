"""The fused head + loss on a GPU or TPU: jaxnll's kernels next to their JAX peers, full size.

For each real head (Gemma-2 2B, Llama-3 8B, Qwen3 8B), each token count (4 × 2048 and
8 × 2048, bfloat16) and each span fraction (1, ½, ¼: the last fraction of every row is the
target span), the forward + backward (value, ``∂hidden``, ``∂weight``) of

* jaxnll ``linear_nll_loss(..., normalize="sum")`` with ``implementation=`` ``auto``,
  ``token_chunked``, ``chunked``, ``xla`` (logits materialised) and, on TPU, ``pallas_tpu``;
* optax (``softmax_cross_entropy_with_integer_labels`` on materialised logits), tokamax
  (``linear_softmax_cross_entropy_loss``) and the ``jax-cce`` package where they import
  (these two take no mask: they score every position, and are checked against that loss);

is checked against a float32 reference, then timed (warm-up, median of interleaved repeats,
``block_until_ready``).  Each row: time, the call's device memory as XLA plans it
(arguments + outputs + temp, compile-only), useful TFLOP/s (``6·N·D·V`` over the ``N`` scored
tokens: each logits block computed once) and its fraction of the chip's dense bf16 peak
(:data:`PEAK_TFLOPS`), and the device's name.  Records go to ``OUT/accelerators.jsonl``, the
table to ``OUT/accelerators.md``.

  python bench/accelerators.py --out bench/results [--budget-s 300]
  python bench/accelerators.py --smoke      # tiny shapes, any backend (checks the script)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxnll  # noqa: E402

F32 = jnp.float32
#: name: (model, D, V)
HEADS = {
  "llama3-8b": ("Llama-3 8B", 4096, 128256),
  "gemma2-2b": ("Gemma-2 2B", 2304, 256000),
  "qwen3-8b": ("Qwen3 8B", 4096, 151936),
}
TOKENS = ((4, 2048), (8, 2048))
FRACTIONS = (1.0, 0.5, 0.25)
#: Dense bf16 peak TFLOP/s by device-kind substring (lower case; first match wins).
PEAK_TFLOPS = (
  ("h200", 989.0),
  ("h100", 989.0),
  ("a100", 312.0),
  ("v6", 918.0),  # TPU v6e ("TPU v6 lite")
  ("v5p", 459.0),
  ("v5 lite", 197.0),  # TPU v5e
  ("v5e", 197.0),
)


def peak_tflops(kind: str) -> float | None:
  kind = kind.lower()
  return next((p for key, p in PEAK_TFLOPS if key in kind), None)


# ----------------------------------------------------------------------------- losses


def _fused(implementation):
  def loss(h, w, y, m):
    return jaxnll.linear_nll_loss(h, w, y, m, normalize="sum", implementation=implementation)[0]

  return loss


def _optax(h, w, y, m):
  import optax

  logits = jnp.einsum("btd,dv->btv", h, w)
  tok = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(jnp.where(m, tok, 0.0), dtype=F32)


def _tokamax(h, w, y, m):
  del m  # no mask: every position
  import tokamax
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  d = h.shape[-1]
  out = tokamax.linear_softmax_cross_entropy_loss(
    h.reshape(-1, d), y.reshape(-1), w, reduction="sum"
  )
  return out.astype(F32)


def _jax_cce(h, w, y, m):
  del m  # no mask: every position
  from jax_cce import linear_cross_entropy

  d = h.shape[-1]
  # Its head is [V, D]: the transposed copy is part of what it costs here.
  out = linear_cross_entropy(h.reshape(-1, d), w.T, y.reshape(-1))
  return (out * y.size).astype(F32)  # its default reduction is the mean


def _reference(h, w, y, m):
  """Float32, highest matmul precision, one row at a time, rematerialised in the backward."""
  w32 = w.astype(F32)

  def row(total, xs):
    hr, yr, mr = xs
    with jax.default_matmul_precision("highest"):
      z = hr.astype(F32) @ w32
    tok = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, yr[:, None], axis=-1)[:, 0]
    return total + jnp.sum(jnp.where(mr, tok, 0.0)), None

  total, _ = jax.lax.scan(jax.checkpoint(row), jnp.zeros((), F32), (h, y, m))
  return total


def implementations(backend: str) -> dict[str, tuple]:
  """``{name: (loss, masked)}`` in table order; ``masked=False``: scores every position."""
  impls = {"jaxnll_auto": (_fused("auto"), True)}
  if backend == "tpu":
    impls["jaxnll_pallas_tpu"] = (_fused("pallas_tpu"), True)
  impls["jaxnll_token_chunked"] = (_fused("token_chunked"), True)
  impls["jaxnll_chunked"] = (_fused("chunked"), True)
  impls["jaxnll_xla"] = (_fused("xla"), True)
  impls["optax"] = (_optax, True)
  impls["tokamax"] = (_tokamax, False)
  impls["jax_cce"] = (_jax_cce, False)
  return impls


# ----------------------------------------------------------------------------- measuring


def span_mask(batch: int, length: int, fraction: float) -> np.ndarray:
  start = length - int(round(fraction * length))
  return np.broadcast_to(np.arange(length) >= start, (batch, length)).copy()


def relative_error(got, want) -> float:
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = jnp.asarray(g, F32), jnp.asarray(w, F32)
    err = float(jnp.max(jnp.abs(g - w))) / max(float(jnp.max(jnp.abs(w))), 1e-30)
    worst = max(worst, err if math.isfinite(err) else math.inf)
  return worst


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}".splitlines()[0][:240]


def bench_head(name, batch, length, env, *, fractions, repeats, rtol=3e-2, only=None):
  """Records of one head at one token count."""
  model, d, v = HEADS[name]
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (batch, length, d), F32).astype(jnp.bfloat16)
  w = (jax.random.normal(k[1], (d, v), F32) / np.sqrt(d)).astype(jnp.bfloat16)
  y = jax.random.randint(k[2], (batch, length), 0, v, jnp.int32)
  full = jnp.asarray(span_mask(batch, length, 1.0))
  base = dict(env, head=name, model=model, d=d, v=v, batch=batch, length=length, dtype="bfloat16")
  rows = []
  impls = implementations(env["backend"])
  if only:
    impls = {n: i for n, i in impls.items() if n in only}
  compiled, failed = {}, {}
  for impl, (loss, _) in impls.items():
    try:
      t0 = time.perf_counter()
      c = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(h, w, y, full).compile()
      mem = c.memory_analysis()
      planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      compiled[impl] = (c, int(planned), int(mem.temp_size_in_bytes), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 -- a peer that does not build here is reported
      failed[impl] = f"compile: {_short(e)}"
  ref = jax.jit(jax.value_and_grad(_reference, (0, 1)))
  for fraction in fractions:
    mask = jnp.asarray(span_mask(batch, length, fraction))
    want = {True: ref(h, w, y, mask), False: None}
    live = []
    for impl, (c, *_rest) in compiled.items():
      if impl in failed:
        continue
      masked = impls[impl][1]
      if not masked and want[False] is None:
        want[False] = ref(h, w, y, full)
      try:
        err = relative_error(c(h, w, y, mask), want[masked])
      except Exception as e:  # noqa: BLE001
        failed[impl] = f"run: {_short(e)}"
        continue
      if not err <= rtol:
        failed[impl] = f"check: differs from the f32 reference by {err:.3g} > {rtol:g}"
        continue
      jax.block_until_ready(c(h, w, y, mask))  # warm-up
      live.append((impl, err))
    times = {impl: [] for impl, _ in live}
    for r in range(repeats):
      order = [impl for impl, _ in live]
      order = order[r % max(len(order), 1) :] + order[: r % max(len(order), 1)]
      for impl in order[:: -1 if r % 2 else 1]:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[impl][0](h, w, y, mask))
        times[impl].append(time.perf_counter() - t0)
    for impl, err in live:
      masked = impls[impl][1]
      n = int(mask.sum()) if masked else batch * length
      t = float(np.median(times[impl]))
      tflops = 6.0 * n * d * v / t / 1e12
      peak = peak_tflops(env["device"])
      _, planned, temp, compile_s = compiled[impl]
      rows.append(
        dict(
          base,
          impl=impl,
          span_fraction=fraction,
          scored_tokens=n,
          time_ms=1e3 * t,
          device_mib=planned / 2**20,
          temp_mib=temp / 2**20,
          tflops=tflops,
          peak_fraction=None if peak is None else tflops / peak,
          max_rel_err=err,
          compile_s=compile_s,
          status="ok",
        )
      )
  for impl, why in failed.items():
    rows.append(dict(base, impl=impl, status="skipped", note=why))
  return rows


def table(rows) -> str:
  ok = [r for r in rows if r["status"] == "ok"]
  if not rows:
    return "(no records)"
  first = rows[0]
  lines = [
    f"Fused head + loss, forward + backward, bf16 — {first['device']} ({first['backend']}), "
    f"jax {first['jax']}, {first['date']}",
    "",
    "| head | tokens | span | impl | time ms | device MiB | TFLOP/s | of peak | rel err |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in ok:
    frac = "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.0f} %"
    lines.append(
      f"| {r['head']} | {r['batch']}×{r['length']} | {r['span_fraction']:g} | {r['impl']} | "
      f"{r['time_ms']:.2f} | {r['device_mib']:.0f} | {r['tflops']:.1f} | {frac} | "
      f"{r['max_rel_err']:.1e} |"
    )
  skipped = {(r["impl"], r["note"]) for r in rows if r["status"] != "ok"}
  if skipped:
    lines += [""] + [f"- {impl} skipped: {note}" for impl, note in sorted(skipped)]
  lines += [
    "",
    "TFLOP/s counts 6·N·D·V (N scored tokens; each logits block computed once); device MiB is "
    "arguments + outputs + temp as XLA plans the call (compile-only).",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench/results")
  p.add_argument("--heads", default=",".join(HEADS))
  p.add_argument("--tokens", default=",".join(f"{b}x{t}" for b, t in TOKENS))
  p.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--impl", action="append", help="only these implementations (repeatable)")
  p.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this")
  p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  env = dict(
    device=dev.device_kind,
    backend=dev.platform,
    jax=jax.__version__,
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  )
  if args.smoke:
    HEADS["smoke"] = ("smoke test", 64, 1000)
    heads, tokens = ["smoke"], [(2, 64)]
  else:
    heads = args.heads.split(",")
    tokens = [tuple(int(x) for x in s.split("x")) for s in args.tokens.split(",")]
  fractions = [float(f) for f in args.fractions.split(",")]
  start = time.perf_counter()
  rows = []
  os.makedirs(args.out, exist_ok=True)
  for b, t in tokens:
    for head in heads:
      if time.perf_counter() - start > args.budget_s:
        print(f"accelerators: budget spent, {head} {b}x{t} not started", flush=True)
        continue
      new = bench_head(head, b, t, env, fractions=fractions, repeats=args.repeats, only=args.impl)
      rows += new
      for r in new:
        if r["status"] == "ok":
          print(
            f"{head} {b}x{t} span {r['span_fraction']:g} {r['impl']}: {r['time_ms']:.2f} ms, "
            f"{r['device_mib']:.0f} MiB, {r['tflops']:.1f} TFLOP/s",
            flush=True,
          )
      # Saved case by case: a run stopped by its time limit keeps what it measured.
      with open(os.path.join(args.out, "accelerators.jsonl"), "a") as f:
        for r in new:
          f.write(json.dumps(r) + "\n")
      with open(os.path.join(args.out, "accelerators.md"), "w") as f:
        f.write(table(rows) + "\n")
  print()
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
