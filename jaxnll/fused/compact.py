"""Span compaction shared by every fused implementation.

A stable sort of the span mask over the flattened ``N = B·T`` positions lists every target
position first, with static shapes; :class:`Compacted` holds one call's operands in that order
together with the per-chunk views (hidden rows, weight columns, capped logits, the target
logit, per-token gradients of the loss) that the implementations build their loops from, and
the way back to ``[B, T]``.  Context positions are never read: rows past the last target are
zero, so NaN/inf there reaches no value or gradient.

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary,
``N = B·T`` flattened positions, ``C`` token chunk, ``K`` vocabulary chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxnll import _core
from jaxnll._core import F32, TokenOptions


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

  opts: TokenOptions
  token_chunk: int
  vocab_chunk: int
  reduction: str = "sum"
  normalize: str = "tokens"
  one_pass: bool = False
  grad_vocab_chunk: int = 0  # the gradient pass's vocabulary chunk (0: vocab_chunk)
  implementation: str = "chunked"
  #: Compacted rows at least (0: ``ceil(N / token_chunk) · token_chunk``): ``"auto"`` gives
  #: every branch the same padded length, so that their results have one shape.
  padded_rows: int = 0
  #: ``"auto"``: the plans of the per-platform kernels (see :mod:`jaxnll.fused.auto`).
  branches: tuple = ()
  weight_layout: str = "dv"  # "dv": weight [D, V]; "vd": weight [V, D] (an embedding table)
  entropy: bool = False  # the forward also keeps each row's mean logit (for the entropy)
  #: The scalar entry: its sums per segment ``[B, num_segments]`` (0: per sample ``[B]``).
  num_segments: int = 0
  #: The per-sample and per-token entries: the forward also accumulates the unnormalised
  #: hidden gradient (a kernel with ``forward_with_hidden``, :mod:`jaxnll.fused.pallas_tpu`),
  #: which the backward scales by the cotangent (no hidden-gradient kernel).
  hidden_grad_in_forward: bool = False
  #: Inside ``shard_map(..., check_vma=False)`` with a vocabulary axis: the results'
  #: cotangents arrive split over the shards and the shards' hidden gradients are summed by
  #: ``shard_map`` itself (see :func:`jaxnll._core.cotangents_split`).
  cotangents_split: bool = False

  @property
  def grad_chunk(self) -> int:
    return self.grad_vocab_chunk or self.vocab_chunk


def in_loop(x: jax.Array, tie) -> jax.Array:
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


def dot(a, b, contract):
  """``a · b`` contracting ``contract = (dim_a, dim_b)``, accumulated in float32."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=F32)


def varying_axes(x) -> frozenset:
  """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  axes = getattr(aval, "vma", None)
  if axes is None:
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(axes)


def vary_alike(hidden, weight, bias, targets, span_mask, *, vocab_axis=None):
  """Under shard_map, marks every array as varying over the axes any of them varies over — as
  a mixed ``hidden @ weight`` would.  The ``custom_vjp`` then returns a varying weight
  gradient, and the transpose of this cast sums it over the mesh (like the unfused path).

  The vocabulary axis is the exception: ``hidden``, ``targets`` and ``span_mask`` stay as they
  are over it (the kernel sums the hidden gradient over the vocabulary shards itself, in
  float32), so the per-sample results come out replicated over it, as from the logits path.
  """
  arrays = (hidden, weight, bias, targets, span_mask)
  axes = frozenset().union(*(varying_axes(x) for x in arrays if x is not None))
  out = []
  for k, x in enumerate(arrays):
    want = axes if k in (1, 2) or vocab_axis is None else axes - {vocab_axis}
    missing = () if x is None else tuple(sorted(want - varying_axes(x)))
    out.append(lax.pcast(x, missing, to="varying") if missing else x)
  return out


class Compacted:
  """One call's operands with the target positions compacted to the front.

  A stable sort of the span mask over the flattened ``N = B·T`` positions lists every target
  first (static shapes); ``num_chunks = ceil(n_targets / C)`` bounds the token loops at run
  time, so context positions cost nothing.  Hidden rows are gathered a chunk at a time: no
  compacted copy of ``hidden``.
  """

  def __init__(self, plan: Plan, hidden, weight, bias, targets, span_mask):
    b, t, d = hidden.shape
    n = b * t
    c = plan.token_chunk
    padded = max(-(-n // c) * c, plan.padded_rows)
    self.plan, self.opts, self.chunk = plan, plan.opts, c
    self.hidden = hidden.reshape(n, d)
    self.weight, self.bias = weight, bias
    # "vd": the head is a [V, D] table; blocks are its rows, contracted on D in place (no
    # transposed copy), and the weight gradient comes back [V, D].
    self.vd = plan.weight_layout == "vd"
    self.wax = 0 if self.vd else 1  # the weight's vocabulary axis
    # ``cols`` local vocabulary columns holding ids ``offset + [0, cols)``; ``vocab`` is the
    # true vocabulary (all shards, without padding) that the loss formulas use.
    self.cols = weight.shape[self.wax]
    self.offset, self.vocab, self.padded = _core.vocab_layout(self.cols, plan.opts)
    self.cdt = jnp.result_type(hidden.dtype, weight.dtype)
    flat = _core.mask_to_bool(span_mask).reshape(n)
    # Stable, so targets keep their (sample-major) order.
    order = jnp.argsort(jnp.logical_not(flat).astype(jnp.int8), stable=True).astype(jnp.int32)
    count = jnp.sum(flat, dtype=jnp.int32)
    # The default integer type (int64 under ``jax_enable_x64``): loop indices then agree with
    # the Python ints they are combined with in ``dynamic_update_slice`` start indices.
    self.num_chunks = jnp.asarray((count + c - 1) // c, dtype=int)
    self.order = jnp.pad(order, (0, padded - n))
    self.valid = jnp.arange(padded, dtype=jnp.int32) < count
    # inverse[p]: where position p sits in the compacted order.
    self.inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    self.targets = jnp.take(targets.reshape(n).astype(jnp.int32), self.order)
    # Inside shard_map, loop carries must vary over the same mesh axes as what they
    # accumulate: everything here depends on all the inputs.
    args = (hidden, weight, bias, targets, span_mask)
    self.vma = frozenset().union(*(varying_axes(x) for x in args if x is not None))
    # Per-token statistics are combined over the vocabulary shards: they vary over every axis
    # but the vocabulary's (unless the targets or the mask do).
    axis = plan.opts.vocab_axis
    self.row_vma = (self.vma - {axis}) | varying_axes(targets) | varying_axes(span_mask)
    # With check_vma off, shard_map's transpose sums each shard's hidden gradient itself.
    self.sum_hidden_grad = (
      axis is not None and axis not in varying_axes(hidden) and not plan.cotangents_split
    )

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
    h = jnp.take(in_loop(self.hidden, ids), ids, axis=0)
    return jnp.where(self.part(self.valid, i)[:, None], h, jnp.zeros((), h.dtype)).astype(self.cdt)

  def columns(self, start, width):
    """Weight chunk of vocabulary columns ``start + [0, width)`` in the matmul dtype, in the
    weight's own layout: ``[D, width]`` ("dv") or ``[width, D]`` ("vd")."""
    w = lax.dynamic_slice_in_dim(in_loop(self.weight, start), start, width, axis=self.wax)
    return w.astype(self.cdt)

  def weight_shape(self, width):
    """Shape of a weight(-gradient) chunk of ``width`` vocabulary columns."""
    d = self.hidden.shape[1]
    return (width, d) if self.vd else (d, width)

  def hidden_grad(self, g, w):
    """``g · wᵀ`` ``[C, D]`` f32 for a gradient block ``g [C, K]`` and weight chunk ``w``."""
    return dot(g, w, (1, 0) if self.vd else (1, 1))

  def weight_grad(self, h, g, live=None):
    """The weight-gradient chunk ``hᵀ g`` (f32) in the weight's layout; ``live`` (bool
    ``[C]``): the rows that take part — the others' hidden states are selected away, so a
    NaN there cannot turn their zero gradient rows into NaN (``NaN · 0``)."""
    if live is not None:
      h = jnp.where(live[:, None], h, jnp.zeros((), h.dtype))
    return dot(g, h, (0, 0)) if self.vd else dot(h, g, (0, 0))

  @staticmethod
  def live(scale, entropy_scale=None):
    """bool ``[C]``: rows whose loss (or entropy) is differentiated, a non-zero cotangent.
    The others send back exactly nothing, whatever their hidden state holds: a sample whose
    loss gets a zero cotangent leaks nothing into another's gradient."""
    live = scale != 0
    return live if entropy_scale is None else live | (entropy_scale != 0)

  def logits(self, h, w, start, width):
    """Scored float32 logits ``[C, width]`` (soft-capped, over ``τ``) of local columns
    ``start + [0, width)``."""
    z = dot(h, w, (1, 1) if self.vd else (1, 0))
    if self.bias is not None:
      z = z + lax.dynamic_slice_in_dim(self.bias, start, width).astype(F32)[None, :]
    return _core.softcap(z, self.opts)

  def real(self, start, width):
    """bool ``[1, width]``: which of local columns ``start + [0, width)`` are real tokens, or
    None when no column can be padding."""
    if not self.padded:
      return None
    return _core.real_columns(width, self.offset + start, self.vocab, ndim=2)

  def target_logit(self, h, y):
    """Capped ``h · weight[:, y] (+ bias[y])``: a gather, not a scan of the vocabulary (the
    shard holding ``y`` contributes it).  NaN where ``y`` is outside ``[0, V)``."""
    local = y - self.offset
    here = (local >= 0) & (local < self.cols)
    safe = jnp.where(here, local, 0)
    cols = jnp.take(in_loop(self.weight, safe), safe, axis=self.wax).astype(F32)
    z = jnp.sum(h.astype(F32) * (cols if self.vd else cols.T), axis=1)
    if self.bias is not None:
      z = z + jnp.take(self.bias, safe).astype(F32)
    z = _core.all_sum(jnp.where(here, _core.softcap(z, self.opts), 0.0), self.opts)
    return jnp.where(_core.target_in_range(y, self.vocab), z, jnp.nan)

  @staticmethod
  def shift_moment(t, s, m, m_new, rescale):
    """``Σ exp(z - m_new)·(z - m_new)`` from ``t = Σ exp(z - m)·(z - m)`` and ``s = Σ exp(z - m)``
    (``rescale = exp(m - m_new)``); 0 while nothing is summed (``m`` still the initial min)."""
    return jnp.where(s > 0, rescale * (t + s * (m - m_new)), 0.0)

  def combine(self, m, s, zsum, zdot=None):
    """Per-token ``(stats, lse, zsum)`` from each shard's running max ``m``, sum of
    ``exp(z - m)`` ``s``, logit sum and (with ``plan.entropy``) ``zdot = Σ exp(z - m)·(z - m)``
    (one collective each; the identity without a vocabulary axis).

    ``stats = (m, s)`` over the whole vocabulary, plus ``nu = Σ p (z - m)`` (the mean logit
    relative to the max) with ``plan.entropy``: the residuals the gradient rebuilds the exact
    softmax (and the entropy's gradient) from; ``H = log s - nu``.
    """
    top = _core.all_max(m, self.opts)
    rescale = jnp.exp(m - top)
    total = _core.all_sum(s * rescale, self.opts)
    lse = top + jnp.log(total)
    stats = (top, total)
    if self.plan.entropy:
      moment = _core.all_sum(self.shift_moment(zdot, s, m, top, rescale), self.opts)
      stats = stats + (moment / total,)
    return stats, lse, (None if zsum is None else _core.all_sum(zsum, self.opts))

  def token_loss(self, lse, zy, zsum, ok):
    loss = _core.loss_from_stats(lse, zy, zsum, self.vocab, self.opts)
    return jnp.where(ok, loss, 0.0)

  def part_stats(self, stats_c, i):
    """Chunk ``i`` of the compacted per-token statistics."""
    return tuple(self.part(x, i) for x in stats_c)

  def entropy(self, stats_c):
    """Compacted entropies ``H = log s - nu`` of ``softmax(z)`` (0 past the last target)."""
    _, s, nu = stats_c
    return jnp.where(self.valid, jnp.log(jnp.where(self.valid, s, 1.0)) - nu, 0.0)

  def grad_block(self, z, i, start, stats, scale, entropy_scale=None):
    """``scale · ∂ℓ/∂x (+ entropy_scale · ∂H/∂x)`` for logits block ``z`` of chunk ``i``
    (f32, zero past the targets); ``stats`` is the chunk of :meth:`combine`'s statistics."""
    y, ok = self.part(self.targets, i), self.part(self.valid, i)
    ent = None if entropy_scale is None else (stats[2], entropy_scale)
    g = _core.grad_logits(
      z,
      stats[0],
      stats[1],
      y,
      self.offset + start,
      self.vocab,
      self.opts,
      scale=scale,
      entropy=ent,
    )
    keep = (ok & self.live(scale, entropy_scale))[:, None]
    real = self.real(start, z.shape[1])
    if real is not None:
      keep = keep & real
    # A target outside [0, V) whose loss is differentiated sends back NaN, as its loss is.
    g = _core.poison_bad_targets(g, y, self.vocab, jnp.where(ok, scale, 0.0))
    return jnp.where(keep, g, 0.0)

  # -- back to [B, T]
  def uncompact(self, x):
    """Compacted ``x[padded, ...]`` in position order ``[N, ...]``; non-target positions read
    the tail of ``x``, which the passes leave at zero."""
    return jnp.take(x, self.inverse, axis=0)

  def compact(self, x):
    """``x[N]`` in compacted order, zero past the last target."""
    return jnp.where(self.valid, jnp.take(x, self.order), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- passes

# ----------------------------------------------------------------------------- shared steps


def per_sample(bt: Compacted, loss_c, span_mask):
  """Per-sample sums ``Σ_t w_t ℓ_t`` from compacted per-token losses (float32 ``[B]``)."""
  loss = bt.uncompact(loss_c).reshape(span_mask.shape)
  mask = _core.mask_to_bool(span_mask)
  weights = _core.mask_to_weights(span_mask)
  return jnp.sum(jnp.where(mask, loss * weights, 0.0), axis=1, dtype=F32)


def counts(span_mask):
  return jnp.sum(_core.mask_to_weights(span_mask), axis=1, dtype=F32)


def safe_inverse(x):
  return _core.safe_divide(1.0, x)


def compact_scale(bt: Compacted, per_sample, span_mask):
  """Per-token loss weights ``per_sample[b] · w_{b,t}`` in compacted order (float32)."""
  return bt.compact((per_sample[:, None] * _core.mask_to_weights(span_mask)).reshape(-1))


def finish_grads(bt: Compacted, dh_c, dw, db, hidden, weight, bias):
  """Compacted f32 results as gradients in the inputs' layout and dtypes (``None`` stays)."""
  if dh_c is not None and bt.sum_hidden_grad:
    # Each vocabulary shard holds its part of ``∂/∂hidden``; summed in float32 (a hidden that
    # already varies over the vocabulary axis gets its own part, as JAX's autodiff would).
    dh_c = jax.lax.psum(dh_c, bt.opts.vocab_axis)
  dh = None if dh_c is None else bt.uncompact(dh_c).reshape(hidden.shape).astype(hidden.dtype)
  dw = None if dw is None else dw.astype(weight.dtype)
  return dh, dw, (None if db is None else db.astype(bias.dtype))


# ----------------------------------------------------------------------------- per-sample entry


def over_vocab(body, carry, vocab: int, chunk: int):
  """Runs ``body(start, width, carry)`` over vocabulary chunks (every implementation's
  vocabulary loop): a loop of full chunks and the
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


def reverse_only(fn):
  """``fn`` (a fused entry's ``custom_vjp``) with JAX's forward-mode error replaced by one
  naming the way: the losses from logits, which support ``jax.jvp``."""

  @functools.wraps(fn)
  def call(*args):
    try:
      return fn(*args)
    except TypeError as e:
      if "forward-mode" not in str(e):
        raise
      raise TypeError(
        "the fused entries (linear_*) are reverse-mode only (custom_vjp): for jax.jvp, "
        "jacfwd or hessian use the losses from logits, e.g. jaxnll.sequence_nll(hidden @ "
        "weight, ...) (token_nll, segment_nll, distill_cross_entropy)"
      ) from None

  return call
