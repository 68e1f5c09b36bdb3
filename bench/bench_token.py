"""The loss from logits against optax: ``token_nll`` / ``sequence_nll`` forward + backward.

At ``B = 8, T = 512, V = 32768`` with bfloat16 logits (the foundation's target: at most 1/10
of optax's temp memory, and no slower), side by side in one process:

* **memory**: ``memory_analysis().temp_size_in_bytes`` of the compiled value-and-gradient
  (with respect to the logits), compile only;
* **time**: the median over interleaved pairs ``(optax, candidate)`` — the order alternating
  from pair to pair — of ``t_candidate / t_optax``.

Paths: ``optax`` (``softmax_cross_entropy_with_integer_labels`` on the logits as they come,
masked sum), ``optax_f32`` (the same on ``logits.astype(float32)``, what a careful bf16 user
writes), ``token_nll`` (``jaxnll.token_nll``, masked sum) and ``sequence_nll``
(``jaxnll.sequence_nll``, summed over the batch).  Each is checked against
``jaxnll.reference.sequence_nll`` (value and gradient) before it is timed.

    python bench/bench_token.py [--batch 8 --length 512 --vocab 32768 --dtype bfloat16]
        [--fraction 1.0] [--pairs 7] [--out bench/results]

Records are appended to ``OUT/token.jsonl`` (one number per record).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxnll  # noqa: E402
from jaxnll import bench, reference  # noqa: E402

F32 = jnp.float32


def paths() -> dict:
  def masked(tok, m):
    return jnp.sum(jnp.where(m, tok, 0.0), dtype=F32)

  return {
    "optax": lambda z, y, m: masked(optax.softmax_cross_entropy_with_integer_labels(z, y), m),
    "optax_f32": lambda z, y, m: masked(
      optax.softmax_cross_entropy_with_integer_labels(z.astype(F32), y), m
    ),
    "token_nll": lambda z, y, m: masked(jaxnll.token_nll(z, y), m),
    "sequence_nll": lambda z, y, m: jnp.sum(jaxnll.sequence_nll(z, y, m)),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--fraction", type=float, default=1.0, help="span fraction (tail of each row)")
  p.add_argument("--pairs", type=int, default=7, help="interleaved (optax, candidate) pairs")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  env = bench.environment()
  k1, k2 = jax.random.split(jax.random.key(0))
  shape = (args.batch, args.length, args.vocab)
  logits = (2.0 * jax.random.normal(k1, shape, F32)).astype(args.dtype)
  targets = jax.random.randint(k2, shape[:2], 0, args.vocab, jnp.int32)
  mask = jnp.asarray(bench.span_mask(args.batch, args.length, args.fraction))
  xs = (logits, targets, mask)
  print(f"{env['device']}, jax {env['jax_version']}, commit {env['git_commit']}")
  print(f"logits {shape} {args.dtype}, span fraction {args.fraction}, {args.pairs} pairs")

  ref = jax.jit(jax.value_and_grad(lambda z, y, m: jnp.sum(reference.sequence_nll(z, y, m))))
  want = ref(*xs)
  rtol = bench.tolerance(args.dtype, env["backend"])
  steps, temp, compile_s = {}, {}, {}
  for name, loss in paths().items():
    fn, compile_s[name], temp[name] = bench.compile_fn(jax.value_and_grad(loss), xs)
    err = bench.relative_error(fn(*xs), want)
    if not err <= rtol:
      raise AssertionError(f"{name}: differs from jaxnll.reference by {err:.3g} > {rtol:g}")
    steps[name] = fn
    print(
      f"{name:13s} temp {temp[name] / 2**20:10.4g} MiB  ({temp[name] / temp['optax']:.3g} x optax)"
      f"  check {err:.1e}  compile {compile_s[name]:.2f} s",
      flush=True,
    )
  del want

  rows = []
  base = dict(
    env,
    bench="token",
    batch=args.batch,
    length=args.length,
    vocab=args.vocab,
    dtype=args.dtype,
    span_fraction=args.fraction,
  )
  for name, fn in steps.items():
    rows.append(dict(base, impl=name, metric="temp_bytes", value=temp[name]))
    rows.append(
      dict(base, impl=name, metric="temp_ratio_vs_optax", value=temp[name] / temp["optax"])
    )
    if name == "optax":
      continue
    jax.block_until_ready(fn(*xs))  # warm-up
    jax.block_until_ready(steps["optax"](*xs))
    ratios, t_self, t_optax = [], [], []
    for i in range(args.pairs):
      order = ("optax", name) if i % 2 == 0 else (name, "optax")
      t = {q: bench.timed(steps[q], xs) for q in order}
      ratios.append(t[name] / t["optax"])
      t_self.append(t[name])
      t_optax.append(t["optax"])
    med = statistics.median(ratios)
    rows.append(dict(base, impl=name, metric="time_ratio_vs_optax", value=med, pairs=ratios))
    print(
      f"{name:13s} fwd+bwd time {med:.3f} x optax (median of {args.pairs} pairs; "
      f"range {min(ratios):.3f}..{max(ratios):.3f}; medians {statistics.median(t_self) * 1e3:.0f}"
      f" / {statistics.median(t_optax) * 1e3:.0f} ms)",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "token.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
