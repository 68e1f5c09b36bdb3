"""``token_chunked``'s gradient in vocabulary slabs: its f32 weight-gradient buffer under a budget.

:mod:`~jaxnll.fused.token_chunked` sums the weight gradient over token blocks in one f32
``[D, V]`` buffer: 4·D·V bytes, twice a bf16 head (2.2 GiB at the Gemma-2 2B head, 87 % of
what the H100 compile of its forward + backward holds besides arguments and outputs).  When
that buffer would exceed :data:`WEIGHT_GRAD_BYTES`, the gradient pass runs in ``S`` vocabulary
slabs instead:

* the log-sum-exp over the whole vocabulary comes first (``token_chunked``'s forward: full
  vocabulary ``[C, V]`` blocks, ``2·N·D·V`` FLOPs);
* then per slab of ``K = ceil(V / S)`` columns (a multiple of 128), over the token blocks:
  the slab's logits ``[C, K]``, ``∂hidden`` (summed into the f32 ``[rows, D]`` buffer over the
  slabs) and ``∂weight`` into an f32 ``[D, K]`` accumulator, cast once into the gradient
  (``6·N·D·V``).

Forward + backward is then ``8·N·D·V`` FLOPs (against ``6·N·D·V`` for the single pass of the
scalar entry; the per-sample entry recomputes its blocks anyway and costs ``8·N·D·V`` either
way), and the f32 buffer is ``4·D·K`` bytes.  ``S`` is the smallest count that fits the
budget.  A pass that needs no weight gradient (a frozen head) holds no such buffer and never
slabs.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxnll._core import F32
from jaxnll.fused import token_chunked
from jaxnll.fused.chunked import _over_vocab
from jaxnll.fused.compact import Compacted

#: Bytes the f32 weight-gradient accumulator of ``token_chunked`` may take (1 GiB): over it,
#: vocabulary slabs.  At the benchmark table's heads Mistral 7B's buffer (0.5 GiB) stays whole;
#: Llama-3 8B's (2.0 GiB), Gemma-2 2B's (2.2) and Qwen3 8B's (2.3) go in 2, 3 and 3 slabs.
#: The reason for 1 GiB: it is the size of the live logits-block buffers the plan holds
#: anyway (:data:`~jaxnll.fused.token_chunked.LOGITS_BLOCK_BYTES`, its gradient in f32 and in
#: the matmul dtype), so that no one buffer dominates the plan's memory; the price is a
#: quarter more matmul work for the scalar entry at those heads (``8·N·D·V`` for ``6·N·D·V``).
#: Compiled memory of both plans: ``bench/results/aot.md`` (compiled for H100, not run).
WEIGHT_GRAD_BYTES = 2**30


def slab_columns(hidden_size: int, cols: int, budget: int | None = None) -> int:
  """Columns per slab for a ``[hidden_size, cols]`` head: ``cols`` (one slab) if its f32
  gradient fits ``budget`` (default :data:`WEIGHT_GRAD_BYTES`), else ``ceil(cols / S)``
  rounded up to a multiple of 128 for the least ``S`` that fits."""
  budget = WEIGHT_GRAD_BYTES if budget is None else budget
  need = 4 * hidden_size * cols
  if need <= budget:
    return cols
  slabs = -(-need // max(budget, 1))
  width = -(-cols // slabs)
  return min(cols, max(128, -(-width // 128) * 128))


def use_slabs(bt: Compacted, need) -> bool:
  """Whether the gradient pass of ``bt`` runs in slabs (it needs the weight gradient and its
  f32 buffer would exceed the budget)."""
  return bool(need[1]) and slab_columns(bt.hidden.shape[1], bt.cols) < bt.cols


def grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None):
  """``token_chunked.grad_pass`` over vocabulary slabs (slabs outside, token blocks inside):
  ``(dh_c [rows, D] f32, dweight in the weight's dtype, dbias in the bias's dtype)``."""
  need_h, need_w, need_b = token_chunked._need(bt, need)

  def slab(start, width, carry):
    dh_c, dw, db = carry
    w = bt.columns(start, width)

    def body(i, inner):
      dw_k, db_k, dh_c = inner
      h = bt.rows(i)
      z = bt.logits(h, w, start, width)
      es = None if entropy_scale_c is None else bt.part(entropy_scale_c, i)
      g = bt.grad_block(z, i, start, bt.part_stats(stats_c, i), bt.part(scale_c, i), es)
      # Rows of a shifted last block that belong to the block before add nothing.
      g = jnp.where(token_chunked.fresh(bt, i)[:, None], g, 0.0)
      gq = g.astype(bt.cdt)
      if need_w:
        dw_k = dw_k + bt.weight_grad(h, gq)
      if need_b:
        db_k = db_k + jnp.sum(g, axis=0)
      if need_h:  # read and written back at the same (clamped) start
        dh = bt.part(dh_c, i) + bt.hidden_grad(gq, w)
        dh_c = lax.dynamic_update_slice_in_dim(dh_c, dh, i * bt.chunk, 0)
      return dw_k, db_k, dh_c

    dw_k = bt.full(bt.weight_shape(width), F32) if need_w else None
    db_k = bt.full((width,), F32) if need_b else None
    dw_k, db_k, dh_c = lax.fori_loop(0, bt.num_chunks, body, (dw_k, db_k, dh_c))
    if need_w:
      at = (start, 0) if bt.vd else (0, start)
      dw = lax.dynamic_update_slice(dw, dw_k.astype(dw.dtype), at)
    if need_b:
      db = lax.dynamic_update_slice(db, db_k.astype(db.dtype), (start,))
    return dh_c, dw, db

  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need_h else None
  dw = bt.full(bt.weight.shape, bt.weight.dtype) if need_w else None
  db = bt.full(bt.bias.shape, bt.bias.dtype) if need_b else None
  width = slab_columns(bt.hidden.shape[1], bt.cols)
  return _over_vocab(slab, (dh_c, dw, db), bt.cols, width)


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """The scalar entry in slabs: ``token_chunked``'s forward, then :func:`grad_pass`
  (``8·N·D·V`` FLOPs): ``(stats_c, loss_c, dh_c, dweight, dbias)``."""
  stats_c, loss_c = token_chunked.stats_pass(bt)
  return (stats_c, loss_c, *grad_pass(bt, scale_c, stats_c, need))
