"""Fused distillation: both heads and the divergence in one pass, no logits of either model.

Dimension letters: ``B`` batch, ``T`` sequence length, ``Ds`` / ``Dt`` the student's and the
teacher's hidden sizes, ``V`` the shared vocabulary, ``N = B·T``, ``C`` token chunk, ``K``
vocabulary chunk.

With ``z_s = softcap(h_s W_s + b_s) / τ`` and ``z_t = softcap(h_t W_t + b_t) / τ`` the scored
logits of a position, ``p_s = softmax(z_s)`` and ``p_t = softmax(z_t)`` (the teacher under
``stop_gradient``), the per-token divergences are

* ``"ce"``: ``-Σ_v p_t log p_s = lse_s - Σ_v p_t z_s`` (:func:`jaxnll.distill_cross_entropy`);
* ``"kl"``: ``KL(p_t ‖ p_s) = Σ_v p_t (z_t - z_s) + lse_s - lse_t``;
* ``"reverse_kl"``: ``KL(p_s ‖ p_t) = Σ_v p_s (z_s - z_t) + lse_t - lse_s``;
* ``"jsd"``: ``β·KL(p_t ‖ m) + (1 - β)·KL(p_s ‖ m)``, ``m = β p_t + (1 - β) p_s`` (GKD),

summed (weighted) over the target span per sample, with no ``τ²`` factor.  The first three are
online over vocabulary tiles: per target token both running log-sum-exps (max ``m`` and sum
of ``exp(z - m)``) and **one** running weighted sum — ``Σ e_t (z_s - m_t)`` for ``"ce"``,
``Σ e_t (z_t - z_s)`` for ``"kl"``, ``Σ e_s (z_s - z_t)`` for ``"reverse_kl"`` — rescaled like
the sums of exponentials when a maximum grows.  ``log m`` needs both final log-sum-exps, so
``"jsd"`` makes a second pass over the tiles of a token chunk.

The backward (a ``custom_vjp``) recomputes each ``[C, K]`` tile of both heads and forms the
gradient of the scored student logits from the float32 row statistics:

* ``"ce"``, ``"kl"``: ``∂/∂z_s = p_s - p_t``;
* ``"reverse_kl"``: ``∂/∂z_s = p_s (log p_s - log p_t - KL(p_s ‖ p_t))``;
* ``"jsd"``: ``∂/∂z_s = (1 - β) p_s (log p_s - log m - KL(p_s ‖ m))``;

times ``dz/dx`` (``1/τ``, and the soft-cap's own factor).  Nothing flows to the teacher.

Implementations share one tiled kernel: ``"chunked"`` tiles ``C × K`` (``K`` =
``vocab_chunk``) and sums each weight-gradient tile over every token in an f32 ``[D, K]``
buffer (vocabulary outside, tokens inside); ``"token_chunked"`` uses full-vocabulary tiles
(one matmul per head and block, the GPU plan of :mod:`jaxnll.fused.token_chunked`); ``"auto"``
picks per platform with :func:`jax.lax.platform_dependent` (GPU ``token_chunked``, anything
else — TPU included, until a Pallas pair exists — ``chunked``); ``"xla"`` materialises both
logits (``"ce"`` / ``"kl"`` through :func:`jaxnll.distill_cross_entropy`).  Span compaction is
:class:`jaxnll.fused.compact.Compacted` (one per head, same order): the token loops run
``ceil(n_targets / C)`` chunks, so the cost follows the target tokens.

References: G. Hinton, O. Vinyals and J. Dean, *Distilling the Knowledge in a Neural Network*
(2015); R. Agarwal et al., *On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes* (GKD, 2024); the fused head as in :func:`jaxnll.linear_sequence_nll`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Bool, Float

from jaxnll import _core
from jaxnll._core import F32, TokenOptions
from jaxnll.distill import distill_cross_entropy
from jaxnll.fused import compact
from jaxnll.fused import token_chunked as token_chunked_lib
from jaxnll.fused.compact import Compacted, Plan, over_vocab, reverse_only

KINDS = ("ce", "kl", "reverse_kl", "jsd")
IMPLEMENTATIONS = ("auto", "chunked", "token_chunked", "xla")
LAYOUTS = ("dv", "vd")

#: Target tokens per chunk of ``"chunked"`` (two ``[C, K]`` f32 tiles live, 4 MiB each at the
#: defaults).
DEFAULT_TOKEN_CHUNK = 512
DEFAULT_VOCAB_CHUNK = 2048
#: As :data:`jaxnll.fused.api.WEIGHT_GRAD_CHUNK_BYTES`: with 16-bit heads the gradient pass
#: widens its vocabulary tiles to about this many bytes of f32 ``[Ds, K]`` accumulator.
WEIGHT_GRAD_CHUNK_BYTES = 64 * 2**20
#: ``"token_chunked"`` with 16-bit heads: the gradient pass sums the weight gradient in f32
#: tiles of about this many bytes (not one f32 ``[Ds, V]`` buffer, 2.4 GiB at Gemma-2 2B).
TOKEN_CHUNKED_GRAD_BYTES = 128 * 2**20
#: ``"auto"``: which platforms take which kernel (``default``: the rest, TPU included).
AUTO_BRANCHES = (("token_chunked", ("cuda", "rocm")), ("chunked", ("default",)))


@dataclasses.dataclass(frozen=True)
class DistillPlan:
  """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

  kind: str
  beta: float
  opts: TokenOptions
  token_chunk: int
  vocab_chunk: int
  grad_vocab_chunk: int
  reduction: str = "sum"
  student_layout: str = "dv"
  teacher_layout: str = "dv"
  implementation: str = "chunked"
  #: ``"auto"``: ``(kernel plan, platforms)`` pairs for :func:`jax.lax.platform_dependent`.
  branches: tuple = ()

  def head_plan(self, layout: str) -> Plan:
    """The :class:`~jaxnll.fused.compact.Plan` of one head (for its :class:`Compacted`)."""
    return Plan(self.opts, self.token_chunk, self.vocab_chunk, weight_layout=layout)


# ----------------------------------------------------------------------------- the kernel


def _pair(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, span_mask):
  """The two heads' :class:`Compacted` views (the same order: same mask, same stable sort)."""
  ids = jnp.zeros(span_mask.shape, jnp.int32)  # no target ids: only the rows are used
  s = Compacted(plan.head_plan(plan.student_layout), hs, ws, bs, ids, span_mask)
  t = Compacted(plan.head_plan(plan.teacher_layout), ht, wt, bt_, ids, span_mask)
  return s, t


def _tile(s: Compacted, t: Compacted, h_s, h_t, start, width):
  """Scored f32 logits ``[C, width]`` of both heads at vocabulary columns ``start + [0,
  width)``."""
  zs = s.logits(h_s, s.columns(start, width), start, width)
  zt = t.logits(h_t, t.columns(start, width), start, width)
  return zs, zt


def _log_m(plan: DistillPlan, lps, lpt):
  """``log(β p_t + (1 - β) p_s)`` from the two log-probabilities."""
  beta = plan.beta
  if beta == 0.0:
    return lps
  if beta == 1.0:
    return lpt
  return jnp.logaddexp(jnp.log(beta) + lpt, jnp.log1p(-beta) + lps)


def _xlogy_terms(p, a, b):
  """``Σ_v p (a - b)`` per row, ``0`` where ``p = 0`` (no ``0 · inf``)."""
  return jnp.sum(jnp.where(p > 0, p * (a - b), 0.0), axis=1)


def _shift(acc, total, m, m_new, rescale):
  """``Σ e (x - m_new)`` from ``acc = Σ e (x - m)`` when the max moves from ``m`` to ``m_new``
  (``e`` rescaled by ``rescale``; 0 while nothing is summed)."""
  return jnp.where(total > 0, rescale * (acc + total * (m - m_new)), 0.0)


def _online(kind: str, zs, zt, carry):
  """One vocabulary tile ``zs``, ``zt`` ``[C, K]`` added to the running row statistics
  ``(m_s, s_s, m_t, s_t, acc)`` (``acc``: the kind's running weighted sum)."""
  ms, ss, mt, st, acc = carry
  ms_new = jnp.maximum(ms, jnp.max(zs, axis=1))
  mt_new = jnp.maximum(mt, jnp.max(zt, axis=1))
  es = jnp.exp(zs - ms_new[:, None])
  et = jnp.exp(zt - mt_new[:, None])
  rs, rt = jnp.exp(ms - ms_new), jnp.exp(mt - mt_new)
  if kind == "ce":  # Σ e_t (z_s - m_t)
    acc = _shift(acc, st, mt, mt_new, rt) + _xlogy_terms(et, zs, mt_new[:, None])
  elif kind == "kl":  # Σ e_t (z_t - z_s)
    acc = rt * acc + _xlogy_terms(et, zt, zs)
  elif kind == "reverse_kl":  # Σ e_s (z_s - z_t)
    acc = rs * acc + _xlogy_terms(es, zs, zt)
  ss = ss * rs + jnp.sum(es, axis=1)
  st = st * rt + jnp.sum(et, axis=1)
  return ms_new, ss, mt_new, st, acc


def _jsd_terms(plan: DistillPlan, zs, zt, lse_s, lse_t):
  """``(Σ p_t (log p_t - log m), Σ p_s (log p_s - log m))`` of one tile, per row."""
  lps, lpt = zs - lse_s[:, None], zt - lse_t[:, None]
  lm = _log_m(plan, lps, lpt)
  return _xlogy_terms(jnp.exp(lpt), lpt, lm), _xlogy_terms(jnp.exp(lps), lps, lm)


def _finish(plan: DistillPlan, carry, jsd_pass):
  """Per-row ``(stats, loss)`` from the running statistics (combined over vocabulary shards);
  ``jsd_pass(lse_s, lse_t) -> (kt, ks)`` is the second pass of ``"jsd"``."""
  kind, opts = plan.kind, plan.opts
  ms, ss, mt, st, acc = carry
  ms, ss, acc_s = _combine(opts, ms, ss, acc if kind == "reverse_kl" else None)
  mt, st, acc_t = _combine(opts, mt, st, acc if kind in ("ce", "kl") else None, shift=kind == "ce")
  lse_s, lse_t = ms + jnp.log(ss), mt + jnp.log(st)
  r = jnp.zeros_like(ms)
  if kind == "ce":
    # lse_s - Σ p_t z_s = log s_s + (m_s - m_t) - Σ p_t (z_s - m_t)
    loss = jnp.log(ss) + (ms - mt) - acc_t / st
  elif kind == "kl":
    # Rounding can make it a few ulps negative; the true value never is.
    loss = jnp.maximum(acc_t / st + (lse_s - lse_t), 0.0)
  elif kind == "reverse_kl":
    loss = jnp.maximum(acc_s / ss + (lse_t - lse_s), 0.0)
    r = loss
  else:  # jsd: a second pass, now that both log-sum-exps are known
    kt, ks = jsd_pass(lse_s, lse_t)
    kt, ks = _core.all_sum(kt, opts), _core.all_sum(ks, opts)
    kt, ks = jnp.maximum(kt, 0.0), jnp.maximum(ks, 0.0)
    loss = plan.beta * kt + (1.0 - plan.beta) * ks
    r = ks
  return (ms, ss, mt, st, r), loss


def _row_stats(plan: DistillPlan, s: Compacted, t: Compacted, i):
  """Per-token ``(stats, loss)`` of token chunk ``i``: ``stats = (m_s, s_s, m_t, s_t, r)``
  (row maxima and sums of ``exp(z - m)`` of both heads, and ``r``: the loss for
  ``"reverse_kl"``, ``KL(p_s ‖ m)`` for ``"jsd"``, unused otherwise), float32 ``[C]`` each."""
  h_s, h_t = s.rows(i), t.rows(i)

  def online(start, width, carry):
    return _online(plan.kind, *_tile(s, t, h_s, h_t, start, width), carry)

  def jsd_pass(lse_s, lse_t):
    def second(start, width, carry):
      kt, ks = _jsd_terms(plan, *_tile(s, t, h_s, h_t, start, width), lse_s, lse_t)
      return carry[0] + kt, carry[1] + ks

    return over_vocab(second, (zero, zero), s.cols, plan.vocab_chunk)

  rows = s.chunk
  zero = s.full((rows,), F32)
  low = s.full((rows,), F32, jnp.finfo(F32).min)
  carry = over_vocab(online, (low, zero, low, zero, zero), s.cols, plan.vocab_chunk)
  stats, loss = _finish(plan, carry, jsd_pass)
  ok = s.part(s.valid, i)
  return tuple(jnp.where(ok, x, 0.0) for x in stats), jnp.where(ok, loss, 0.0)


def _combine(opts: TokenOptions, m, total, acc, *, shift=False):
  """``(m, total, acc)`` over the vocabulary shards (the identity without a vocabulary
  axis); ``shift``: ``acc`` is relative to ``m`` and moves with it."""
  if opts.vocab_axis is None:
    return m, total, acc
  top = _core.all_max(m, opts)
  rescale = jnp.exp(m - top)
  if acc is not None:
    acc = _shift(acc, total, m, top, rescale) if shift else rescale * acc
    acc = _core.all_sum(acc, opts)
  return top, _core.all_sum(total * rescale, opts), acc


def _forward(plan: DistillPlan, s: Compacted, t: Compacted):
  """Compacted per-token ``(stats, loss)`` over the target chunks."""

  def body(i, carry):
    stats_c, loss_c = carry
    stats, loss = _row_stats(plan, s, t, i)
    at = (i * s.chunk,)
    stats_c = tuple(lax.dynamic_update_slice(a, x, at) for a, x in zip(stats_c, stats, strict=True))
    return stats_c, lax.dynamic_update_slice(loss_c, loss, at)

  zeros = s.full(s.valid.shape, F32, rows=True)
  return lax.fori_loop(0, s.num_chunks, body, ((zeros,) * 5, zeros))


def _grad_tile(plan: DistillPlan, zs, zt, stats, scale, ok):
  """``scale · ∂D/∂x_s`` of one tile (f32 ``[C, K]``, raw student logits ``x_s``); a row with
  a zero scale sends back exactly 0, a differentiated row with a non-finite value NaN."""
  ms, ss, mt, st, r = (x[:, None] for x in stats)
  lps = (zs - ms) - jnp.log(ss)
  ps = jnp.exp(lps)
  if plan.kind in ("ce", "kl"):
    dz = ps - jnp.exp(zt - mt) / st
  else:
    lpt = (zt - mt) - jnp.log(st)
    if plan.kind == "reverse_kl":
      dz = jnp.where(ps > 0, ps * ((lps - lpt) - r), 0.0)
    else:
      dz = (1.0 - plan.beta) * jnp.where(ps > 0, ps * ((lps - _log_m(plan, lps, lpt)) - r), 0.0)
  live = ok & (scale != 0)
  g = jnp.where(live[:, None], dz * scale[:, None], 0.0)
  return g * _core.softcap_grad(zs, plan.opts)


def _backward(plan: DistillPlan, s: Compacted, t: Compacted, scale_c, stats_c, need):
  """Gradients of ``Σ scale·D`` for (student hidden, head, bias) by recomputation: vocabulary
  tiles outside, token chunks inside, so each weight-gradient tile is summed over every token
  in an f32 ``[Ds, K]`` buffer and cast once.  ``None`` for what ``need`` leaves out."""
  rows = s.chunk
  need_h, need_w, need_b = need[0], need[1], need[2] and s.bias is not None

  def vocab_body(start, width, carry):
    dh_c, dw, db = carry
    w_s, w_t = s.columns(start, width), t.columns(start, width)

    def token_body(i, inner):
      dw_k, db_k, dh_c = inner
      h_s, h_t = s.rows(i), t.rows(i)
      zs = s.logits(h_s, w_s, start, width)
      zt = t.logits(h_t, w_t, start, width)
      part = lambda x: s.part(x, i)  # noqa: E731
      g = _grad_tile(plan, zs, zt, tuple(map(part, stats_c)), part(scale_c), part(s.valid))
      gq = g.astype(s.cdt)
      if need_w:
        dw_k = dw_k + s.weight_grad(h_s, gq)
      if need_b:
        db_k = db_k + jnp.sum(g, axis=0)
      if need_h:
        dh = lax.dynamic_slice_in_dim(dh_c, i * rows, rows) + s.hidden_grad(gq, w_s)
        dh_c = lax.dynamic_update_slice(dh_c, dh, (i * rows, 0))
      return dw_k, db_k, dh_c

    dw_k = s.full(s.weight_shape(width), F32) if need_w else None
    db_k = s.full((width,), F32) if need_b else None
    dw_k, db_k, dh_c = lax.fori_loop(0, s.num_chunks, token_body, (dw_k, db_k, dh_c))
    if need_w:
      at = (start, 0) if s.vd else (0, start)
      dw = lax.dynamic_update_slice(dw, dw_k.astype(dw.dtype), at)
    if need_b:
      db = lax.dynamic_update_slice(db, db_k.astype(db.dtype), (start,))
    return dh_c, dw, db

  dh_c = s.full((s.valid.shape[0], s.hidden.shape[1]), F32) if need_h else None
  dw = s.full(s.weight.shape, s.weight.dtype) if need_w else None
  db = s.full(s.bias.shape, s.bias.dtype) if need_b else None
  return over_vocab(vocab_body, (dh_c, dw, db), s.cols, plan.grad_vocab_chunk)


# ----------------------------------------------------------------------------- custom_vjp
#
# Residuals leave each kernel in position order ([N] per statistic), so that the branches of
# "auto" (each with its own token chunk, hence its own padded length) agree on every shape.


def _kernel_forward(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, span_mask):
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, span_mask)
  stats_c, loss_c = _forward(plan, s, t)
  sums = compact.per_sample(s, loss_c, span_mask)
  return sums, tuple(s.uncompact(x) for x in stats_c)


def _kernel_backward(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, span_mask, stats, ct, need):
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, span_mask)
  stats_c = tuple(s.compact(x) for x in stats)
  scale_c = compact.compact_scale(s, ct, span_mask)
  dh_c, dw, db = _backward(plan, s, t, scale_c, stats_c, need)
  return compact.finish_grads(s, dh_c, dw, db, hs, ws, bs)


def _dispatch(plan: DistillPlan, fn, *args):
  """``fn(kernel_plan, *args)``, per platform for ``"auto"``."""
  if plan.implementation != "auto":
    return fn(plan, *args)
  per_platform = {}
  for sub, platforms in plan.branches:
    for name in platforms:
      per_platform[name] = functools.partial(fn, sub, *args)
  return lax.platform_dependent(**per_platform)


def _value(plan, hs, ws, bs, ht, wt, bt_, span_mask):
  sums, stats = _dispatch(plan, _kernel_forward, hs, ws, bs, ht, wt, bt_, span_mask)
  if plan.reduction == "mean":
    sums = sums * compact.safe_inverse(compact.counts(span_mask))
  return sums, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _distill(plan, hs, ws, bs, ht, wt, bt_, span_mask):
  return _value(plan, hs, ws, bs, ht, wt, bt_, span_mask)[0]


def _primal(x):
  return x.value if isinstance(x, CustomVJPPrimal) else x


def _distill_fwd(plan, hs, ws, bs, ht, wt, bt_, span_mask):
  # Which of the student's (hidden, head, bias) are differentiated: ``()`` yes, ``None`` no
  # (pytree structure, static).
  need = tuple(() if isinstance(x, CustomVJPPrimal) and x.perturbed else None for x in (hs, ws, bs))
  args = tuple(_primal(x) for x in (hs, ws, bs, ht, wt, bt_, span_mask))
  out, stats = _value(plan, *args)
  return out, (args, stats, need)


def _distill_bwd(plan, res, ct):
  if isinstance(ct, SymbolicZero):
    return (None,) * 7
  args, stats, need = res
  span_mask = args[-1]
  if plan.reduction == "mean":
    ct = ct * compact.safe_inverse(compact.counts(span_mask))
  need = tuple(x is not None for x in need)
  if not any(need):
    return (None,) * 7
  ct = ct.astype(F32)
  dh, dw, db = _dispatch(plan, _kernel_backward, *args, stats, ct, need)
  # The teacher is a constant: no cotangent (not even zeros).
  return dh, dw, db, None, None, None, None


_distill.defvjp(_distill_fwd, _distill_bwd, symbolic_zeros=True)
_distill = reverse_only(_distill)


# ----------------------------------------------------------------------------- plans and checks


def _head(name: str, hidden, weight, bias, layout: str):
  """Checks one head's arrays; returns them as arrays and the head's vocabulary."""
  _core.check_choice(f"{name}_weight_layout", layout, LAYOUTS)
  hidden = _core.as_array(f"{name}_hidden", hidden)
  weight = _core.as_array(f"{name}_weight", weight)
  _core.check_floating(f"{name}_hidden", hidden)
  _core.check_floating(f"{name}_weight", weight)
  _core.check_rank(f"{name}_hidden", hidden, (3,), "[B, T, D]")
  spec = "[V, D]" if layout == "vd" else "[D, V]"
  _core.check_rank(f"{name}_weight", weight, (2,), spec)
  hs, ws = jnp.shape(hidden), jnp.shape(weight)
  d, v = (ws[1], ws[0]) if layout == "vd" else ws
  if hs[2] != d:
    raise ValueError(
      f"{name}_weight must have shape {spec} with D = {name}_hidden.shape[-1] = {hs[2]}, got "
      f"{name}_hidden {hs} and {name}_weight {ws} ({name}_weight_layout={layout!r})"
    )
  if bias is not None:
    bias = _core.as_array(f"{name}_bias", bias)
    _core.check_floating(f"{name}_bias", bias)
    if jnp.shape(bias) != (v,):
      raise ValueError(f"{name}_bias must have shape [V] = {(v,)}, got shape {jnp.shape(bias)}")
    bias = jnp.asarray(bias)
  _core.check_vocab(f"{name}_weight", v, ws)
  return jnp.asarray(hidden), jnp.asarray(weight), bias, v


def _kernel_plan(implementation, base: DistillPlan, num_tokens, vocab, d, weight_dtype, tc, vc):
  """The plan of one kernel: ``"chunked"`` ``C × K`` tiles, ``"token_chunked"`` full-
  vocabulary tiles with ``C`` from :func:`jaxnll.fused.token_chunked.block_rows` (both heads'
  logits and their exponentials live: a quarter of the budget per block); its gradient pass
  runs vocabulary tiles of ``vocab_chunk`` columns if given, else the whole vocabulary, or with
  16-bit heads tiles of :data:`TOKEN_CHUNKED_GRAD_BYTES` of f32 accumulator."""
  if implementation == "token_chunked":
    c = token_chunked_lib.block_rows(4 * vocab, num_tokens, tc)
    gk = vocab if vc is None else min(vc, vocab)  # ``vocab_chunk``: the gradient's tiles
    if vc is None and jnp.dtype(weight_dtype).itemsize < 4:
      gk = min(vocab, max(1024, TOKEN_CHUNKED_GRAD_BYTES // (4 * d) // 1024 * 1024))
    return dataclasses.replace(
      base, implementation=implementation, token_chunk=c, vocab_chunk=vocab, grad_vocab_chunk=gk
    )
  c = max(1, min(DEFAULT_TOKEN_CHUNK if tc is None else tc, num_tokens))
  k = max(1, min(DEFAULT_VOCAB_CHUNK if vc is None else vc, vocab))
  gk = k
  if vc is None and jnp.dtype(weight_dtype).itemsize < 4:
    gk = min(vocab, max(k, WEIGHT_GRAD_CHUNK_BYTES // (4 * d) // k * k))
  return dataclasses.replace(
    base, implementation=implementation, token_chunk=c, vocab_chunk=k, grad_vocab_chunk=gk
  )


def linear_distill_loss(
  student_hidden: Float[Array, "B T Ds"],
  student_weight: Float[Array, "Ds V"] | Float[Array, "V Ds"],
  teacher_hidden: Float[Array, "B T Dt"],
  teacher_weight: Float[Array, "Dt V"] | Float[Array, "V Dt"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  kind: Literal["ce", "kl", "reverse_kl", "jsd"] = "ce",
  temperature: float = 1.0,
  beta: float = 0.5,
  reduction: Literal["sum", "mean"] = "sum",
  student_bias: Float[Array, " V"] | None = None,
  teacher_bias: Float[Array, " V"] | None = None,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  student_weight_layout: Literal["dv", "vd"] = "dv",
  teacher_weight_layout: Literal["dv", "vd"] = "dv",
  implementation: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> Float[Array, " B"]:
  """Per-sample distillation divergence through both heads, without either ``[B, T, V]``.

  Equal, in value and in gradients with respect to ``student_hidden``, ``student_weight``
  and ``student_bias``, to the divergence ``kind`` (module docstring) between
  ``softmax(teacher_hidden @ teacher_weight / τ)`` and
  ``softmax(student_hidden @ student_weight / τ)``, summed over the span with its weights
  (``"mean"``: divided by the span's weight sum, 0 for an empty span); ``kind="ce"`` is
  :func:`jaxnll.distill_cross_entropy` of the two logits.  The teacher is under
  ``stop_gradient``: it receives no gradient.  No ``τ²`` factor (the training objective
  applies it).  Only target positions are computed (span-compacted); statistics are float32.

  Args:
    student_hidden: ``[B, T, Ds]`` the student's final hidden states, any floating dtype.
    student_weight: ``[Ds, V]`` head kernel, or ``[V, Ds]`` with ``student_weight_layout="vd"``
      (a tied embedding table, read in place).
    teacher_hidden: ``[B, T, Dt]`` the teacher's final hidden states (``Dt`` may differ).
    teacher_weight: ``[Dt, V]`` or ``[V, Dt]`` (``teacher_weight_layout="vd"``), the same
      vocabulary as the student's.
    span_mask: ``[B, T]`` bool mask or float weights of the positions that count.  Positions
      outside it are never read (NaN there reaches no value or gradient); a non-finite value
      inside it makes that sample's loss, and the gradient flowing from it, NaN.
    kind: ``"ce"``, ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
    temperature: ``τ`` of both softmaxes (finite, at least 1e-6).
    beta: ``β`` of ``"jsd"``, in ``[0, 1]``.
    reduction: ``"sum"`` or ``"mean"``.
    student_bias, teacher_bias: optional ``[V]`` head biases.
    logit_softcap: ``c``: both heads' logits are ``c·tanh(x / c)`` before ``τ`` (Gemma 2).
    vocab_axis: inside ``shard_map``, the mesh axis the vocabulary of both heads is sharded
      over (each device holds the same columns of both); the result is replicated over it and
      the student's hidden gradient summed over it.
    student_weight_layout, teacher_weight_layout: ``"dv"`` or ``"vd"``.
    implementation: ``"auto"`` (GPU ``"token_chunked"``, otherwise ``"chunked"``, chosen when
      lowering), ``"chunked"``, ``"token_chunked"`` or ``"xla"`` (both logits materialised).
    token_chunk, vocab_chunk: block sizes (need not divide ``B·T`` or ``V``); for
      ``"token_chunked"`` (full-vocabulary forward blocks) ``vocab_chunk`` sets the gradient
      pass's vocabulary tiles.

  Returns:
    float32 ``[B]``; gradients come back in the student's dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> hs, ws = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (8, 11))
    >>> ht, wt = jax.random.normal(k[2], (2, 5, 6)), jax.random.normal(k[3], (6, 11))
    >>> span = jnp.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    >>> fused = linear_distill_loss(hs, ws, ht, wt, span, kind="kl", token_chunk=2, vocab_chunk=4)
    >>> plain = linear_distill_loss(hs, ws, ht, wt, span, kind="kl", implementation="xla")
    >>> bool(jnp.allclose(fused, plain, rtol=1e-5)), float(fused[1])
    (True, 0.0)
  """
  _core.check_choice("kind", kind, KINDS)
  _core.check_choice("reduction", reduction, ("sum", "mean"))
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  beta = _core.check_float_option("beta", beta, low=0.0, high=1.0)
  opts = TokenOptions(logit_softcap=logit_softcap, temperature=temperature, vocab_axis=vocab_axis)
  hs, ws, bs, vs = _head("student", student_hidden, student_weight, student_bias,
                         student_weight_layout)  # fmt: skip
  ht, wt, bt_, vt = _head("teacher", teacher_hidden, teacher_weight, teacher_bias,
                          teacher_weight_layout)  # fmt: skip
  if vs != vt:
    raise ValueError(
      f"student and teacher heads must share the vocabulary, got V = {vs} (student_weight "
      f"{jnp.shape(ws)}) and V = {vt} (teacher_weight {jnp.shape(wt)})"
    )
  if jnp.shape(hs)[:2] != jnp.shape(ht)[:2]:
    raise ValueError(
      "student_hidden and teacher_hidden must have the same [B, T], got "
      f"{jnp.shape(hs)} and {jnp.shape(ht)}"
    )
  span_mask = _core.as_array("span_mask", span_mask)
  _core.check_mask("span_mask", span_mask)
  if jnp.shape(span_mask) != jnp.shape(hs)[:2]:
    raise ValueError(
      f"span_mask must have shape [B, T] = {jnp.shape(hs)[:2]}, got shape {jnp.shape(span_mask)}"
    )
  for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive Python int or None, got {value!r}")
  span_mask = jnp.asarray(span_mask)
  sg = lax.stop_gradient
  ht, wt = sg(ht), sg(wt)
  bt_ = None if bt_ is None else sg(bt_)
  b, t = hs.shape[:2]
  if b * t == 0:
    return jnp.zeros((b,), F32)
  if implementation == "xla":
    return _materialised(hs, ws, bs, ht, wt, bt_, span_mask, kind, beta, reduction, opts,
                         student_weight_layout, teacher_weight_layout)  # fmt: skip
  d = hs.shape[2]
  base = DistillPlan(kind, beta, opts, 1, 1, 1, reduction, student_weight_layout,
                     teacher_weight_layout)  # fmt: skip
  args = (b * t, vs, d, ws.dtype, token_chunk, vocab_chunk)
  if implementation == "auto":
    branches = tuple((_kernel_plan(name, base, *args), p) for name, p in AUTO_BRANCHES)
    plan = dataclasses.replace(branches[-1][0], implementation="auto", branches=branches)
  else:
    plan = _kernel_plan(implementation, base, *args)
  arrays = _vary_alike(hs, ws, bs, ht, wt, bt_, span_mask, vocab_axis)
  return _distill(plan, *arrays)


def _vary_alike(hs, ws, bs, ht, wt, bt_, span_mask, vocab_axis):
  """Under ``shard_map``, every array varies over the axes any of them varies over (the loop
  carries mix both heads), as :func:`jaxnll.fused.compact.vary_alike` does for one head:
  hidden states and mask stay as they are over the vocabulary axis, the heads vary over it."""
  arrays = (hs, ws, bs, ht, wt, bt_, span_mask)
  axes = frozenset().union(*(compact.varying_axes(x) for x in arrays if x is not None))
  out = []
  for k, x in enumerate(arrays):
    head = k in (1, 2, 4, 5)
    want = axes if head or vocab_axis is None else axes - {vocab_axis}
    missing = () if x is None else tuple(sorted(want - compact.varying_axes(x)))
    out.append(lax.pcast(x, missing, to="varying") if missing else x)
  return out


# ----------------------------------------------------------------------------- materialised


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows(plan: DistillPlan, xs, xt, ok):
  """Per-row divergence of materialised logits ``[N, V]`` (any dtype; scored with ``τ``), 0
  where ``ok`` is False; the backward is the fused kernels' (a zero cotangent sends back 0)."""
  return _rows_fwd(plan, xs, xt, ok)[0]


def _scored(plan: DistillPlan, xs, xt, ok):
  keep = ok[:, None]
  zs = _core.softcap(jnp.where(keep, xs, jnp.zeros((), xs.dtype)), plan.opts)
  zt = _core.softcap(jnp.where(keep, xt, jnp.zeros((), xt.dtype)), plan.opts)
  return zs, zt


def _rows_fwd(plan: DistillPlan, xs, xt, ok):
  zs, zt = _scored(plan, xs, xt, ok)
  low, zero = jnp.full(ok.shape, jnp.finfo(F32).min), jnp.zeros(ok.shape, F32)
  carry = _online(plan.kind, zs, zt, (low, zero, low, zero, zero))
  stats, loss = _finish(plan, carry, lambda a, b: _jsd_terms(plan, zs, zt, a, b))
  return jnp.where(ok, loss, 0.0), (xs, xt, ok, stats)


def _rows_bwd(plan: DistillPlan, res, ct):
  xs, xt, ok, stats = res
  zs, zt = _scored(plan, xs, xt, ok)
  g = _grad_tile(plan, zs, zt, stats, ct.astype(F32), ok)
  return g.astype(xs.dtype), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)
_rows = reverse_only(_rows)


def _materialised(hs, ws, bs, ht, wt, bt_, span_mask, kind, beta, reduction, opts, ls, lt):
  """The ``"xla"`` path: both ``[B, T, V]`` logits, then the divergence (``"ce"`` / ``"kl"``:
  :func:`jaxnll.distill_cross_entropy`; the others row by row in float32 through :func:`_rows`,
  whose backward is the fused kernels' gated formula, so a zero cotangent leaks no NaN).
  Hidden rows outside the span are zeroed first (NaN there reaches no gradient)."""
  if opts.vocab_axis is not None:
    raise ValueError('vocab_axis needs a fused implementation (implementation="chunked")')
  inside = _core.mask_to_bool(span_mask)[..., None]

  def logits(h, w, b, layout):
    h = jnp.where(inside, h, jnp.zeros((), h.dtype))
    z = h @ w if layout == "dv" else jnp.einsum("btd,vd->btv", h, w)
    z = z if b is None else z + b[None, None, :]
    if opts.logit_softcap is not None and kind in ("ce", "kl"):
      c = opts.logit_softcap
      z = (c * jnp.tanh(z.astype(F32) / c)).astype(z.dtype)
    return z

  zs, zt = logits(hs, ws, bs, ls), logits(ht, wt, bt_, lt)
  tau = opts.temperature
  if kind in ("ce", "kl"):
    name = "cross_entropy" if kind == "ce" else "kl"
    return distill_cross_entropy(zs, zt, span_mask, temperature=tau, reduction=reduction, kind=name)
  mask = _core.mask_to_bool(span_mask)
  plan = DistillPlan(kind, beta, opts, 1, 1, 1)  # soft-cap and τ inside: one gated backward
  flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
  tok = _rows(plan, flat(zs), flat(zt), mask.reshape(-1)).reshape(mask.shape)
  weights = _core.mask_to_weights(span_mask)
  sums = jnp.sum(jnp.where(mask, tok * weights, 0.0), axis=1, dtype=F32)
  if reduction == "mean":
    sums = sums * compact.safe_inverse(compact.counts(span_mask))
  return sums
