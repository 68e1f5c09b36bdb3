"""Compiled temp memory of the policy loss forward+backward: fused per-token NLL vs logits.

    .venv/bin/python bench/policy_memory.py [--shape B T D V] [--dtype bfloat16]

Deterministic (``jax.jit(f).lower(...).compile().memory_analysis()``), nothing is run.  Both
paths compute the DAPO token-mean of :func:`jaxnll.ppo_clip_loss` (k3 KL included) and its
gradient with respect to the hidden states and the head:

* ``logits``: ``hidden @ weight`` materialised, then :func:`jaxnll.token_nll`;
* ``fused``: ``jaxnll.linear_token_nll(hidden, weight, targets, span_mask)`` (no ``[B, T, V]``
  logits).  The target is at most 1/20 of the logits path at the Llama-3-8B head
  (8 x 2048 tokens, D 4096, V 128256, bf16).  Without ``jaxnll.linear_token_nll`` (not yet in
  this tree) the script says so and measures the logits path only.

Before measuring, the two paths are checked to agree on a small problem.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxnll
from jaxnll.nll import finish_loss, span_counts


def policy_loss(token_nll, old, ref, adv, mask):
  sums = jaxnll.ppo_clip_loss(
    token_nll, old, adv, mask, clip_high=0.28, ref_token_nll=ref, kl_coef=0.01
  )
  return finish_loss(*jaxnll.policy_loss_terms(sums, span_counts(mask)))


def logits_path(hidden, weight, targets, mask, old, ref, adv):
  logits = jnp.einsum("btd,dv->btv", hidden, weight)
  return policy_loss(jaxnll.token_nll(logits, targets), old, ref, adv, mask)


def fused_path(hidden, weight, targets, mask, old, ref, adv):
  tok = jaxnll.linear_token_nll(hidden, weight, targets, mask)
  return policy_loss(tok, old, ref, adv, mask)


def check(has_fused: bool):
  k = jax.random.split(jax.random.key(0), 6)
  b, t, d, v = 2, 16, 8, 64
  args = (
    jax.random.normal(k[0], (b, t, d)),
    jax.random.normal(k[1], (d, v)) / 3,
    jax.random.randint(k[2], (b, t), 0, v),
    jax.random.bernoulli(k[3], 0.6, (b, t)),
    jax.random.uniform(k[4], (b, t), minval=2.0, maxval=5.0),
    jax.random.uniform(k[5], (b, t), minval=2.0, maxval=5.0),
    jnp.array([1.0, -0.5]),
  )
  want = jax.grad(logits_path, argnums=(0, 1))(*args)
  if has_fused:
    got = jax.grad(fused_path, argnums=(0, 1))(*args)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def temp_bytes(fn, args) -> int:
  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shape", type=int, nargs=4, default=(8, 2048, 4096, 128256), metavar=("B", "T", "D", "V")
  )
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  has_fused = hasattr(jaxnll, "linear_token_nll")
  check(has_fused)
  b, t, d, v = args.shape
  dt = jnp.dtype(args.dtype)
  spec = (
    jax.ShapeDtypeStruct((b, t, d), dt),
    jax.ShapeDtypeStruct((d, v), dt),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
    jax.ShapeDtypeStruct((b, t), jnp.float32),
    jax.ShapeDtypeStruct((b, t), jnp.float32),
    jax.ShapeDtypeStruct((b,), jnp.float32),
  )
  print(f"policy loss fwd+bwd, B={b} T={t} D={d} V={v} {args.dtype} on {jax.devices()[0]}")
  base = temp_bytes(logits_path, spec)
  print(f"logits path  temp {base / 2**30:8.2f} GiB")
  if not has_fused:
    print("fused path   jaxnll.linear_token_nll is missing in this tree: not measured")
    return
  fused = temp_bytes(fused_path, spec)
  print(
    f"fused path   temp {fused / 2**30:8.2f} GiB  ({base / max(fused, 1):.1f}x less; target >= 20x)"
  )


if __name__ == "__main__":
  main()
