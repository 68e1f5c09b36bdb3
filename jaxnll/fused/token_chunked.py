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
  ``z - m`` once ``log s`` is added).  The per-token residual is therefore the tuple
  ``(m, s)`` (plus ``nu``, the mean of ``z - m``, for the entropy), float32 ``[rows]`` each.
* A ``[V, D]`` head (``weight_layout="vd"``) is contracted on ``D`` in place (``dot_general``
  on the table's rows, no transposed copy); its gradient comes back ``[V, D]``.  Soft-cap and
  temperature are those of :func:`jaxnll._core.softcap`.

The passes follow the interface of :mod:`jaxnll.fused.chunked`:

* ``stats_pass(bt) -> (stats_c, loss_c)``;
* ``grad_pass(bt, scale_c, stats_c, need, entropy_scale_c=None) -> (dh_c, dweight, dbias)``;
* ``one_pass(bt, scale_c, need) -> (stats_c, loss_c, dh_c, dweight, dbias)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.fused import chunked
from jaxnll.fused.compact import Compacted, Plan
from jaxnll.fused.kernel import Request

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


def configure(plan: Plan, request: Request) -> Plan:
  """The plan with this kernel's block: ``C`` from :func:`block_rows` over the head's local
  vocabulary columns (``request``: :class:`jaxnll.fused.kernel.Request`; the vocabulary
  chunk is unused, one matmul spans the whole vocabulary)."""
  rows = block_rows(request.vocab, request.num_tokens, request.token_chunk)
  return dataclasses.replace(plan, token_chunk=rows)


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
  """Row statistics of block ``i``: ``(stats, loss)`` over every vocabulary shard, ``stats``
  the tuple of :meth:`Compacted.combine` (``(m, s)``, and ``nu`` with ``plan.entropy``)."""
  opts = bt.opts
  zr = z if real is None else jnp.where(real, z, jnp.finfo(F32).min)
  m = jnp.max(zr, axis=1)
  e = jnp.exp(zr - m[:, None])
  e = e if real is None else jnp.where(real, e, 0.0)
  zsum = None
  if opts.label_smoothing:
    zsum = jnp.sum(z if real is None else jnp.where(real, z, 0.0), axis=1)
  zdot = None
  if bt.plan.entropy:  # Σ exp(z - m)·(z - m) (a -inf logit adds 0, not NaN)
    zdot = jnp.sum(jnp.where(e > 0, e * (zr - m[:, None]), 0.0), axis=1)
  stats, lse, zsum = bt.combine(m, jnp.sum(e, axis=1), zsum, zdot)
  y = bt.part(bt.targets, i)
  local = y - bt.offset
  here = (local >= 0) & (local < bt.cols)
  zy = jnp.take_along_axis(z, jnp.where(here, local, 0)[:, None], axis=1)[:, 0]
  zy = _core.all_sum(jnp.where(here, zy, 0.0), opts)
  zy = jnp.where(_core.target_in_range(y, bt.vocab), zy, jnp.nan)
  loss = bt.token_loss(lse, zy, zsum, bt.part(bt.valid, i) & fresh(bt, i))
  return stats, loss


def logit_grad(bt: Compacted, z, i, stats, scale, entropy_scale=None):
  """``scale · ∂ℓ/∂x (+ entropy_scale · ∂H/∂x)`` of block ``i`` with the softmax
  ``exp(z - m) / s`` (f32, zero past the last target, at rows of the previous block and at
  padding columns)."""
  g = bt.grad_block(z, i, 0, stats, scale, entropy_scale)
  return jnp.where(fresh(bt, i)[:, None], g, 0.0)


def _put_stats(bt: Compacted, stats_c, stats, i, keep):
  return tuple(_put(bt, a, x, i, keep) for a, x in zip(stats_c, stats, strict=True))


def _stats_init(bt: Compacted):
  rows = bt.valid.shape[0]
  zeros = bt.full((rows,), F32, rows=True)
  return (zeros,) * (3 if bt.plan.entropy else 2), zeros


def _accumulate(bt: Compacted, i, h, g, live, need, dh_c, dw, db):
  """Adds block ``i``'s gradients; ``live``: its rows with a non-zero cotangent (the others'
  hidden states stay out of the weight gradient, NaN or not)."""
  gq = g.astype(bt.cdt)
  if need[0]:
    dh_c = _put(bt, dh_c, bt.hidden_grad(gq, bt.columns(0, bt.cols)), i, fresh(bt, i))
  if need[1]:
    dw = dw + bt.weight_grad(h, gq, live & fresh(bt, i))
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
  """Forward over target blocks: ``(stats, loss [rows])``, float32; ``stats = (m, s[, nu])``
  each ``[rows]``."""

  def body(i, carry):
    stats_c, loss_c = carry
    _, z, real = _block(bt, i)
    stats, loss = _stats(bt, i, z, real)
    new = fresh(bt, i)
    return _put_stats(bt, stats_c, stats, i, new), _put(bt, loss_c, loss, i, new)

  return lax.fori_loop(0, bt.num_chunks, body, _stats_init(bt))


def grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None):
  """Gradients of ``Σ scale·ℓ (+ Σ entropy_scale·H)``, recomputing each block once (two
  matmuls per block); in vocabulary slabs (:func:`slab_grad_pass`) when the f32
  weight-gradient buffer would exceed its budget."""
  if use_slabs(bt, need):
    return slab_grad_pass(bt, scale_c, stats_c, need, entropy_scale_c)
  need = _need(bt, need)

  def body(i, carry):
    h, z, _ = _block(bt, i)
    es = None if entropy_scale_c is None else bt.part(entropy_scale_c, i)
    scale = bt.part(scale_c, i)
    g = logit_grad(bt, z, i, bt.part_stats(stats_c, i), scale, es)
    return _accumulate(bt, i, h, g, bt.live(scale, es), need, *carry)

  return lax.fori_loop(0, bt.num_chunks, body, _grad_init(bt, need))


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """Loss and gradients of ``Σ scale·ℓ`` with each logits block computed once (three matmuls
  per block: ``6·N·D·V`` FLOPs); over the weight-gradient budget, the forward then the
  gradient in vocabulary slabs (:func:`slab_grad_pass`, ``8·N·D·V``)."""
  if use_slabs(bt, need):
    return slab_one_pass(bt, scale_c, need)
  need = _need(bt, need)

  def body(i, carry):
    stats_c, loss_c, *grads = carry
    h, z, real = _block(bt, i)
    stats, loss = _stats(bt, i, z, real)
    scale = bt.part(scale_c, i)
    g = logit_grad(bt, z, i, stats, scale)
    new = fresh(bt, i)
    stats_c = _put_stats(bt, stats_c, stats, i, new)
    loss_c = _put(bt, loss_c, loss, i, new)
    return (stats_c, loss_c, *_accumulate(bt, i, h, g, bt.live(scale), need, *grads))

  return lax.fori_loop(0, bt.num_chunks, body, _stats_init(bt) + _grad_init(bt, need))


# ----------------------------------------------------------------------------- vocabulary slabs
#
# The gradient in vocabulary slabs: the f32 weight-gradient buffer under a budget.
#
# The single pass above sums the weight gradient over token blocks in one f32
# ``[D, V]`` buffer: 4·D·V bytes, twice a bf16 head (2.2 GiB at the Gemma-2 2B head, 87 % of
# what the H100 compile of its forward + backward holds besides arguments and outputs).  When
# that buffer would exceed :data:`WEIGHT_GRAD_BYTES`, the gradient pass runs in ``S`` vocabulary
# slabs instead:
#
# * the log-sum-exp over the whole vocabulary comes first (``token_chunked``'s forward: full
#   vocabulary ``[C, V]`` blocks, ``2·N·D·V`` FLOPs);
# * then per slab of ``K = ceil(V / S)`` columns (a multiple of 128), over the token blocks:
#   the slab's logits ``[C, K]``, ``∂hidden`` (summed into the f32 ``[rows, D]`` buffer over the
#   slabs) and ``∂weight`` into an f32 ``[D, K]`` accumulator, cast once into the gradient
#   (``6·N·D·V``).
#
# Forward + backward is then ``8·N·D·V`` FLOPs (against ``6·N·D·V`` for the single pass of the
# scalar entry; the per-sample entry recomputes its blocks anyway and costs ``8·N·D·V`` either
# way), and the f32 buffer is ``4·D·K`` bytes.  ``S`` is the smallest count that fits the
# budget.  A pass that needs no weight gradient (a frozen head) holds no such buffer and never
# slabs.

#: Bytes the f32 weight-gradient accumulator may take (1 GiB): over it,
#: vocabulary slabs.  At the benchmark table's heads Mistral 7B's buffer (0.5 GiB) stays whole;
#: Llama-3 8B's (2.0 GiB), Gemma-2 2B's (2.2) and Qwen3 8B's (2.3) go in 2, 3 and 3 slabs.
#: The reason for 1 GiB: it is the size of the live logits-block buffers the plan holds
#: anyway (:data:`LOGITS_BLOCK_BYTES`, its gradient in f32 and in
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


def slab_grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None):
  """:func:`grad_pass` over vocabulary slabs (slabs outside, token blocks inside: the
  recomputing gradient pass of :mod:`~jaxnll.fused.chunked` at the slab width, this plan's
  blocks): ``(dh_c [rows, D] f32, dweight in the weight's dtype, dbias in the bias's dtype)``."""
  width = slab_columns(bt.hidden.shape[1], bt.cols)
  keep = lambda i: fresh(bt, i)  # noqa: E731
  return chunked.grad_pass(bt, scale_c, stats_c, need, entropy_scale_c, width=width, keep=keep)


def slab_one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """The scalar entry in slabs: the full-vocabulary forward, then :func:`slab_grad_pass`
  (``8·N·D·V`` FLOPs): ``(stats_c, loss_c, dh_c, dweight, dbias)``."""
  stats_c, loss_c = stats_pass(bt)
  return (stats_c, loss_c, *grad_pass(bt, scale_c, stats_c, need))
