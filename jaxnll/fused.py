"""The language-model head fused with the sub-sequence loss: no ``[B, T, V]`` logits, and work
that follows the number of *target* tokens.

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary,
``N = B·T`` flattened positions, ``C`` token chunk, ``K`` vocabulary chunk.

With ``hidden: [B, T, D]`` and the head ``weight: [D, V]`` (Flax ``Linear`` kernel layout,
optional ``bias: [V]``) the logits are ``x = hidden @ weight + bias``, and

.. math::

   L_b = \\sum_t w_{b,t}\\, \\ell(x_{b,t}, y_{b,t}),

with ``ℓ`` the per-token loss of :func:`jaxnll.token_nll` (same ``z_loss``, ``label_smoothing``
and ``logit_softcap``).  In fine-tuning most positions are context whose loss is masked, and
the logits are the largest tensor of the step (16k tokens × 128k vocabulary is 8 GB in f32).
The kernels here therefore

* **compact** the target positions: a stable sort of the span mask over the flattened ``B·T``
  positions puts every target token first (static shapes), and the token loops run for
  ``ceil(n_targets / C)`` chunks only (a ``while`` loop bounded at run time), so the cost of a
  half-context batch is about half;
* **never store logits**: the forward keeps one float32 log-sum-exp per target token, computed
  chunk by chunk with an online log-sum-exp over vocabulary chunks; the backward recomputes a
  ``[C, K]`` block of logits at a time;
* **accumulate in float32**: every matmul accumulates in f32; the weight gradient is built one
  vocabulary chunk at a time (token loop inside), so it is summed over all token chunks in an
  f32 ``[D, K]`` buffer and cast once — no ``[D, V]`` f32 buffer for bf16 weights.

:func:`linear_sequence_nll` returns per-sample losses and differentiates through a
``custom_vjp`` (forward: one matmul per target token; backward: three).
:func:`linear_nll_loss` returns the scalar batch loss; its forward rule computes the gradients
while each logits block is hot (the fused linear-cross-entropy trick), so forward + backward
costs three matmuls over the target tokens (``schedule="one_pass"``, the default for f32
weights), like the unfused path over all tokens, or four with only chunk-sized f32 buffers
(``"two_pass"``, the default for 16-bit weights).  A gradient nobody asks for (a frozen head)
costs no matmul in either entry.

Reference: T. Xiao and J. Zhu, *Foundations of Large Language Models*, ch. 2-4; the chunked
head follows Liger's fused linear cross-entropy, Cut Cross-Entropy (Wijmans et al., 2024) and
tokamax's ``linear_softmax_cross_entropy_loss``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core
from jaxnll._core import F32, TokenOptions

IMPLEMENTATIONS = ("chunked", "reference")
SCHEDULES = ("auto", "one_pass", "two_pass")

#: Target tokens per chunk (rows of a logits block).  A multiple of 8 keeps matmul tiles full.
DEFAULT_TOKEN_CHUNK = 512
#: Vocabulary columns per chunk.  ``[C, K]`` f32 = 4 MiB at the defaults.
DEFAULT_VOCAB_CHUNK = 2048
#: With 16-bit weights and the default ``vocab_chunk``, the gradient pass widens its chunks to
#: about this many bytes of f32 ``[D, K]`` weight-gradient accumulator (4096 columns at
#: ``D = 4096``).  The weight gradient is written once per chunk, and XLA's CPU backend, which
#: has no in-place bf16 update, rewrites the whole ``[D, V]`` gradient each time: fewer, wider
#: chunks keep that cost small (on other backends it is merely harmless).
WEIGHT_GRAD_CHUNK_BYTES = 64 * 2**20
#: ``one_pass`` keeps a whole ``[C, V]`` f32 row block; ``C`` is capped so that block stays
#: under this many bytes (128 tokens at a 128k vocabulary).
ONE_PASS_BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

  opts: TokenOptions
  token_chunk: int
  vocab_chunk: int
  reduction: str = "sum"
  normalize: str = "tokens"
  one_pass: bool = False
  grad_vocab_chunk: int = 0  # the gradient pass's vocabulary chunk (0: vocab_chunk)

  @property
  def grad_chunk(self) -> int:
    return self.grad_vocab_chunk or self.vocab_chunk


def _in_loop(x: jax.Array, tie) -> jax.Array:
  """``x`` as read by one loop iteration (``tie``: something that changes every iteration).

  XLA's CPU backend has no bf16/f16 slices or gathers: it converts their operand to float32
  and, the operand being loop-invariant, hoists that conversion out of the loop — a float32
  copy of the *whole* head weight (2 GiB at a 128k vocabulary), the very buffer chunking
  avoids.  Tying the array to the iteration through an optimisation barrier keeps the
  conversion fused into the chunk-sized slice.  A no-op for 32-bit arrays and elsewhere.
  """
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
    x, _ = lax.optimization_barrier((x, tie))
  return x


def _dot(a, b, contract):
  """``a · b`` contracting ``contract = (dim_a, dim_b)``, accumulated in float32."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=F32)


def _over_vocab(body, carry, vocab: int, chunk: int):
  """Runs ``body(start, width, carry)`` over vocabulary chunks: a loop of full chunks and the
  remainder as one narrower chunk (static widths, no padded copy of the weight)."""
  full, tail = divmod(vocab, chunk)
  # The narrow chunk goes first so that the loop's result is the final value: a buffer
  # updated after the loop (the weight gradient) would be copied once more.
  if tail:
    carry = body(full * chunk, tail, carry)
  if full == 1:
    carry = body(0, chunk, carry)
  elif full > 1:
    carry = lax.fori_loop(0, full, lambda j, c: body(j * chunk, chunk, c), carry)
  return carry


def _varying_axes(x) -> frozenset:
  """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  axes = getattr(aval, "vma", None)
  if axes is None:
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(axes)


def _vary_alike(hidden, weight, bias, targets, span_mask, *, vocab_axis=None):
  """Under shard_map, marks every array as varying over the axes any of them varies over — as
  a mixed ``hidden @ weight`` would.  The ``custom_vjp`` then returns a varying weight
  gradient, and the transpose of this cast sums it over the mesh (like the unfused path).

  The vocabulary axis is the exception: ``hidden``, ``targets`` and ``span_mask`` stay as they
  are over it (the kernel sums the hidden gradient over the vocabulary shards itself, in
  float32), so the per-sample results come out replicated over it, as from the logits path.
  """
  arrays = (hidden, weight, bias, targets, span_mask)
  axes = frozenset().union(*(_varying_axes(x) for x in arrays if x is not None))
  out = []
  for k, x in enumerate(arrays):
    want = axes if k in (1, 2) or vocab_axis is None else axes - {vocab_axis}
    missing = () if x is None else tuple(sorted(want - _varying_axes(x)))
    out.append(lax.pcast(x, missing, to="varying") if missing else x)
  return out


class _Batch:
  """One call's operands with the target positions compacted to the front.

  A stable sort of the span mask over the flattened ``N = B·T`` positions lists every target
  first (static shapes); ``num_chunks = ceil(n_targets / C)`` bounds the token loops at run
  time, so context positions cost nothing.  Hidden rows are gathered a chunk at a time: no
  compacted copy of ``hidden``.
  """

  def __init__(self, plan: _Plan, hidden, weight, bias, targets, span_mask):
    b, t, d = hidden.shape
    n = b * t
    c = plan.token_chunk
    padded = -(-n // c) * c
    self.plan, self.opts, self.chunk = plan, plan.opts, c
    self.hidden = hidden.reshape(n, d)
    self.weight, self.bias = weight, bias
    # ``cols`` local vocabulary columns holding ids ``offset + [0, cols)``; ``vocab`` is the
    # true vocabulary (all shards, without padding) that the loss formulas use.
    self.cols = weight.shape[1]
    self.offset, self.vocab, self.padded = _core.vocab_layout(self.cols, plan.opts)
    self.cdt = jnp.result_type(hidden.dtype, weight.dtype)
    flat = _core.mask_to_bool(span_mask).reshape(n)
    # Stable, so targets keep their (sample-major) order.
    order = jnp.argsort(jnp.logical_not(flat).astype(jnp.int8), stable=True).astype(jnp.int32)
    count = jnp.sum(flat, dtype=jnp.int32)
    self.num_chunks = (count + c - 1) // c
    self.order = jnp.pad(order, (0, padded - n))
    self.valid = jnp.arange(padded, dtype=jnp.int32) < count
    # inverse[p]: where position p sits in the compacted order.
    self.inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    self.targets = jnp.take(targets.reshape(n).astype(jnp.int32), self.order)
    # Inside shard_map, loop carries must vary over the same mesh axes as what they
    # accumulate: everything here depends on all the inputs.
    args = (hidden, weight, bias, targets, span_mask)
    self.vma = frozenset().union(*(_varying_axes(x) for x in args if x is not None))
    # Per-token statistics are combined over the vocabulary shards: they vary over every axis
    # but the vocabulary's (unless the targets or the mask do).
    axis = plan.opts.vocab_axis
    self.row_vma = (self.vma - {axis}) | _varying_axes(targets) | _varying_axes(span_mask)
    self.sum_hidden_grad = axis is not None and axis not in _varying_axes(hidden)

  def full(self, shape, dtype, value=0, *, rows=False):
    """A loop-carry initial value (varying over the inputs' mesh axes under shard_map);
    ``rows``: a per-token statistic, replicated over the vocabulary shards."""
    x = jnp.full(shape, value, dtype)
    vma = self.row_vma if rows else self.vma
    return lax.pcast(x, tuple(sorted(vma)), to="varying") if vma else x

  # -- per-chunk views
  def part(self, x, i):
    """Chunk ``i`` of a compacted array."""
    return lax.dynamic_slice_in_dim(x, i * self.chunk, self.chunk)

  def rows(self, i):
    """Hidden states of target chunk ``i`` ``[C, D]`` in the matmul dtype; rows past the last
    target are zero, so nothing at a context position (NaN included) is ever used."""
    ids = self.part(self.order, i)
    h = jnp.take(_in_loop(self.hidden, ids), ids, axis=0)
    return jnp.where(self.part(self.valid, i)[:, None], h, jnp.zeros((), h.dtype)).astype(self.cdt)

  def columns(self, start, width):
    """Weight chunk ``[D, width]`` in the matmul dtype."""
    w = lax.dynamic_slice_in_dim(_in_loop(self.weight, start), start, width, axis=1)
    return w.astype(self.cdt)

  def logits(self, h, w, start, width):
    """Capped float32 logits ``[C, width]`` of local columns ``start + [0, width)``."""
    z = _dot(h, w, (1, 0))
    if self.bias is not None:
      z = z + lax.dynamic_slice_in_dim(self.bias, start, width).astype(F32)
    return _core.softcap(z, self.opts)

  def real(self, start, width):
    """bool ``[width]``: which of local columns ``start + [0, width)`` are real tokens, or
    None when no column can be padding."""
    if not self.padded:
      return None
    return _core.real_columns(width, self.offset + start, self.vocab)

  def target_logit(self, h, y):
    """Capped ``h · weight[:, y] (+ bias[y])``: a gather, not a scan of the vocabulary (the
    shard holding ``y`` contributes it).  NaN where ``y`` is outside ``[0, V)``."""
    local = y - self.offset
    here = (local >= 0) & (local < self.cols)
    safe = jnp.where(here, local, 0)
    cols = jnp.take(_in_loop(self.weight, safe), safe, axis=1).astype(F32)  # [D, C]
    z = jnp.sum(h.astype(F32) * cols.T, axis=1)
    if self.bias is not None:
      z = z + jnp.take(self.bias, safe).astype(F32)
    z = _core.all_sum(jnp.where(here, _core.softcap(z, self.opts), 0.0), self.opts)
    return jnp.where(_core.target_in_range(y, self.vocab), z, jnp.nan)

  def combine(self, m, s, zsum):
    """Per-token ``(lse, zsum)`` from each shard's running max ``m``, sum of ``exp(z - m)``
    ``s`` and logit sum (one collective each; the identity without a vocabulary axis)."""
    top = _core.all_max(m, self.opts)
    lse = top + jnp.log(_core.all_sum(s * jnp.exp(m - top), self.opts))
    return lse, (None if zsum is None else _core.all_sum(zsum, self.opts))

  def token_loss(self, lse, zy, zsum, ok):
    loss = _core.loss_from_stats(lse, zy, zsum, self.vocab, self.opts)
    return jnp.where(ok, loss, 0.0)

  def grad_block(self, z, i, start, lse, scale):
    """``scale · ∂ℓ/∂x`` for logits block ``z`` of chunk ``i`` (f32, zero past the targets)."""
    y, ok = self.part(self.targets, i), self.part(self.valid, i)
    g = _core.grad_logits(z, lse, y, self.offset + start, self.vocab, self.opts)
    keep = ok[:, None]
    real = self.real(start, z.shape[1])
    if real is not None:
      keep = keep & real
    return jnp.where(keep, g * scale[:, None], 0.0)

  # -- back to [B, T]
  def uncompact(self, x):
    """Compacted ``x[padded, ...]`` in position order ``[N, ...]``; non-target positions read
    the tail of ``x``, which the passes leave at zero."""
    return jnp.take(x, self.inverse, axis=0)

  def compact(self, x):
    """``x[N]`` in compacted order, zero past the last target."""
    return jnp.where(self.valid, jnp.take(x, self.order), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- passes


def _stats_pass(bt: _Batch):
  """Forward over target chunks: ``(lse, loss)`` per compacted position, float32.

  The log-sum-exp is online over vocabulary chunks, so only a ``[C, K]`` block is live.
  """
  opts, rows = bt.opts, bt.chunk

  def token_body(i, carry):
    lse_c, loss_c = carry
    h = bt.rows(i)

    def vocab_body(start, width, inner):
      m, s, zsum = inner
      z = bt.logits(h, bt.columns(start, width), start, width)
      real = bt.real(start, width)
      if real is not None:  # padding columns of a sharded vocabulary drop out
        z = jnp.where(real, z, jnp.finfo(F32).min)
      m_new = jnp.maximum(m, jnp.max(z, axis=1))
      e = jnp.exp(z - m_new[:, None])
      s = s * jnp.exp(m - m_new) + jnp.sum(e if real is None else jnp.where(real, e, 0.0), axis=1)
      if opts.label_smoothing:
        zsum = zsum + jnp.sum(z if real is None else jnp.where(real, z, 0.0), axis=1)
      return m_new, s, zsum

    init = (bt.full((rows,), F32, jnp.finfo(F32).min), bt.full((rows,), F32))
    m, s, zsum = _over_vocab(vocab_body, init + (init[1],), bt.cols, bt.plan.vocab_chunk)
    lse, zsum = bt.combine(m, s, zsum if opts.label_smoothing else None)
    zy = bt.target_logit(h, bt.part(bt.targets, i))
    loss = bt.token_loss(lse, zy, zsum, bt.part(bt.valid, i))
    at = (i * rows,)
    return lax.dynamic_update_slice(lse_c, lse, at), lax.dynamic_update_slice(loss_c, loss, at)

  zeros = bt.full(bt.valid.shape, F32, rows=True)
  return lax.fori_loop(0, bt.num_chunks, token_body, (zeros, zeros))


def _grad_pass(bt: _Batch, scale_c, lse_c, need=(True, True, True)):
  """Gradients of ``Σ scale·ℓ`` by recomputation: vocabulary chunks outside, target chunks
  inside, so each weight-gradient chunk is summed over all tokens in an f32 ``[D, K]`` buffer
  and cast once.  ``need`` (hidden, weight, bias): a gradient nobody asked for costs no
  matmul (a frozen head saves a third of the work).

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
      g = bt.grad_block(z, i, start, bt.part(lse_c, i), bt.part(scale_c, i))
      gq = g.astype(bt.cdt)
      if need_w:
        dw_k = dw_k + _dot(h, gq, (0, 0))
      if need_b:
        db_k = db_k + jnp.sum(g, axis=0)
      if need_h:
        dh = lax.dynamic_slice_in_dim(dh_c, i * rows, rows) + _dot(gq, w, (1, 1))
        dh_c = lax.dynamic_update_slice(dh_c, dh, (i * rows, 0))
      return dw_k, db_k, dh_c

    dw_k = bt.full((weight.shape[0], width), F32) if need_w else None
    db_k = bt.full((width,), F32) if need_b else None
    dw_k, db_k, dh_c = lax.fori_loop(0, bt.num_chunks, token_body, (dw_k, db_k, dh_c))
    if need_w:
      dw = lax.dynamic_update_slice(dw, dw_k.astype(dw.dtype), (0, start))
    if need_b:
      db = lax.dynamic_update_slice(db, db_k.astype(db.dtype), (start,))
    return dh_c, dw, db

  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need_h else None
  dw = bt.full(weight.shape, weight.dtype) if need_w else None
  db = bt.full(bias.shape, bias.dtype) if need_b else None
  return _over_vocab(vocab_body, (dh_c, dw, db), bt.cols, bt.plan.grad_chunk)


def _one_pass(bt: _Batch, scale_c, need=(True, True, True)):
  """Loss and gradients of ``Σ scale·ℓ`` with each logits block computed once.

  Target chunks outside; a whole ``[C, V]`` f32 row block per chunk (its log-sum-exp is needed
  before any gradient), the gradient matmuls over vocabulary chunks of it.  The weight
  gradient is summed over token chunks in one f32 ``[D, V]`` buffer — the result itself for
  f32 weights.

  Returns ``(lse_c, loss_c, dh_c [padded, D] f32, dweight f32, dbias f32)``, ``None`` for
  a gradient not in ``need`` (hidden, weight, bias).
  """
  rows, cols, opts = bt.chunk, bt.cols, bt.opts
  need_h, need_w, need_b = need[0], need[1], need[2] and bt.bias is not None

  def token_body(i, carry):
    lse_c, loss_c, dh_c, dw, db = carry
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
    lse, zsum = bt.combine(m, jnp.sum(e if real is None else jnp.where(real, e, 0.0), axis=1), zsum)
    local = y - bt.offset
    here = (local >= 0) & (local < cols)
    zy = jnp.take_along_axis(z, jnp.where(here, local, 0)[:, None], axis=1)[:, 0]
    zy = _core.all_sum(jnp.where(here, zy, 0.0), opts)
    zy = jnp.where(_core.target_in_range(y, bt.vocab), zy, jnp.nan)
    loss = bt.token_loss(lse, zy, zsum, ok)

    def vocab_body(start, width, inner):
      dh, dw, db = inner
      g = bt.grad_block(lax.dynamic_slice_in_dim(z, start, width, axis=1), i, start, lse, scale)
      gq = g.astype(bt.cdt)
      if need_h:
        dh = dh + _dot(gq, bt.columns(start, width), (1, 1))
      if need_w:
        dw_k = lax.dynamic_slice_in_dim(dw, start, width, axis=1) + _dot(h, gq, (0, 0))
        dw = lax.dynamic_update_slice(dw, dw_k, (0, start))
      if need_b:
        db_k = lax.dynamic_slice_in_dim(db, start, width) + jnp.sum(g, axis=0)
        db = lax.dynamic_update_slice(db, db_k, (start,))
      return dh, dw, db

    dh = bt.full((rows, bt.hidden.shape[1]), F32) if need_h else None
    dh, dw, db = _over_vocab(vocab_body, (dh, dw, db), cols, bt.plan.vocab_chunk)
    at = i * rows
    if need_h:
      dh_c = lax.dynamic_update_slice(dh_c, dh, (at, 0))
    return (
      lax.dynamic_update_slice(lse_c, lse, (at,)),
      lax.dynamic_update_slice(loss_c, loss, (at,)),
      dh_c,
      dw,
      db,
    )

  zeros = bt.full(bt.valid.shape, F32, rows=True)
  dh_c = bt.full((bt.valid.shape[0], bt.hidden.shape[1]), F32) if need_h else None
  dw = bt.full(bt.weight.shape, F32) if need_w else None
  db = bt.full(bt.bias.shape, F32) if need_b else None
  return lax.fori_loop(0, bt.num_chunks, token_body, (zeros, zeros, dh_c, dw, db))


# ----------------------------------------------------------------------------- shared steps


def _per_sample(bt: _Batch, loss_c, span_mask):
  """Per-sample sums ``Σ_t w_t ℓ_t`` from compacted per-token losses (float32 ``[B]``)."""
  loss = bt.uncompact(loss_c).reshape(span_mask.shape)
  mask = _core.mask_to_bool(span_mask)
  weights = _core.mask_to_weights(span_mask)
  return jnp.sum(jnp.where(mask, loss * weights, 0.0), axis=1, dtype=F32)


def _counts(span_mask):
  return jnp.sum(_core.mask_to_weights(span_mask), axis=1, dtype=F32)


def _safe_inverse(x):
  nonzero = x != 0
  return jnp.where(nonzero, 1.0 / jnp.where(nonzero, x, 1.0), 0.0)


def _compact_scale(bt: _Batch, per_sample, span_mask):
  """Per-token loss weights ``per_sample[b] · w_{b,t}`` in compacted order (float32)."""
  return bt.compact((per_sample[:, None] * _core.mask_to_weights(span_mask)).reshape(-1))


def _finish_grads(bt: _Batch, dh_c, dw, db, hidden, weight, bias):
  """Compacted f32 results as gradients in the inputs' layout and dtypes (``None`` stays)."""
  if dh_c is not None and bt.sum_hidden_grad:
    # Each vocabulary shard holds its part of ``∂/∂hidden``; summed in float32 (a hidden that
    # already varies over the vocabulary axis gets its own part, as JAX's autodiff would).
    dh_c = jax.lax.psum(dh_c, bt.opts.vocab_axis)
  dh = None if dh_c is None else bt.uncompact(dh_c).reshape(hidden.shape).astype(hidden.dtype)
  dw = None if dw is None else dw.astype(weight.dtype)
  return dh, dw, (None if db is None else db.astype(bias.dtype))


# ----------------------------------------------------------------------------- per-sample entry


def _sequence_value(plan, hidden, weight, bias, targets, span_mask):
  bt = _Batch(plan, hidden, weight, bias, targets, span_mask)
  lse_c, loss_c = _stats_pass(bt)
  sums = _per_sample(bt, loss_c, span_mask)
  if plan.reduction == "mean":
    sums = sums * _safe_inverse(_counts(span_mask))
  return sums, lse_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sequence(plan, hidden, weight, bias, targets, span_mask):
  return _sequence_value(plan, hidden, weight, bias, targets, span_mask)[0]


def _primal(x):
  return x.value if isinstance(x, CustomVJPPrimal) else x


def _needed(hidden, weight, bias):
  """Which of (hidden, weight, bias) are differentiated, as residual-safe pytree structure
  (``()`` yes, ``None`` no: static, unlike a bool leaf)."""
  return tuple(
    () if isinstance(x, CustomVJPPrimal) and x.perturbed else None for x in (hidden, weight, bias)
  )


def _sequence_fwd(plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  args = [_primal(x) for x in (hidden, weight, bias, targets, span_mask)]
  out, lse_c = _sequence_value(plan, *args)
  # Residuals: the inputs (already live) and one f32 log-sum-exp per position.
  return out, (*args, lse_c, need)


def _sequence_grads(plan, res, per_sample):
  """Gradients of ``Σ_b per_sample[b] · Σ_t w_t ℓ_t`` (hidden, weight, bias)."""
  hidden, weight, bias, targets, span_mask, lse_c, need = res
  need = tuple(x is not None for x in need)
  bt = _Batch(plan, hidden, weight, bias, targets, span_mask)
  dh_c, dw, db = _grad_pass(bt, _compact_scale(bt, per_sample, span_mask), lse_c, need)
  return _finish_grads(bt, dh_c, dw, db, hidden, weight, bias)


def _sequence_bwd(plan, res, ct):
  if isinstance(ct, SymbolicZero):
    return (None,) * 5
  span_mask = res[4]
  if plan.reduction == "mean":
    ct = ct * _safe_inverse(_counts(span_mask))
  dh, dw, db = _sequence_grads(plan, res, ct)
  return dh, dw, db, None, None


_sequence.defvjp(_sequence_fwd, _sequence_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- scalar entry


def _batch_weights(sums, counts, normalize):
  """``∂ loss / ∂ sums[b]``: the batch loss is linear in the per-sample sums."""
  from jaxnll.nll import batch_loss

  return jax.grad(lambda s: batch_loss(s, counts, normalize=normalize))(sums)


def _batch_value(sums, counts, normalize):
  from jaxnll.nll import batch_loss

  return batch_loss(sums, counts, normalize=normalize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(plan, hidden, weight, bias, targets, span_mask):
  sums, _ = _sequence_value(plan, hidden, weight, bias, targets, span_mask)
  return _batch_value(sums, _counts(span_mask), plan.normalize), sums


def _loss_fwd(plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  wanted = tuple(x is not None for x in need)
  hidden, weight, bias, targets, span_mask = (
    _primal(x) for x in (hidden, weight, bias, targets, span_mask)
  )
  counts = _counts(span_mask)
  # Which tokens get which weight is known before any logit: the gradient can be built in the
  # same pass as the loss.
  per_sample = _batch_weights(jnp.zeros_like(counts), counts, plan.normalize)
  bt = _Batch(plan, hidden, weight, bias, targets, span_mask)
  scale_c = _compact_scale(bt, per_sample, span_mask)
  if plan.one_pass:
    lse_c, loss_c, dh_c, dw, db = _one_pass(bt, scale_c, wanted)
  else:
    lse_c, loss_c = _stats_pass(bt)
    dh_c, dw, db = _grad_pass(bt, scale_c, lse_c, wanted)
  grads = _finish_grads(bt, dh_c, dw, db, hidden, weight, bias)
  sums = _per_sample(bt, loss_c, span_mask)
  loss = _batch_value(sums, counts, plan.normalize)
  return (loss, sums), (grads, (hidden, weight, bias, targets, span_mask, lse_c, need))


def _scaled(ct, g):
  return None if g is None else (ct * g.astype(F32)).astype(g.dtype)


def _add(a, b):
  if a is None or b is None:
    return b if a is None else a
  return (a.astype(F32) + b.astype(F32)).astype(a.dtype)


def _loss_bwd(plan, res, cts):
  (dh, dw, db), seq_res = res
  ct_loss, ct_sums = cts
  if isinstance(ct_loss, SymbolicZero):
    grads = [None, None, None]
  else:
    grads = [_scaled(ct_loss, dh), _scaled(ct_loss, dw), _scaled(ct_loss, db)]
  if not isinstance(ct_sums, SymbolicZero):
    # The per-sample sums were differentiated too: one more (recomputing) gradient pass.
    extra = _sequence_grads(plan, seq_res, ct_sums)
    grads = [_add(g, e) for g, e in zip(grads, extra, strict=True)]
  return (*grads, None, None)


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- public API


def _check(hidden, weight, targets, span_mask, bias):
  _core.check_floating("hidden", hidden)
  _core.check_floating("weight", weight)
  _core.check_integer("targets", targets)
  _core.check_mask("span_mask", span_mask)
  _core.check_rank("hidden", hidden, (3,), "[B, T, D]")
  _core.check_rank("weight", weight, (2,), "[D, V]")
  hs, ws = jnp.shape(hidden), jnp.shape(weight)
  if hs[2] != ws[0]:
    raise ValueError(
      f"weight must have shape [D, V] with D = hidden.shape[-1] = {hs[2]}, "
      f"got hidden {hs} and weight {ws}"
    )
  for name, x in (("targets", targets), ("span_mask", span_mask)):
    if jnp.shape(x) != hs[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hs[:2]}, got shape {jnp.shape(x)}")
  if bias is not None:
    _core.check_floating("bias", bias)
    if jnp.shape(bias) != ws[1:]:
      raise ValueError(f"bias must have shape [V] = {ws[1:]}, got shape {jnp.shape(bias)}")


def _chunks(token_chunk, vocab_chunk, num_tokens, weight):
  """``(token_chunk, vocab_chunk, grad_vocab_chunk)`` after defaults and clipping."""
  for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive Python int or None, got {value!r}")
  d, vocab = weight.shape
  tc = DEFAULT_TOKEN_CHUNK if token_chunk is None else token_chunk
  vc = max(1, min(DEFAULT_VOCAB_CHUNK if vocab_chunk is None else vocab_chunk, vocab))
  gc = vc
  if vocab_chunk is None and jnp.dtype(weight.dtype).itemsize < 4:
    gc = min(vocab, max(vc, WEIGHT_GRAD_CHUNK_BYTES // (4 * d) // vc * vc))
  return max(1, min(tc, num_tokens)), vc, gc


def _reference_logits(hidden, weight, bias):
  logits = hidden @ weight
  return logits if bias is None else logits + bias


def linear_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  bias: Float[Array, " V"] | None = None,
  reduction: str = "sum",
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  implementation: str = "chunked",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> Float[Array, " B"]:
  """Per-sample NLL of the target span through the LM head, without the ``[B, T, V]`` logits.

  Equal, in value and in gradients with respect to ``hidden``, ``weight`` and ``bias``, to

  .. math::

     L_b = \\sum_t w_{b,t}\\, \\ell(h_{b,t} W + \\beta,\\; y_{b,t})
     \\quad = \\texttt{sequence\\_nll(hidden @ weight + bias, targets, span\\_mask)},

  but only target positions are computed: the cost grows with the number of target tokens,
  not ``B·T``.  The forward keeps one float32 log-sum-exp per target token; the backward
  recomputes the logits a ``[C, K]`` block at a time (one matmul forward, three backward).

  Args:
    hidden: ``[B, T, D]`` final hidden states, any floating dtype.
    weight: ``[D, V]`` head kernel (Flax ``Linear`` layout), any floating dtype.  Matmuls run
      in ``result_type(hidden, weight)`` and accumulate in float32.
    targets: ``[B, T]`` integer ids, already shifted (:func:`jaxnll.shift_targets`); only read
      inside the span.  An id outside ``[0, V)`` inside the span makes that sample NaN
      (:func:`checked` raises a clear error instead).
    span_mask: ``[B, T]`` bool mask or float weights of the target positions.  Positions
      outside it are never read: NaN/inf hidden states there reach no value or gradient.  Float
      weights get no gradient.
    bias: optional ``[V]`` head bias.
    reduction: ``"sum"`` (``-log Pr(y|x)``) or ``"mean"`` (per target token; 0 if empty).
    z_loss, label_smoothing, logit_softcap: as in :func:`jaxnll.token_nll`.
    vocab_axis: inside ``shard_map``, the mesh axis over which the vocabulary is sharded:
      ``weight`` (and ``bias``) are then the local columns (shard ``i`` holding ids
      ``[i·V, (i+1)·V)``), each device computes only its slice, the per-token log-sum-exp
      and target logit are combined with collectives (Megatron-style vocabulary-parallel
      cross-entropy) and the result is the full-vocabulary loss, replicated over the axis.
      ``hidden``, ``targets`` and ``span_mask`` are the same on every shard of the axis; the
      gradient for ``hidden`` is summed over the shards.  :mod:`jaxnll.parallel` builds the
      ``shard_map`` for a given mesh.
    vocab_size: the true vocabulary when the (sharded) columns are padded, for example to a
      multiple of the shard count; padding columns never count.
    implementation: ``"chunked"`` (this kernel) or ``"reference"`` (materialise the logits and
      call :func:`jaxnll.sequence_nll`).
    token_chunk: target tokens per block, default :data:`DEFAULT_TOKEN_CHUNK` (512).  The
      skipping granularity: a batch with ``n`` targets runs ``ceil(n / token_chunk)`` blocks.
    vocab_chunk: vocabulary columns per block, default :data:`DEFAULT_VOCAB_CHUNK` (2048;
      with 16-bit weights the backward widens the default, see
      :data:`WEIGHT_GRAD_CHUNK_BYTES`).  Neither chunk needs to divide ``B·T`` or ``V``.

  Returns:
    float32 ``[B]``; gradients come back in the inputs' dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y = jnp.ones((2, 5), int)
    >>> span = jnp.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    >>> fused = linear_sequence_nll(h, w, y, span, token_chunk=2, vocab_chunk=4)
    >>> plain = linear_sequence_nll(h, w, y, span, implementation="reference")
    >>> bool(jnp.allclose(fused, plain, rtol=1e-5)), float(fused[1])
    (True, 0.0)
  """
  _check(hidden, weight, targets, span_mask, bias)
  _core.check_choice("reduction", reduction, ("sum", "mean"))
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  opts = TokenOptions(z_loss, label_smoothing, logit_softcap, vocab_axis, vocab_size)
  hidden, weight, targets, span_mask = map(jnp.asarray, (hidden, weight, targets, span_mask))
  bias = None if bias is None else jnp.asarray(bias)
  b, t, _ = hidden.shape
  tc, vc, gc = _chunks(token_chunk, vocab_chunk, b * t, weight)
  if implementation == "reference":
    from jaxnll.nll import sequence_nll

    logits = _reference_logits(hidden, weight, bias)
    return sequence_nll(logits, targets, span_mask, reduction=reduction, **dataclasses.asdict(opts))
  plan = _Plan(opts, tc, vc, reduction=reduction, grad_vocab_chunk=gc)
  return _sequence(
    plan, *_vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis)
  )


def linear_nll_loss(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  normalize: str = "tokens",
  bias: Float[Array, " V"] | None = None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  implementation: str = "chunked",
  schedule: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, " B"]]:
  """The scalar training loss through the LM head, with the gradients built in the forward.

  ``loss = batch_loss(sums, counts, normalize=normalize)`` with
  ``sums = linear_sequence_nll(..., reduction="sum")`` and ``counts`` the span weight sums
  (see :func:`jaxnll.batch_loss`).  Because the loss is one scalar, the ``custom_vjp``
  forward rule computes ``∂loss/∂hidden``, ``∂loss/∂weight`` and ``∂loss/∂bias`` while each
  logits block is hot and the backward only scales them by the incoming cotangent.

  Schedules (``schedule=``):

  * ``"one_pass"``: each logits block is computed once — three matmuls over the target
    tokens, the same matmul work as the unfused path over target tokens.  It holds a
    ``[C, V]`` f32 block (``C`` capped by :data:`ONE_PASS_BLOCK_BYTES`) and sums the weight
    gradient over token chunks in one f32 ``[D, V]`` buffer.
  * ``"two_pass"``: a log-sum-exp pass then a gradient pass (four matmuls) with only
    ``[C, K]`` and ``[D, K]`` f32 blocks — for bf16 heads, where a ``[D, V]`` f32 buffer would
    be twice the weight.
  * ``"auto"`` (default): ``one_pass`` for float32 weights (its f32 buffer is the gradient
    itself), ``two_pass`` otherwise.

  The per-sample sums (aux output) are differentiable too: a non-zero cotangent for them
  (rare: ``has_aux`` passes none) costs one extra recomputing gradient pass.

  Args:
    hidden, weight, targets, span_mask, bias: as in :func:`linear_sequence_nll`.
    normalize: ``"tokens"`` (``Σ sums / Σ counts``, the default), ``"samples"`` (mean of
      per-sample means over non-empty samples) or ``"sum"``.
    z_loss, label_smoothing, logit_softcap: as in :func:`jaxnll.token_nll`.
    vocab_axis, vocab_size: vocabulary-parallel head, as in :func:`linear_sequence_nll`.
    implementation: ``"chunked"`` or ``"reference"`` (materialised logits, then
      :func:`jaxnll.sequence_nll` and :func:`jaxnll.batch_loss`).
    schedule: ``"auto"``, ``"one_pass"`` or ``"two_pass"`` (above).
    token_chunk, vocab_chunk: as in :func:`linear_sequence_nll`.

  Returns:
    ``(loss, sums)``: float32 scalar and float32 ``[B]`` per-sample sums.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((2, 5), int), jnp.ones((2, 5), bool)
    >>> f = lambda w: linear_nll_loss(h, w, y, span, token_chunk=4)
    >>> (loss, sums), g = jax.value_and_grad(f, has_aux=True)(w)
    >>> bool(jnp.isclose(loss, sums.sum() / 10)), g.shape
    (True, (8, 11))
  """
  _check(hidden, weight, targets, span_mask, bias)
  from jaxnll.nll import NORMALIZATIONS

  _core.check_choice("normalize", normalize, NORMALIZATIONS)
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  _core.check_choice("schedule", schedule, SCHEDULES)
  opts = TokenOptions(z_loss, label_smoothing, logit_softcap, vocab_axis, vocab_size)
  hidden, weight, targets, span_mask = map(jnp.asarray, (hidden, weight, targets, span_mask))
  bias = None if bias is None else jnp.asarray(bias)
  if implementation == "reference":
    from jaxnll.nll import batch_loss, sequence_nll_and_count

    logits = _reference_logits(hidden, weight, bias)
    sums, counts = sequence_nll_and_count(logits, targets, span_mask, **dataclasses.asdict(opts))
    return batch_loss(sums, counts, normalize=normalize), sums
  b, t, _ = hidden.shape
  vocab = weight.shape[1]
  one_pass = schedule == "one_pass" or (schedule == "auto" and weight.dtype == F32)
  if one_pass and token_chunk is None:
    token_chunk = max(8, min(DEFAULT_TOKEN_CHUNK, ONE_PASS_BLOCK_BYTES // (4 * vocab)) // 8 * 8)
  tc, vc, gc = _chunks(token_chunk, vocab_chunk, b * t, weight)
  plan = _Plan(opts, tc, vc, normalize=normalize, one_pass=one_pass, grad_vocab_chunk=gc)
  return _loss(plan, *_vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis))


# ----------------------------------------------------------------------------- checked path


def check_inputs(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  vocab_size: int | None = None,
) -> None:
  """Run-time checks of the fused losses' inputs, for use under ``checkify.checkify``.

  Flags a target id outside ``[0, V)`` (``V = vocab_size or weight.shape[1]``) and a
  non-finite hidden state at a position inside the span.  Positions outside every span are
  not checked: they never reach values or gradients.
  """
  vocab = weight.shape[1] if vocab_size is None else vocab_size
  _core.check_span_values("hidden", hidden, targets, span_mask, vocab)


def checked(loss_fn):
  """Wraps a fused loss ``(hidden, weight, targets, span_mask, ...)`` with run-time checks.

  The fast path turns a bad value inside a span into a NaN for that sample (loud, but it
  says nothing of where); the checked version raises
  :class:`jax.experimental.checkify.JaxRuntimeError` naming the first offending position.
  Inside your own ``jax.jit``, call :func:`check_inputs` in a function you transform with
  ``checkify.checkify``.

  Examples:
    >>> import jax.numpy as jnp
    >>> safe = checked(linear_sequence_nll)
    >>> h, w, span = jnp.zeros((1, 3, 4)), jnp.zeros((4, 5)), jnp.ones((1, 3), bool)
    >>> safe(h, w, jnp.array([[0, 7, 1]]), span)
    Traceback (most recent call last):
    ...
    jax._src.checkify.JaxRuntimeError: targets hold 7 at flat position 1 inside the span, ...
  """
  from jax.experimental import checkify

  @functools.wraps(loss_fn)
  def wrapped(hidden, weight, targets, span_mask, *args, **kwargs):
    def run(hidden, weight, targets, span_mask, *args):
      check_inputs(hidden, weight, targets, span_mask, vocab_size=kwargs.get("vocab_size"))
      return loss_fn(hidden, weight, targets, span_mask, *args, **kwargs)

    err, out = checkify.checkify(run)(hidden, weight, targets, span_mask, *args)
    err.throw()
    return out

  return wrapped
