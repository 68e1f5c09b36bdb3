"""Compiled temp memory of DPO forward+backward: fused head (no logits) vs materialised logits.

    .venv/bin/python bench/preference_memory.py [--rows 8] [--tokens 2048] [--d 4096]
        [--vocab 128256] [--dtype bfloat16]

Default: the Llama-3-8B head, 4 pairs = 8 rows × 2048 tokens, D 4096, V 128256, bf16 (the span
masks are abstract: the compiled buffers hold for any spans).  Deterministic
(``jax.jit(f).lower(...).compile().memory_analysis()``), nothing runs at that size.  The fused
path is :func:`jaxnll.dpo_loss` on :func:`jaxnll.linear_sequence_nll` (its default
implementation on this backend); the materialised path is the same loss on
:func:`jaxnll.sequence_nll` of ``hidden @ weight``.  Both differentiate w.r.t. ``hidden`` and
``weight``.  Before measuring, the two paths are checked to agree (values and gradients) on a
small problem.  Prints a table and writes ``bench/results/preference_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxnll

BETA = 0.1


def _dpo(nll, ref):
  pairs, ref_pairs = nll.reshape(-1, 2), ref.reshape(-1, 2)
  loss = jaxnll.dpo_loss(pairs[:, 0], pairs[:, 1], ref_pairs[:, 0], ref_pairs[:, 1], beta=BETA)
  return jnp.sum(loss)


def fused_dpo(hidden, weight, targets, span, ref):
  return _dpo(jaxnll.linear_sequence_nll(hidden, weight, targets, span), ref)


def logits_dpo(hidden, weight, targets, span, ref):
  logits = jnp.einsum("btd,dv->btv", hidden, weight)
  return _dpo(jaxnll.sequence_nll(logits, targets, span), ref)


fused_dpo_grad = jax.grad(fused_dpo, argnums=(0, 1))
logits_dpo_grad = jax.grad(logits_dpo, argnums=(0, 1))


def dpo_problem(*, rows, tokens, d, v, dtype):
  """Abstract arguments ``(hidden, weight, targets, span, ref_nll)`` (rows ``2i``, ``2i + 1``
  are pair ``i``)."""
  s = jax.ShapeDtypeStruct
  span = s((rows, tokens), jnp.bool_)
  return (
    s((rows, tokens, d), dtype),
    s((d, v), dtype),
    s((rows, tokens), jnp.int32),
    span,
    s((rows,), jnp.float32),
  )


def check():
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (4, 16, 8))
  w = jax.random.normal(k[1], (8, 40)) * 0.3
  y = jax.random.randint(k[2], (4, 16), 0, 40)
  span = jnp.arange(16)[None, :] >= jnp.array([[8], [5], [9], [3]])
  ref = jax.random.uniform(k[3], (4,), minval=20.0, maxval=40.0)
  args = (h, w, y, span, ref)
  np.testing.assert_allclose(fused_dpo(*args), logits_dpo(*args), rtol=1e-5)
  for a, b in zip(fused_dpo_grad(*args), logits_dpo_grad(*args), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def temp_bytes(fn, args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--d", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  a = parser.parse_args()
  check()
  args = dpo_problem(rows=a.rows, tokens=a.tokens, d=a.d, v=a.vocab, dtype=jnp.dtype(a.dtype))
  fused, plain = temp_bytes(fused_dpo_grad, args), temp_bytes(logits_dpo_grad, args)
  logits_bytes = a.rows * a.tokens * a.vocab * jnp.dtype(a.dtype).itemsize
  mib = 2.0**20
  print(
    f"DPO fwd+bwd, {a.rows // 2} pairs = {a.rows} rows x {a.tokens} tokens, D {a.d}, "
    f"V {a.vocab}, {a.dtype} ({jax.default_backend()}); one [B,T,V] logits array = "
    f"{logits_bytes / mib:,.0f} MiB"
  )
  print(f"{'path':34s} {'temp MiB':>12s}")
  print(f"{'fused (linear_sequence_nll)':34s} {fused / mib:12,.1f}")
  print(f"{'materialised logits (sequence_nll)':34s} {plain / mib:12,.1f}")
  print(f"ratio fused / materialised = 1/{plain / max(fused, 1):.1f}")
  record = {
    "bench": "preference_memory",
    "loss": "dpo_loss (sigmoid) fwd+bwd w.r.t. hidden and weight",
    "rows": a.rows,
    "pairs": a.rows // 2,
    "tokens": a.tokens,
    "d": a.d,
    "vocab": a.vocab,
    "dtype": a.dtype,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "fused_temp_bytes": fused,
    "materialised_temp_bytes": plain,
    "ratio": plain / max(fused, 1),
  }
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "preference_memory.json"), "w") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
