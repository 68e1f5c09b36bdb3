"""The ``"chunked"`` implementation: blocks of target tokens × vocabulary columns in XLA loops.

Every block is a ``[C, K]`` tile of logits (``C`` target tokens by ``K`` vocabulary columns);
the forward keeps an online log-sum-exp over the vocabulary chunks, the gradient pass
recomputes each tile.  Only ``[C, K]`` and ``[D, K]`` f32 buffers are live, which suits a CPU
(and any backend short of memory); the token loops run ``ceil(n_targets / C)`` chunks.

Its planning (:func:`configure`) and three passes are the interface every compacted
implementation of :mod:`jaxnll.fused` shares (:class:`jaxnll.fused.kernel.Passes`):

* ``stats_pass(bt) -> (stats_c, loss_c)``: per compacted position, float32; ``stats_c`` is
  the tuple of :meth:`Compacted.combine` (row max, sum of exponentials, and the mean logit
  with ``plan.entropy``) that the gradient rebuilds the exact softmax from;
* ``grad_pass(bt, scale_c, stats_c, need, entropy_scale_c=None) -> (dh_c, dweight, dbias)``:
  gradients of ``Σ scale·ℓ (+ Σ entropy_scale·H)`` by recomputation;
* ``one_pass(bt, scale_c, need) -> (stats_c, loss_c, dh_c, dweight, dbias)``: loss and
  gradients with each logits block computed once.

The weight is ``[D, V]`` or (``plan.weight_layout == "vd"``) ``[V, D]``; the per-chunk views
of :class:`~jaxnll.fused.compact.Compacted` hide which.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.fused.compact import Compacted, Plan, over_vocab
from jaxnll.fused.kernel import DEFAULT_TOKEN_CHUNK, Request

#: ``one_pass`` keeps a whole ``[C, V]`` f32 row block; ``C`` is capped so that block stays
#: under this many bytes (128 tokens at a 128k vocabulary).
ONE_PASS_BLOCK_BYTES = 64 * 2**20


def configure(plan: Plan, request: Request) -> Plan:
  """The scalar entry's schedule: ``one_pass`` when asked, or by default (``"auto"``) for
  float32 weights, whose f32 ``[D, V]`` gradient buffer is the gradient itself; for 16-bit
  weights ``two_pass`` keeps only ``[C, K]`` and ``[D, K]`` f32 blocks.  ``one_pass`` holds a
  ``[C, V]`` f32 row block, so its default ``C`` is capped by :data:`ONE_PASS_BLOCK_BYTES`."""
  if request.schedule is None:
    return plan
  schedule = request.schedule
  one_pass = schedule == "one_pass" or (schedule == "auto" and request.weight_dtype == F32)
  plan = dataclasses.replace(plan, one_pass=one_pass)
  if one_pass and request.token_chunk is None:
    cap = ONE_PASS_BLOCK_BYTES // (4 * request.vocab)
    rows = max(8, min(DEFAULT_TOKEN_CHUNK, cap) // 8 * 8)
    plan = dataclasses.replace(plan, token_chunk=max(1, min(rows, request.num_tokens)))
  return plan


def stats_pass(bt: Compacted):
  """Forward over target chunks: ``(stats, loss)`` per compacted position, float32.

  The log-sum-exp is online over vocabulary chunks, so only a ``[C, K]`` block is live.
  """
  opts, rows, entropy = bt.opts, bt.chunk, bt.plan.entropy

  def token_body(i, carry):
    stats_c, loss_c = carry
    h = bt.rows(i)
    y = bt.part(bt.targets, i)
    local = (y - bt.offset)[:, None]

    def vocab_body(start, width, inner):
      m, s, zsum, zdot, zy = inner
      z = bt.logits(h, bt.columns(start, width), start, width)
      # The target's logit from the tile that holds it: gathering the targets' columns of a
      # [D, V] weight instead makes XLA:TPU keep a column-major copy of the whole weight.
      hit = local == start + lax.broadcasted_iota(jnp.int32, (1, width), 1)
      zy = zy + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
      real = bt.real(start, width)
      if real is not None:  # padding columns of a sharded vocabulary drop out
        z = jnp.where(real, z, jnp.finfo(F32).min)
      m_new = jnp.maximum(m, jnp.max(z, axis=1))
      e = jnp.exp(z - m_new[:, None])
      if real is not None:
        e = jnp.where(real, e, 0.0)
      rescale = jnp.exp(m - m_new)
      s_old, s = s, s * rescale + jnp.sum(e, axis=1)
      if opts.label_smoothing:
        zsum = zsum + jnp.sum(z if real is None else jnp.where(real, z, 0.0), axis=1)
      if entropy:  # Σ exp(z - m)·(z - m), online like s (a -inf logit adds 0, not NaN)
        zdot = bt.shift_moment(zdot, s_old, m, m_new, rescale) + jnp.sum(
          jnp.where(e > 0, e * (z - m_new[:, None]), 0.0), axis=1
        )
      return m_new, s, zsum, zdot, zy

    zero = bt.full((rows,), F32)
    init = (bt.full((rows,), F32, jnp.finfo(F32).min), zero, zero, zero, zero)
    m, s, zsum, zdot, zy = over_vocab(vocab_body, init, bt.cols, bt.plan.vocab_chunk)
    stats, lse, zsum = bt.combine(m, s, zsum if opts.label_smoothing else None, zdot)
    zy = _core.all_sum(zy, opts)  # the shard holding the target contributes it
    zy = jnp.where(_core.target_in_range(y, bt.vocab), zy, jnp.nan)
    loss = bt.token_loss(lse, zy, zsum, bt.part(bt.valid, i))
    at = (i * rows,)
    stats_c = tuple(lax.dynamic_update_slice(a, x, at) for a, x in zip(stats_c, stats, strict=True))
    return stats_c, lax.dynamic_update_slice(loss_c, loss, at)

  zeros = bt.full(bt.valid.shape, F32, rows=True)
  stats_c = (zeros,) * (3 if entropy else 2)
  return lax.fori_loop(0, bt.num_chunks, token_body, (stats_c, zeros))


def grad_pass(
  bt: Compacted,
  scale_c,
  stats_c,
  need=(True, True, True),
  entropy_scale_c=None,
  *,
  width: int | None = None,
  keep=None,
):
  """Gradients of ``Σ scale·ℓ`` (``+ Σ entropy_scale·H``) by recomputation: vocabulary chunks
  outside, target chunks inside, so each weight-gradient chunk is summed over all tokens in
  an f32 ``[D, K]`` buffer and cast once.  ``need`` (hidden, weight, bias): a gradient nobody
  asked for costs no matmul (a frozen head saves a third of the work).

  ``width``: the vocabulary chunk ``K`` (default the plan's ``grad_chunk``; ``token_chunked``
  passes its slab width).  ``keep(i)``: bool ``[C]``, the rows of token chunk ``i`` that
  belong to it (``token_chunked`` reads a last block shifted back; default every row).

  Returns ``(dh_c [padded, D] f32, dweight in weight dtype, dbias in bias dtype)``, ``None``
  for what is not needed.
  """
  rows = bt.chunk
  weight, bias = bt.weight, bt.bias
  need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None

  def vocab_body(start, width, carry):
    dh_c, dw, db = carry
    w = bt.columns(start, width)

    def token_body(i, inner):
      dw_k, db_k, dh_c = inner
      h = bt.rows(i)
      z = bt.logits(h, w, start, width)
      es = None if entropy_scale_c is None else bt.part(entropy_scale_c, i)
      scale = bt.part(scale_c, i)
      g = bt.grad_block(z, i, start, bt.part_stats(stats_c, i), scale, es)
      live = bt.live(scale, es)
      if keep is not None:  # rows of another block add nothing
        g = jnp.where(keep(i)[:, None], g, 0.0)
        live = live & keep(i)
      gq = g.astype(bt.cdt)
      if need_w:
        dw_k = dw_k + bt.weight_grad(h, gq, live)
      if need_b:
        db_k = db_k + jnp.sum(g, axis=0)
      if need_h:
        dh = lax.dynamic_slice_in_dim(dh_c, i * rows, rows) + bt.hidden_grad(gq, w)
        dh_c = lax.dynamic_update_slice(dh_c, dh, (i * rows, 0))
      return dw_k, db_k, dh_c

    dw_k = bt.full(bt.weight_shape(width), F32) if need_w else None
    db_k = bt.full((width,), F32) if need_b else None
    dw_k, db_k, dh_c = lax.fori_loop(0, bt.num_chunks, token_body, (dw_k, db_k, dh_c))
    if need_w:
      at = (start, 0) if bt.vd else (0, start)
      dw = lax.dynamic_update_slice(dw, dw_k.astype(dw.dtype), at)
    if need_b:
      db = lax.dynamic_update_slice(db, db_k.astype(db.dtype), (start,))
    return dh_c, dw, db

  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need_h else None
  dw = bt.full(weight.shape, weight.dtype) if need_w else None
  db = bt.full(bias.shape, bias.dtype) if need_b else None
  return over_vocab(vocab_body, (dh_c, dw, db), bt.cols, width or bt.plan.grad_chunk)


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """Loss and gradients of ``Σ scale·ℓ`` with each logits block computed once.

  Target chunks outside; a whole ``[C, V]`` f32 row block per chunk (its log-sum-exp is needed
  before any gradient), the gradient matmuls over vocabulary chunks of it.  The weight
  gradient is summed over token chunks in one f32 ``[D, V]`` buffer — the result itself for
  f32 weights.

  Returns ``(stats_c, loss_c, dh_c [padded, D] f32, dweight f32, dbias f32)``, ``None`` for
  a gradient not in ``need`` (hidden, weight, bias).
  """
  rows, cols, opts = bt.chunk, bt.cols, bt.opts
  need_h, need_w, need_b = need[0], need[1], need[2] and bt.bias is not None

  def token_body(i, carry):
    stats_c, loss_c, dh_c, dw, db = carry
    h = bt.rows(i)
    y, ok, scale = bt.part(bt.targets, i), bt.part(bt.valid, i), bt.part(scale_c, i)
    z = bt.logits(h, bt.columns(0, cols), 0, cols)  # [C, V] f32 (the local columns)
    real = bt.real(0, cols)
    zr = z if real is None else jnp.where(real, z, jnp.finfo(F32).min)
    m = jnp.max(zr, axis=1)
    e = jnp.exp(zr - m[:, None])
    zsum = None
    if opts.label_smoothing:
      zsum = jnp.sum(z if real is None else jnp.where(real, z, 0.0), axis=1)
    e = e if real is None else jnp.where(real, e, 0.0)
    zdot = None
    if bt.plan.entropy:
      zdot = jnp.sum(jnp.where(e > 0, e * (zr - m[:, None]), 0.0), axis=1)
    stats, lse, zsum = bt.combine(m, jnp.sum(e, axis=1), zsum, zdot)
    local = y - bt.offset
    here = (local >= 0) & (local < cols)
    zy = jnp.take_along_axis(z, jnp.where(here, local, 0)[:, None], axis=1)[:, 0]
    zy = _core.all_sum(jnp.where(here, zy, 0.0), opts)
    zy = jnp.where(_core.target_in_range(y, bt.vocab), zy, jnp.nan)
    loss = bt.token_loss(lse, zy, zsum, ok)

    def vocab_body(start, width, inner):
      dh, dw, db = inner
      g = bt.grad_block(lax.dynamic_slice_in_dim(z, start, width, axis=1), i, start, stats, scale)
      gq = g.astype(bt.cdt)
      if need_h:
        dh = dh + bt.hidden_grad(gq, bt.columns(start, width))
      if need_w:
        dw_k = bt.weight_grad(h, gq, bt.live(scale))
        dw_k = lax.dynamic_slice_in_dim(dw, start, width, axis=bt.wax) + dw_k
        dw = lax.dynamic_update_slice(dw, dw_k, (start, 0) if bt.vd else (0, start))
      if need_b:
        db_k = lax.dynamic_slice_in_dim(db, start, width) + jnp.sum(g, axis=0)
        db = lax.dynamic_update_slice(db, db_k, (start,))
      return dh, dw, db

    dh = bt.full((rows, bt.hidden.shape[1]), F32) if need_h else None
    dh, dw, db = over_vocab(vocab_body, (dh, dw, db), cols, bt.plan.vocab_chunk)
    at = i * rows
    if need_h:
      dh_c = lax.dynamic_update_slice(dh_c, dh, (at, 0))
    return (
      tuple(lax.dynamic_update_slice(a, x, (at,)) for a, x in zip(stats_c, stats, strict=True)),
      lax.dynamic_update_slice(loss_c, loss, (at,)),
      dh_c,
      dw,
      db,
    )

  zeros = bt.full(bt.valid.shape, F32, rows=True)
  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need_h else None
  dw = bt.full(bt.weight.shape, F32) if need_w else None
  db = bt.full(bt.bias.shape, F32) if need_b else None
  stats_c = (zeros,) * (3 if bt.plan.entropy else 2)
  return lax.fori_loop(0, bt.num_chunks, token_body, (stats_c, zeros, dh_c, dw, db))
