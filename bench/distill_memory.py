"""Compiled temp memory of distillation loss forward / forward+backward: jaxnll vs optax.

    .venv/bin/python bench/distill_memory.py [--shape B T V] [--dtype bfloat16]

Deterministic (``jax.jit(f).lower(...).compile().memory_analysis()``), nothing is run.  The
optax path is ``optax.softmax_cross_entropy(student / τ, softmax(teacher / τ))`` masked and
summed over the span; the reference is :func:`jaxnll.reference.distill_cross_entropy`.
Before measuring, the three are checked to agree on a small problem.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnll import distill_cross_entropy, reference

TAU = 2.0


def optax_path(s, t, m):
  ce = optax.softmax_cross_entropy(s / TAU, jax.nn.softmax(jax.lax.stop_gradient(t) / TAU))
  return jnp.sum(jnp.where(m, ce, 0.0), axis=-1, dtype=jnp.float32)


PATHS = {
  "jaxnll ce": lambda s, t, m: distill_cross_entropy(s, t, m, temperature=TAU),
  "jaxnll kl": lambda s, t, m: distill_cross_entropy(s, t, m, temperature=TAU, kind="kl"),
  "optax": optax_path,
  "reference": lambda s, t, m: reference.distill_cross_entropy(s, t, m, temperature=TAU),
}


def check():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  s, t = jax.random.normal(k1, (2, 16, 64)), jax.random.normal(k2, (2, 16, 64))
  m = jax.random.bernoulli(k3, 0.5, (2, 16))
  want = PATHS["reference"](s, t, m)
  for name in ("jaxnll ce", "optax"):
    np.testing.assert_allclose(PATHS[name](s, t, m), want, rtol=1e-5, err_msg=name)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shape", type=int, nargs=3, default=(8, 512, 32768), metavar=("B", "T", "V")
  )
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  check()
  b, t, v = args.shape
  logits = jax.ShapeDtypeStruct((b, t, v), jnp.dtype(args.dtype))
  mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
  f32_copy = b * t * v * 4
  print(f"B={b} T={t} V={v} {args.dtype}, tau={TAU}; one f32 [B,T,V] = {f32_copy / 2**20:.0f} MiB")
  print(f"{'path':10s} {'fwd temp MiB':>13s} {'fwd+bwd temp MiB':>17s} {'(x f32 copy)':>13s}")
  for name, fn in PATHS.items():
    loss = lambda s, t, m, fn=fn: jnp.sum(fn(s, t, m))  # noqa: E731
    temps = []
    for f in (loss, jax.value_and_grad(loss)):
      compiled = jax.jit(f).lower(logits, logits, mask).compile()
      temps.append(compiled.memory_analysis().temp_size_in_bytes)
    print(
      f"{name:10s} {temps[0] / 2**20:13.1f} {temps[1] / 2**20:17.1f} {temps[1] / f32_copy:13.3f}"
    )


if __name__ == "__main__":
  main()
