"""The ``"token_chunked"`` implementation: blocks of target tokens, full-vocabulary matmuls.

The plan for a GPU.  The compacted target rows go in blocks of ``C``; each block's logits
``[C, V]`` come from **one** matmul over the whole (local) vocabulary and are computed once:
the scalar entry forms the hidden and weight gradients from the same block, so forward plus
backward is three matmuls, ``6·N·D·V`` FLOPs over the ``N`` target tokens (the per-sample
entry recomputes the block in its backward: ``8·N·D·V``).  Large matmuls run near the chip's
peak, where narrow vocabulary chunks do not (tokamax's chunked XLA path reaches about half
its materialised speed on an H100; Levanter moved its H100 path to 8192-token blocks with
full-vocabulary matmuls).

* ``C`` is set by a byte budget for the f32 logits block (:data:`LOGITS_BLOCK_BYTES`):
  ``C = clamp(budget // (4·V), 8, 8192)`` rounded down to a multiple of 8, and never more than
  the (8-rounded) number of positions.  The last block is padded, never the tile shrunk to a
  divisor of the target count (Levanter measured 26× for a divisor tile on an odd row count).
* Blocks past the last target are skipped at run time: the block loop is a ``while`` loop
  bounded by ``ceil(n_targets / C)``.  The compacted arrays need not hold a whole number of
  blocks (``"auto"`` shares the CPU kernel's, shorter, padding): a last block that would
  reach past them is read shifted back to end at their end, and only its rows not already
  done count (:func:`fresh`).
* The weight gradient is summed over blocks in one f32 ``[D, V]`` buffer; log-sum-exp and
  every sum are float32.
* The softmax in the gradient is ``exp(z - m) / s`` from the row maximum ``m`` and the sum
  ``s`` of ``exp(z - m)`` (not ``exp(z - lse)``, whose subtraction loses the low bits of
  ``z - m`` once ``log s`` is added).  The per-token residual is therefore the pair
  ``(m, s)``: ``stats`` below is float32 ``[rows, 2]``.

The passes follow the interface of :mod:`jaxnll.fused.chunked`:

* ``stats_pass(bt) -> (stats_c, loss_c)``;
* ``grad_pass(bt, scale_c, stats_c, need) -> (dh_c, dweight, dbias)``;
* ``one_pass(bt, scale_c, need) -> (stats_c, loss_c, dh_c, dweight, dbias)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.fused.compact import Compacted, Plan, dot

#: Bytes of the f32 ``[C, V]`` logits block that set ``C`` (512 MiB: 1040 tokens at
#: Llama-3's 128k vocabulary, 520 at Gemma-2's 256k, 880 at Qwen3's 152k, 4096 at Mistral's
#: 32k).  Such a block keeps a GPU's matmul units busy (``2·C·D·V`` ≈ 1.1 TFLOP per block at
#: the Llama-3-8B head, rows well past the few hundred a tensor-core tile needs), while the
#: live ``[C, V]`` buffers (logits, their gradient in f32 and in the matmul dtype) stay near
#: 1.5 GiB; the element-wise work per token does not depend on ``C``.
LOGITS_BLOCK_BYTES = 2**29
MIN_TOKEN_CHUNK = 8
MAX_TOKEN_CHUNK = 8192


def block_rows(vocab: int, num_tokens: int, token_chunk: int | None = None) -> int:
  """Rows ``C`` of a logits block for a (local) vocabulary of ``vocab`` columns.

  ``token_chunk`` overrides the budget (taken as given, up to the padded row count).
  """
  if token_chunk is None:
    c = LOGITS_BLOCK_BYTES // (4 * max(vocab, 1))
    c = max(MIN_TOKEN_CHUNK, min(MAX_TOKEN_CHUNK, c)) // 8 * 8
  else:
    c = token_chunk
  return max(1, min(c, -(-num_tokens // 8) * 8))


def configure(plan: Plan, token_chunk, vocab_chunk, num_tokens: int, weight) -> Plan:
  """The plan with this kernel's block: ``C`` from :func:`block_rows`."""
  del vocab_chunk  # one matmul spans the whole vocabulary
  return dataclasses.replace(plan, token_chunk=block_rows(weight.shape[1], num_tokens, token_chunk))


def fresh(bt: Compacted, i):
  """bool ``[C]``: rows of block ``i`` that belong to it.  ``bt.part`` reads a last block that
  would end past the compacted arrays shifted back (``dynamic_slice`` clamps its start);
  its first rows then belong to block ``i - 1``."""
  start = jnp.minimum(i * bt.chunk, bt.valid.shape[0] - bt.chunk)
  return start + jnp.arange(bt.chunk, dtype=jnp.int32) >= i * bt.chunk


def _put(bt: Compacted, x_c, new, i, keep):
  """``x_c`` with block ``i`` set to ``new`` at its rows in ``keep`` (others unchanged)."""
  old = bt.part(x_c, i)
  keep = keep.reshape(keep.shape + (1,) * (new.ndim - 1))
  return lax.dynamic_update_slice_in_dim(x_c, jnp.where(keep, new, old), i * bt.chunk, 0)


def _block(bt: Compacted, i):
  """Logits block ``i``: hidden rows, capped f32 logits ``[C, V]``, their real-column mask."""
  h = bt.rows(i)
  z = bt.logits(h, bt.columns(0, bt.cols), 0, bt.cols)
  return h, z, bt.real(0, bt.cols)


def _stats(bt: Compacted, i, z, real):
  """Row statistics of block ``i``: ``(m, s, loss)`` over every vocabulary shard."""
  opts = bt.opts
  zr = z if real is None else jnp.where(real, z, jnp.finfo(F32).min)
  m = jnp.max(zr, axis=1)
  e = jnp.exp(zr - m[:, None])
  s = jnp.sum(e if real is None else jnp.where(real, e, 0.0), axis=1)
  top = _core.all_max(m, opts)
  s = _core.all_sum(s * jnp.exp(m - top), opts)
  zsum = None
  if opts.label_smoothing:
    zsum = _core.all_sum(jnp.sum(z if real is None else jnp.where(real, z, 0.0), axis=1), opts)
  y = bt.part(bt.targets, i)
  local = y - bt.offset
  here = (local >= 0) & (local < bt.cols)
  zy = jnp.take_along_axis(z, jnp.where(here, local, 0)[:, None], axis=1)[:, 0]
  zy = _core.all_sum(jnp.where(here, zy, 0.0), opts)
  zy = jnp.where(_core.target_in_range(y, bt.vocab), zy, jnp.nan)
  loss = bt.token_loss(top + jnp.log(s), zy, zsum, bt.part(bt.valid, i) & fresh(bt, i))
  return top, s, loss


def logit_grad(bt: Compacted, z, i, m, s, scale, real):
  """``scale · ∂ℓ/∂x`` of block ``i`` with the softmax ``exp(z - m) / s`` (f32, zero past the
  last target and at padding columns)."""
  opts = bt.opts
  p = jnp.exp(z - m[:, None]) * (1.0 / s)[:, None]
  if opts.z_loss:
    p = p * (1.0 + 2.0 * opts.z_loss * (m + jnp.log(s)))[:, None]
  y = bt.part(bt.targets, i)
  hit = bt.offset + jnp.arange(z.shape[1], dtype=jnp.int32) == y[:, None]
  alpha = opts.label_smoothing
  g = p - jnp.where(hit, 1.0 - alpha, 0.0)
  if alpha:
    g = g - alpha / bt.vocab
  g = g * _core.softcap_grad(z, opts)
  keep = (bt.part(bt.valid, i) & fresh(bt, i))[:, None]
  if real is not None:
    keep = keep & real
  return jnp.where(keep, g * scale[:, None], 0.0)


def _accumulate(bt: Compacted, i, h, g, need, dh_c, dw, db):
  gq = g.astype(bt.cdt)
  if need[0]:
    dh_c = _put(bt, dh_c, dot(gq, bt.columns(0, bt.cols), (1, 1)), i, fresh(bt, i))
  if need[1]:
    dw = dw + dot(h, gq, (0, 0))
  if need[2]:
    db = db + jnp.sum(g, axis=0)
  return dh_c, dw, db


def _grad_init(bt: Compacted, need):
  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need[0] else None
  dw = bt.full(bt.weight.shape, F32) if need[1] else None
  db = bt.full(bt.bias.shape, F32) if need[2] else None
  return dh_c, dw, db


def _need(bt: Compacted, need):
  return (need[0], need[1], need[2] and bt.bias is not None)


def stats_pass(bt: Compacted):
  """Forward over target blocks: ``(stats [rows, 2] = (m, s), loss [rows])``, float32."""

  def body(i, carry):
    stats_c, loss_c = carry
    _, z, real = _block(bt, i)
    m, s, loss = _stats(bt, i, z, real)
    new = fresh(bt, i)
    return _put(bt, stats_c, jnp.stack([m, s], axis=1), i, new), _put(bt, loss_c, loss, i, new)

  rows = bt.valid.shape[0]
  init = (bt.full((rows, 2), F32, rows=True), bt.full((rows,), F32, rows=True))
  return lax.fori_loop(0, bt.num_chunks, body, init)


def grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True)):
  """Gradients of ``Σ scale·ℓ``, recomputing each block once (two matmuls per block)."""
  need = _need(bt, need)

  def body(i, carry):
    h, z, real = _block(bt, i)
    st = bt.part(stats_c, i)
    g = logit_grad(bt, z, i, st[:, 0], st[:, 1], bt.part(scale_c, i), real)
    return _accumulate(bt, i, h, g, need, *carry)

  return lax.fori_loop(0, bt.num_chunks, body, _grad_init(bt, need))


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """Loss and gradients of ``Σ scale·ℓ`` with each logits block computed once (three matmuls
  per block: ``6·N·D·V`` FLOPs)."""
  need = _need(bt, need)

  def body(i, carry):
    stats_c, loss_c, *grads = carry
    h, z, real = _block(bt, i)
    m, s, loss = _stats(bt, i, z, real)
    g = logit_grad(bt, z, i, m, s, bt.part(scale_c, i), real)
    new = fresh(bt, i)
    stats_c = _put(bt, stats_c, jnp.stack([m, s], axis=1), i, new)
    loss_c = _put(bt, loss_c, loss, i, new)
    return (stats_c, loss_c, *_accumulate(bt, i, h, g, need, *grads))

  rows = bt.valid.shape[0]
  init = (bt.full((rows, 2), F32, rows=True), bt.full((rows,), F32, rows=True))
  return lax.fori_loop(0, bt.num_chunks, body, init + _grad_init(bt, need))
