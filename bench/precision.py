"""Gradient precision of the softmax-from-(max, sum) backward, before and after, side by side.

The backward used to rebuild the softmax as ``exp(z - lse)`` from a rounded float32
log-sum-exp; it now uses the row max ``m`` and sum ``s = Σ exp(z - m)``:
``p = exp(z - m) / s``.  This script keeps the old formula inline (the "before") and compares
it with the library (the "after") in one process:

* **precision**: the gradient at bf16-max logits (``[0, M, M, M]``, target 0: the exact
  gradient is ``[-1, ⅓, ⅓, ⅓]``) and the max error against float64 at float32 logits near
  ``1e4``, next to optax;
* **memory**: compile-only ``memory_analysis().temp_size_in_bytes`` of forward + backward;
* **time**: median over interleaved pairs (order alternating) of each one's wall time, and
  the median of the per-pair ratio ``after / before``.

Cases: ``token_nll`` at ``B = 8, T = 512, V = 32768`` bf16 (gradient w.r.t. the logits) and
the fused ``linear_nll_loss`` at a small head (``N = 1024`` tokens, ``D = 256``,
``V = 8192``; bf16 → the two-pass schedule, f32 → one pass).

    python bench/precision.py [--pairs 7]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnll  # noqa: E402
from jaxnll import _core, nll  # noqa: E402
from jaxnll.fused import compact, vjp  # noqa: E402

F32 = jnp.float32


# ----------------------------------------------------------------------------- the "before"


def old_grad_logits(z, lse, targets, vocab_offset, vocab_size, opts):
  """The former ``_core.grad_logits``: the softmax as ``exp(z - lse)``."""
  p = jnp.exp(z - lse[..., None])
  if opts.z_loss:
    p = p * (1.0 + 2.0 * opts.z_loss * lse)[..., None]
  ids = vocab_offset + jnp.arange(z.shape[-1], dtype=jnp.int32)
  alpha = opts.label_smoothing
  g = p - jnp.where(ids == targets[..., None], 1.0 - alpha, 0.0)
  if alpha:
    g = g - alpha / vocab_size
  return g * _core.softcap_grad(z, opts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def old_token_nll(x, targets, opts):
  return nll._row_stats(x, targets, None, opts)[0]


def _old_fwd(x, targets, opts):
  loss, (m, s) = nll._row_stats(x, targets, None, opts)
  return loss, (x, targets, m + jnp.log(s))  # the former residual: one rounded f32 lse


def _old_bwd(opts, res, g):
  x, targets, lse = res
  x = jax.lax.optimization_barrier(x)
  z = _core.softcap(x, opts)
  dz = old_grad_logits(z, lse, targets, 0, x.shape[-1], opts) * g[..., None]
  return dz.astype(x.dtype), None


old_token_nll.defvjp(_old_fwd, _old_bwd)


class OldCompacted(compact.Compacted):
  """The fused kernels' former gradient block: ``exp(z - lse)`` with ``lse = m + log s``."""

  def grad_block(self, z, i, start, stats, scale, entropy_scale=None):
    y, ok = self.part(self.targets, i), self.part(self.valid, i)
    lse = stats[0] + jnp.log(stats[1])
    g = old_grad_logits(z, lse, y, self.offset + start, self.vocab, self.opts)
    keep = ok[:, None]
    real = self.real(start, z.shape[1])
    if real is not None:
      keep = keep & real
    return jnp.where(keep, g * scale[:, None], 0.0)


@contextlib.contextmanager
def before():
  """Traces the fused entries with the former gradient block (compile inside the block)."""
  saved = vjp.Compacted
  vjp.Compacted = OldCompacted
  try:
    yield
  finally:
    vjp.Compacted = saved


# ----------------------------------------------------------------------------- measurements


def compiled(fn, args, *, old=False):
  with before() if old else contextlib.nullcontext():
    c = jax.jit(fn).lower(*args).compile()
  return c, int(c.memory_analysis().temp_size_in_bytes)


def interleaved(a, b, args, pairs):
  """Median seconds of ``a`` and ``b`` and the median per-pair ratio ``b / a``."""
  for f in (a, b):
    jax.block_until_ready(f(*args))
  ta, tb = [], []
  for k in range(pairs):
    order = ((a, ta), (b, tb)) if k % 2 == 0 else ((b, tb), (a, ta))
    for f, out in order:
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      out.append(time.perf_counter() - t0)
  ratio = statistics.median(y / x for x, y in zip(ta, tb, strict=True))
  return statistics.median(ta), statistics.median(tb), ratio


def row(name, mem_before, mem_after, times):
  tb, ta, ratio = times
  mib = 2**20
  print(
    f"{name:<34} temp MiB {mem_before / mib:9.2f} -> {mem_after / mib:9.2f}   "
    f"time ms {tb * 1e3:8.1f} -> {ta * 1e3:8.1f}   after/before {ratio:.3f}"
  )


def precision_table():
  opts = _core.TokenOptions()
  big = float(jnp.finfo(jnp.bfloat16).max)
  x = jnp.array([[0.0, big, big, big]], jnp.bfloat16)
  y = jnp.array([0])
  g_old = jax.grad(lambda x: old_token_nll(x, y, opts).sum())(x)
  g_new = jax.grad(lambda x: jaxnll.token_nll(x, y).sum())(x)
  print("bf16-max logits [0, M, M, M], target 0 (exact: [-1, 1/3, 1/3, 1/3])")
  print("  before:", np.asarray(g_old, np.float32)[0].round(4).tolist())
  print("  after: ", np.asarray(g_new, np.float32)[0].round(4).tolist())
  z = 1e4 + 3 * jax.random.normal(jax.random.key(0), (64, 4096))
  y = jnp.arange(64)
  z64 = np.asarray(z, np.float64)
  p = np.exp(z64 - z64.max(-1, keepdims=True))
  want = p / p.sum(-1, keepdims=True) - np.eye(4096)[np.asarray(y)]
  err = lambda f: float(
    np.abs(np.asarray(jax.grad(lambda x: f(x).sum())(z), np.float64) - want).max()
  )
  print("f32 logits 1e4 + 3·N(0, 1), [64, 4096]: max |grad - float64|")
  print(f"  before: {err(lambda x: old_token_nll(x, y, opts)):.2e}")
  print(f"  after:  {err(lambda x: jaxnll.token_nll(x, y)):.2e}")
  print(f"  optax:  {err(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y)):.2e}")
  # The fused path (hidden 0, the bias carries the logits): a fresh function per compile, so
  # no trace cache hands the "after" to the "before".
  hb, wb = jnp.zeros((1, 1, 8), jnp.bfloat16), jnp.zeros((8, 4), jnp.bfloat16)
  args = (jnp.array([0.0, big, big, big], jnp.bfloat16),)
  y1, m1 = jnp.zeros((1, 1), int), jnp.ones((1, 1), bool)

  def fused_grad():
    return jax.grad(lambda b: jaxnll.linear_nll_loss(hb, wb, y1, m1, bias=b)[0])

  print("fused linear_nll_loss, bias = [0, M, M, M] (bf16), target 0")
  for name, old in (("before", True), ("after", False)):
    g = compiled(fused_grad(), args, old=old)[0](*args)
    print(f"  {name + ':':<7}", np.asarray(g, np.float32).round(4).tolist())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", type=int, default=7)
  a = p.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  precision_table()
  print()

  # token_nll, B=8 T=512 V=32768 bf16: value and gradient w.r.t. the logits.
  k = jax.random.split(jax.random.key(1), 3)
  b, t, v = 8, 512, 32768
  logits = (3 * jax.random.normal(k[0], (b, t, v))).astype(jnp.bfloat16)
  targets = jax.random.randint(k[1], (b, t), 0, v)
  mask = jax.random.bernoulli(k[2], 0.5, (b, t))
  opts = _core.TokenOptions()

  def masked(tok, m):
    return jnp.sum(jnp.where(m, tok, 0.0), dtype=F32)

  old = jax.value_and_grad(lambda z, y, m: masked(old_token_nll(z, y, opts), m))
  new = jax.value_and_grad(lambda z, y, m: masked(jaxnll.token_nll(z, y), m))
  args = (logits, targets, mask)
  c_old, m_old = compiled(old, args)
  c_new, m_new = compiled(new, args)
  np.testing.assert_allclose(c_old(*args)[0], c_new(*args)[0], rtol=1e-6)
  row("token_nll 8x512x32768 bf16", m_old, m_new, interleaved(c_old, c_new, args, a.pairs))

  # Fused scalar loss at a small head.
  n, d, v = 1024, 256, 8192
  for dtype in (jnp.bfloat16, jnp.float32):
    k = jax.random.split(jax.random.key(2), 4)
    h = jax.random.normal(k[0], (4, n // 4, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(k[2], (4, n // 4), 0, v)
    m = jax.random.bernoulli(k[3], 0.5, (4, n // 4))

    def fn():  # a fresh function per compile (no shared trace cache)
      return jax.value_and_grad(lambda *xs: jaxnll.linear_nll_loss(*xs)[0], argnums=(0, 1))

    args = (h, w, y, m)
    c_old, m_old = compiled(fn(), args, old=True)
    c_new, m_new = compiled(fn(), args)
    np.testing.assert_allclose(c_old(*args)[0], c_new(*args)[0], rtol=1e-6)
    name = f"linear_nll_loss {n}x{d}x{v} {jnp.dtype(dtype).name}"
    row(name, m_old, m_new, interleaved(c_old, c_new, args, a.pairs))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
