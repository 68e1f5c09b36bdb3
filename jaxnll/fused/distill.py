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

The student's hard-target NLL shares the pass (``targets=``): its loss is ``lse(x_s) -
x_s[y]`` with ``x_s`` the student's capped logits at ``τ = 1`` (``lse`` the divergence's
``lse_s`` when ``τ = 1``, else one more running log-sum-exp over the same tiles; ``x_s[y]`` a
gather), its gradient ``softmax(x_s) - onehot(y)`` added to the same tile of the backward, so
both terms cost one forward and one gradient pass of the student's head.

The kernels return per-token losses and take per-token cotangents (:class:`Kernel`); the
per-sample (``[B]``) and per-segment (``[B, S]``, packed rows in one pass) results are plain
differentiable sums of those, as in :func:`jaxnll.sequence_nll` / :func:`jaxnll.segment_nll`.

Implementations share one tiled kernel: ``"chunked"`` tiles ``C × K`` (``K`` =
``vocab_chunk``) and sums each weight-gradient tile over every token in an f32 ``[D, K]``
buffer (vocabulary outside, tokens inside); ``"token_chunked"`` uses full-vocabulary tiles
(one matmul per head and block, the GPU plan of :mod:`jaxnll.fused.token_chunked`);
``"pallas_tpu"`` is the Mosaic kernel pair of :mod:`jaxnll.fused.pallas_tpu_distill` (the
divergence only: with ``targets`` the NLL comes from the NLL kernels, a second pass);
``"auto"`` picks per platform with :func:`jax.lax.platform_dependent` (TPU ``pallas_tpu`` —
``chunked`` under automatic partitioning or with ``targets`` —, GPU ``token_chunked``, else
``chunked``); ``"xla"`` materialises both
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
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core
from jaxnll import distill as distill_lib
from jaxnll import nll as nll_lib
from jaxnll._core import F32, TokenOptions
from jaxnll.fused import api as api_lib
from jaxnll.fused import auto as auto_lib
from jaxnll.fused import compact, pallas_tpu_distill
from jaxnll.fused import token_chunked as token_chunked_lib
from jaxnll.fused.compact import Compacted, Plan, over_vocab, reverse_only

KINDS = ("ce", "kl", "reverse_kl", "jsd")
IMPLEMENTATIONS = ("auto", "chunked", "token_chunked", "pallas_tpu", "xla")
LAYOUTS = _core.LAYOUTS

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
#: ``"auto"``: which platforms take which kernel (``default``: the rest).
AUTO_BRANCHES = (
  ("pallas_tpu", ("tpu",)),
  ("token_chunked", ("cuda", "rocm")),
  ("chunked", ("default",)),
)


@dataclasses.dataclass(frozen=True)
class DistillPlan:
  """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

  kind: str
  beta: float
  opts: TokenOptions
  token_chunk: int
  vocab_chunk: int
  grad_vocab_chunk: int
  student_layout: str = "dv"
  teacher_layout: str = "dv"
  implementation: str = "chunked"
  #: ``"auto"``: ``(kernel plan, platforms)`` pairs for :func:`jax.lax.platform_dependent`.
  branches: tuple = ()
  #: The student's hard-target NLL (at ``τ = 1``) from the same tiles (``targets=``).
  nll: bool = False

  @property
  def nll_stats(self) -> bool:
    """Whether the NLL keeps its own running log-sum-exp: the logits it scores (``τ = 1``)
    are not the divergence's (``τ ≠ 1``)."""
    return self.nll and self.opts.temperature != 1.0

  @property
  def student_opts(self) -> TokenOptions:
    """The student's logits are scored at ``τ = 1`` (the NLL's); the divergence divides them
    by ``τ`` itself (``_tempered``)."""
    return dataclasses.replace(self.opts, temperature=1.0)

  def head_plan(self, layout: str, *, student: bool = False) -> Plan:
    """The :class:`~jaxnll.fused.compact.Plan` of one head (for its :class:`Compacted`)."""
    opts = self.student_opts if student else self.opts
    return Plan(opts, self.token_chunk, self.vocab_chunk, weight_layout=layout)


class Kernel(NamedTuple):
  """One implementation of the per-token kernel interface (position order, ``N = B·T``).

  * ``forward(plan, hs, ws, bs, ht, wt, bt, targets, span_mask) -> (tokens, stats)``:
    ``tokens`` the float32 ``[N]`` per-token divergences (and, with ``plan.nll``, the
    student's per-token NLL), 0 outside the span; ``stats`` float32 ``[N]`` residuals.
  * ``backward(plan, hs, ws, bs, ht, wt, bt, targets, span_mask, stats, scales, need) ->
    (dh, dw, db)``: ``scales`` the per-token cotangents ``(divergence, NLL or None)``
    (float32 ``[N]``, 0 outside the span); the gradients of ``Σ scale·loss`` for the student's
    hidden states, head and bias in their dtypes, ``None`` where ``need`` says so.

  ``targets`` is ``None`` unless ``plan.nll``.  Reductions (per sample, per segment, means)
  are plain differentiable sums outside the kernels.
  """

  forward: Callable
  backward: Callable


# ----------------------------------------------------------------------------- the kernel


def _pair(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  """The two heads' :class:`Compacted` views (the same order: same mask, same stable sort);
  only the student's holds target ids (the teacher's rows only)."""
  ids = jnp.zeros(span_mask.shape, jnp.int32)
  s = Compacted(plan.head_plan(plan.student_layout, student=True), hs, ws, bs,
                ids if targets is None else targets, span_mask)  # fmt: skip
  t = Compacted(plan.head_plan(plan.teacher_layout), ht, wt, bt_, ids, span_mask)
  return s, t


def _tempered(plan: DistillPlan, x):
  """The student's scored logits ``x / τ`` (the same operation as in
  :func:`jaxnll._core.softcap`)."""
  tau = plan.opts.temperature
  return x if tau == 1.0 else x / tau


def _tile(plan: DistillPlan, s: Compacted, t: Compacted, h_s, h_t, start, width):
  """``(x_s, z_s, z_t)`` f32 ``[C, width]`` at vocabulary columns ``start + [0, width)``: the
  student's capped logits at ``τ = 1`` and both heads' scored logits."""
  xs = s.logits(h_s, s.columns(start, width), start, width)
  zt = t.logits(h_t, t.columns(start, width), start, width)
  return xs, _tempered(plan, xs), zt


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


def _lse_step(x, m, total):
  """A running ``(max, Σ exp(x - max))`` per row with one more tile ``x`` ``[C, K]``."""
  m_new = jnp.maximum(m, jnp.max(x, axis=1))
  return m_new, total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)


def _online(plan: DistillPlan, xs, zs, zt, carry):
  """One vocabulary tile added to the running row statistics ``(m_s, s_s, m_t, s_t, acc)``
  (``acc``: the kind's running weighted sum), and with :attr:`DistillPlan.nll_stats` the
  running ``(m, s)`` of the student's logits at ``τ = 1`` ``xs``."""
  kind = plan.kind
  ms, ss, mt, st, acc = carry[:5]
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
  extra = _lse_step(xs, *carry[5:]) if plan.nll_stats else ()
  return (ms_new, ss, mt_new, st, acc, *extra)


def _jsd_terms(plan: DistillPlan, zs, zt, lse_s, lse_t):
  """``(Σ p_t (log p_t - log m), Σ p_s (log p_s - log m))`` of one tile, per row."""
  lps, lpt = zs - lse_s[:, None], zt - lse_t[:, None]
  lm = _log_m(plan, lps, lpt)
  return _xlogy_terms(jnp.exp(lpt), lpt, lm), _xlogy_terms(jnp.exp(lps), lps, lm)


def _finish(plan: DistillPlan, carry, jsd_pass):
  """Per-row ``(stats, loss, lse)`` from the running statistics (combined over vocabulary
  shards): ``lse`` the log-sum-exp of the student's logits at ``τ = 1`` (the NLL's);
  ``jsd_pass(lse_s, lse_t) -> (kt, ks)`` is the second pass of ``"jsd"``."""
  kind, opts = plan.kind, plan.opts
  ms, ss, mt, st, acc = carry[:5]
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
  stats, lse = (ms, ss, mt, st, r), lse_s
  if plan.nll_stats:
    m1, s1, _ = _combine(opts, *carry[5:], None)
    stats, lse = stats + (m1, s1), m1 + jnp.log(s1)
  return stats, loss, lse


def _row_stats(plan: DistillPlan, s: Compacted, t: Compacted, i):
  """Per-token ``(stats, losses)`` of token chunk ``i``: ``stats = (m_s, s_s, m_t, s_t, r)``
  (row maxima and sums of ``exp(z - m)`` of both heads, and ``r``: the loss for
  ``"reverse_kl"``, ``KL(p_s ‖ m)`` for ``"jsd"``, unused otherwise), and with
  :attr:`DistillPlan.nll_stats` ``(m, s)`` of the student at ``τ = 1``; ``losses`` the
  divergence, and with ``plan.nll`` the NLL; float32 ``[C]`` each."""
  h_s, h_t = s.rows(i), t.rows(i)

  def online(start, width, carry):
    return _online(plan, *_tile(plan, s, t, h_s, h_t, start, width), carry)

  def jsd_pass(lse_s, lse_t):
    def second(start, width, carry):
      _, zs, zt = _tile(plan, s, t, h_s, h_t, start, width)
      kt, ks = _jsd_terms(plan, zs, zt, lse_s, lse_t)
      return carry[0] + kt, carry[1] + ks

    return over_vocab(second, (zero, zero), s.cols, plan.vocab_chunk)

  rows = s.chunk
  zero = s.full((rows,), F32)
  low = s.full((rows,), F32, jnp.finfo(F32).min)
  init = (low, zero, low, zero, zero) + ((low, zero) if plan.nll_stats else ())
  carry = over_vocab(online, init, s.cols, plan.vocab_chunk)
  stats, loss, lse = _finish(plan, carry, jsd_pass)
  losses = (loss,)
  if plan.nll:  # -log p(y) = lse - x_y: the target logit is a gather, not a vocabulary scan
    losses += (lse - s.target_logit(h_s, s.part(s.targets, i)),)
  ok = s.part(s.valid, i)
  keep = lambda xs: tuple(jnp.where(ok, x, 0.0) for x in xs)  # noqa: E731
  return keep(stats), keep(losses)


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
  """Compacted per-token ``(stats, losses)`` over the target chunks."""

  def body(i, carry):
    stats, losses = _row_stats(plan, s, t, i)
    at = (i * s.chunk,)
    put = lambda acc, xs: tuple(  # noqa: E731
      lax.dynamic_update_slice(a, x, at) for a, x in zip(acc, xs, strict=True)
    )
    return put(carry[0], stats), put(carry[1], losses)

  zeros = s.full(s.valid.shape, F32, rows=True)
  num_stats = 7 if plan.nll_stats else 5
  return lax.fori_loop(
    0, s.num_chunks, body, ((zeros,) * num_stats, (zeros,) * (2 if plan.nll else 1))
  )


def _grad_tile(plan: DistillPlan, tile, stats, scales, ok, target=None):
  """``scale · ∂D/∂x_s (+ scale_nll · ∂NLL/∂x_s)`` of one tile (f32 ``[C, K]``, raw student
  logits ``x_s``); ``tile = (x_s, z_s, z_t)`` as from ``_tile``, ``target = (y, first,
  vocab)``: the NLL's target ids, the tile's first vocabulary id and the vocabulary.  Each
  term is gated by its own cotangent: a row with a zero scale sends back exactly 0 from it, a
  differentiated row with a non-finite value (or an NLL target outside ``[0, V)``) NaN."""
  xs, zs, zt = tile
  scale, scale_nll = scales
  ms, ss, mt, st, r = (x[:, None] for x in stats[:5])
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
  g = jnp.where((ok & (scale != 0))[:, None], dz * scale[:, None], 0.0)
  g = _tempered(plan, g)  # dz/dx = 1/τ
  if plan.nll and scale_nll is not None:
    y, first, vocab = target
    if plan.nll_stats:
      m1, s1 = (x[:, None] for x in stats[5:])
      p1 = jnp.exp(xs - m1) / s1
    else:
      p1 = ps
    cols = first + jnp.arange(xs.shape[1], dtype=jnp.int32)
    d1 = p1 - (cols[None, :] == y[:, None]).astype(F32)
    g1 = jnp.where((ok & (scale_nll != 0))[:, None], d1 * scale_nll[:, None], 0.0)
    g = g + _core.poison_bad_targets(g1, y, vocab, jnp.where(ok, scale_nll, 0.0))
  return g * _core.softcap_grad(xs, plan.student_opts)


def _backward(plan: DistillPlan, s: Compacted, t: Compacted, scales_c, stats_c, need):
  """Gradients of ``Σ scale·D (+ Σ scale_nll·NLL)`` for (student hidden, head, bias) by
  recomputation: vocabulary tiles outside, token chunks inside, so each weight-gradient tile
  is summed over every token in an f32 ``[Ds, K]`` buffer and cast once.  ``None`` for what
  ``need`` leaves out."""
  rows = s.chunk
  need_h, need_w, need_b = need[0], need[1], need[2] and s.bias is not None

  def vocab_body(start, width, carry):
    dh_c, dw, db = carry
    w_s, w_t = s.columns(start, width), t.columns(start, width)

    def token_body(i, inner):
      dw_k, db_k, dh_c = inner
      h_s, h_t = s.rows(i), t.rows(i)
      xs = s.logits(h_s, w_s, start, width)
      tile = (xs, _tempered(plan, xs), t.logits(h_t, w_t, start, width))
      part = lambda x: None if x is None else s.part(x, i)  # noqa: E731
      target = (part(s.targets), s.offset + start, s.vocab)
      g = _grad_tile(
        plan, tile, tuple(map(part, stats_c)), tuple(map(part, scales_c)), part(s.valid), target
      )
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


def _tiled_forward(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask)
  stats_c, losses_c = _forward(plan, s, t)
  back = lambda xs: tuple(s.uncompact(x) for x in xs)  # noqa: E731
  return back(losses_c), back(stats_c)


def _tiled_backward(
  plan: DistillPlan, hs, ws, bs, ht, wt, bt_, targets, span_mask, stats, scales, need
):
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask)
  stats_c = tuple(s.compact(x) for x in stats)
  scales_c = tuple(None if x is None else s.compact(x) for x in scales)
  dh_c, dw, db = _backward(plan, s, t, scales_c, stats_c, need)
  return compact.finish_grads(s, dh_c, dw, db, hs, ws, bs)


def _pallas_forward(plan: DistillPlan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  """The Mosaic pair of :mod:`jaxnll.fused.pallas_tpu_distill` (the divergence only: with
  ``targets`` the plan is another kernel's, see ``_kernel_plan``)."""
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask)
  stats_c, loss_c = pallas_tpu_distill.forward(plan, s, t)
  return (s.uncompact(loss_c),), tuple(s.uncompact(x) for x in stats_c)


def _pallas_backward(
  plan: DistillPlan, hs, ws, bs, ht, wt, bt_, targets, span_mask, stats, scales, need
):
  s, t = _pair(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask)
  stats_c = tuple(s.compact(x) for x in stats)
  dh_c, dw, db = pallas_tpu_distill.backward(plan, s, t, s.compact(scales[0]), stats_c, need)
  return compact.finish_grads(s, dh_c, dw, db, hs, ws, bs)


# ----------------------------------------------------------------------------- custom_vjp
#
# Per-token outputs [B, T] (the divergence, and with ``plan.nll`` the NLL) with per-token
# cotangents; the entry reduces them per sample or per segment with plain differentiable
# sums.  Residuals leave each kernel in position order ([N] per statistic), so that the
# branches of "auto" (each with its own token chunk, hence its own padded length) agree on
# every shape.

#: The kernels by implementation name (one :class:`Kernel` each): ``"chunked"`` and
#: ``"token_chunked"`` share the tiled kernel above, with their own plans
#: (``_kernel_plan``).
KERNELS: dict[str, Kernel] = {
  "chunked": Kernel(_tiled_forward, _tiled_backward),
  "token_chunked": Kernel(_tiled_forward, _tiled_backward),
  "pallas_tpu": Kernel(_pallas_forward, _pallas_backward),
}


def _dispatch(plan: DistillPlan, which: str, *args):
  """``KERNELS[implementation].<which>(kernel_plan, *args)``, per platform for ``"auto"``."""

  def run(sub: DistillPlan, *a):
    return getattr(KERNELS[sub.implementation], which)(sub, *a)

  if plan.implementation != "auto":
    return run(plan, *args)
  per_platform = {}
  # Under automatic partitioning libtpu cannot partition a Mosaic call: TPU takes "chunked".
  tpu = auto_lib.tpu_branch(*args[:2], *args[3:5])
  for sub, platforms in plan.branches:
    if sub.implementation == "pallas_tpu" and tpu == "chunked":
      sub = next(p for p, _ in plan.branches if p.implementation == "chunked")
    for name in platforms:
      per_platform[name] = functools.partial(run, sub, *args)
  return lax.platform_dependent(**per_platform)


def _token_value(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  tokens, stats = _dispatch(plan, "forward", hs, ws, bs, ht, wt, bt_, targets, span_mask)
  mask = _core.mask_to_bool(span_mask)
  return tuple(jnp.where(mask, x.reshape(mask.shape), 0.0) for x in tokens), stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tokens(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  return _token_value(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask)[0]


def _primal(x):
  return x.value if isinstance(x, CustomVJPPrimal) else x


def _tokens_fwd(plan, hs, ws, bs, ht, wt, bt_, targets, span_mask):
  # Which of the student's (hidden, head, bias) are differentiated: ``()`` yes, ``None`` no
  # (pytree structure, static).
  need = tuple(() if isinstance(x, CustomVJPPrimal) and x.perturbed else None for x in (hs, ws, bs))
  args = tuple(_primal(x) for x in (hs, ws, bs, ht, wt, bt_, targets, span_mask))
  out, stats = _token_value(plan, *args)
  return out, (args, stats, need)


def _tokens_bwd(plan, res, cts):
  args, stats, need = res
  nothing = (None,) * 8
  need = tuple(x is not None for x in need)
  live = [not isinstance(c, SymbolicZero) for c in cts]
  if not any(live) or not any(need):
    return nothing
  mask = _core.mask_to_bool(args[-1]).reshape(-1)
  scales = [
    jnp.where(mask, c.reshape(-1).astype(F32), 0.0) if ok else None
    for c, ok in zip(cts, live, strict=True)
  ]
  if scales[0] is None:
    scales[0] = jnp.zeros(mask.shape, F32)
  scales = (*scales, None) if len(scales) == 1 else tuple(scales)
  dh, dw, db = _dispatch(plan, "backward", *args, stats, scales, need)
  # The teacher is a constant: no cotangent (not even zeros); targets and mask are data.
  return dh, dw, db, None, None, None, None, None


_tokens.defvjp(_tokens_fwd, _tokens_bwd, symbolic_zeros=True)
_tokens = reverse_only(_tokens)


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
  16-bit heads tiles of :data:`TOKEN_CHUNKED_GRAD_BYTES` of f32 accumulator.  ``"pallas_tpu"``
  has the tiles of :func:`jaxnll.fused.pallas_tpu_distill.kernel_plan`; its kernel pair
  computes the divergence only, so with ``targets`` (both terms from one pass) the TPU branch
  of ``"auto"`` runs ``"chunked"``."""
  if implementation == "pallas_tpu":
    if not base.nll:
      return pallas_tpu_distill.kernel_plan(base, tc, vc)
    implementation = "chunked"
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
  targets: Int[Array, "B T"] | None = None,
  segment_ids: Int[Array, "B T"] | None = None,
  num_segments: int | None = None,
) -> Float[Array, " B"] | Float[Array, "B S"] | tuple[Array, Array]:
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
    implementation: ``"auto"`` (TPU ``"pallas_tpu"``, GPU ``"token_chunked"``, otherwise
      ``"chunked"``, chosen when lowering), ``"chunked"``, ``"token_chunked"``, ``"pallas_tpu"``
      (Pallas interpret mode off TPU) or ``"xla"`` (both logits materialised).
    token_chunk, vocab_chunk: block sizes (need not divide ``B·T`` or ``V``); for
      ``"token_chunked"`` (full-vocabulary forward blocks) ``vocab_chunk`` sets the gradient
      pass's vocabulary tiles.

    targets: ``[B, T]`` integer ids: the result is then the pair ``(divergence, nll)``, ``nll``
      the student's hard-target NLL ``-log softmax(x_s)[y]`` (at ``τ = 1``, soft-capped, with
      the student's bias) over the same span, weights and reduction — equal to
      :func:`jaxnll.linear_sequence_nll` (:func:`jaxnll.linear_segment_nll` with
      ``segment_ids``) — from the same tiles of the student's head: one forward pass and one
      recomputing gradient pass for both terms, each differentiated by its own cotangent.
      Ids outside ``[0, V)`` inside the span make that sample's NLL (and the gradient flowing
      from it) NaN.
    segment_ids: ``[B, T]`` integer segment of each position of packed rows (0: padding, never
      computed; samples are ``1..num_segments``; ids above it are ignored; a negative id inside
      the span makes its row NaN): the results are ``[B, num_segments]``, ``out[b, s - 1]``
      the sum (or weighted mean) over segment ``s`` of row ``b``, all segments in one pass.
    num_segments: ``S`` (a Python int), with ``segment_ids``.

  Returns:
    float32 ``[B]`` (``[B, S]`` with ``segment_ids``), or the pair ``(divergence, nll)`` with
    ``targets``; gradients come back in the student's dtypes.

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

    With ``targets`` the student's NLL comes from the same head pass:

    >>> y = jnp.arange(10).reshape(2, 5)
    >>> kd, nll = linear_distill_loss(hs, ws, ht, wt, span, targets=y, implementation="chunked")
    >>> from jaxnll import linear_sequence_nll
    >>> bool(jnp.allclose(nll, linear_sequence_nll(hs, ws, y, span), rtol=1e-5))
    True
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
  if targets is not None:
    targets = _core.as_array("targets", targets)
    _core.check_integer("targets", targets)
    if jnp.shape(targets) != jnp.shape(hs)[:2]:
      raise ValueError(
        f"targets must have shape [B, T] = {jnp.shape(hs)[:2]}, got shape {jnp.shape(targets)}"
      )
    targets = _core.int32_ids(jnp.asarray(targets))
  if segment_ids is not None:
    segment_ids = _core.as_array("segment_ids", segment_ids)
    _core.check_segments(segment_ids, num_segments, "span_mask", span_mask)
    segment_ids = jnp.asarray(segment_ids)
  elif num_segments is not None:
    raise ValueError(f"num_segments={num_segments!r} needs segment_ids")
  for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive Python int or None, got {value!r}")
  span_mask = jnp.asarray(span_mask)
  if segment_ids is not None:  # padding (segment 0) is never computed: the cost follows samples
    span_mask = jnp.where(segment_ids != 0, span_mask, jnp.zeros((), span_mask.dtype))
  sg = lax.stop_gradient
  ht, wt = sg(ht), sg(wt)
  bt_ = None if bt_ is None else sg(bt_)
  b, t = hs.shape[:2]
  reduce = functools.partial(_reduce, span_mask, segment_ids, num_segments, reduction)
  if b * t == 0:
    zero = reduce(jnp.zeros((b, t), F32))
    return zero if targets is None else (zero, zero)
  if implementation == "pallas_tpu" and targets is not None:
    # The Mosaic pair computes the divergence only: the NLL from the NLL kernels (two passes).
    kd = linear_distill_loss(
      hs, ws, ht, wt, span_mask, kind=kind, temperature=temperature, beta=beta,
      reduction=reduction, student_bias=bs, teacher_bias=bt_, logit_softcap=logit_softcap,
      vocab_axis=vocab_axis, student_weight_layout=student_weight_layout,
      teacher_weight_layout=teacher_weight_layout, implementation=implementation,
      token_chunk=token_chunk, vocab_chunk=vocab_chunk, segment_ids=segment_ids,
      num_segments=num_segments,
    )  # fmt: skip
    head = dict(bias=bs, logit_softcap=logit_softcap, vocab_axis=vocab_axis,
                weight_layout=student_weight_layout, implementation=implementation,
                token_chunk=token_chunk, vocab_chunk=vocab_chunk, reduction=reduction)  # fmt: skip
    if segment_ids is None:
      return kd, api_lib.linear_sequence_nll(hs, ws, targets, span_mask, **head)
    nll = api_lib.linear_segment_nll(hs, ws, targets, span_mask, segment_ids,
                                     num_segments=num_segments, **head)  # fmt: skip
    return kd, nll
  if implementation == "xla":
    kd, nll = _materialised(hs, ws, bs, ht, wt, bt_, targets, span_mask,
                            (segment_ids, num_segments), reduction, kind, beta, opts,
                            student_weight_layout, teacher_weight_layout)  # fmt: skip
    return kd if targets is None else (kd, nll)
  d = hs.shape[2]
  base = DistillPlan(kind, beta, opts, 1, 1, 1, student_weight_layout, teacher_weight_layout,
                     nll=targets is not None)  # fmt: skip
  args = (b * t, vs, d, ws.dtype, token_chunk, vocab_chunk)
  if implementation == "auto":
    branches = tuple((_kernel_plan(name, base, *args), p) for name, p in AUTO_BRANCHES)
    plan = dataclasses.replace(branches[-1][0], implementation="auto", branches=branches)
  else:
    plan = _kernel_plan(implementation, base, *args)
  arrays = _vary_alike(hs, ws, bs, ht, wt, bt_, targets, span_mask, vocab_axis)
  out = tuple(reduce(x) for x in _tokens(plan, *arrays))
  return out[0] if targets is None else out


def _reduce(span_mask, segment_ids, num_segments, reduction, tok):
  """Per-token losses ``[B, T]`` summed (or weighted means) per sample ``[B]``, or per
  segment ``[B, S]`` with ``segment_ids`` (as :func:`jaxnll.sequence_nll` /
  :func:`jaxnll.segment_nll` reduce theirs: the same loud means and negative ids)."""
  mask, weights = _core.mask_to_bool(span_mask), _core.mask_to_weights(span_mask)
  if segment_ids is not None:
    return nll_lib.reduce_segments(tok, weights, mask, segment_ids, num_segments, reduction)
  return jax.vmap(lambda *a: nll_lib.reduce_span(*a, reduction))(tok, weights, mask)


def _vary_alike(hs, ws, bs, ht, wt, bt_, targets, span_mask, vocab_axis):
  """Under ``shard_map``, every array varies over the axes any of them varies over (the loop
  carries mix both heads), as :func:`jaxnll.fused.compact.vary_alike` does for one head:
  hidden states, targets and mask stay as they are over the vocabulary axis, the heads vary
  over it."""
  arrays = (hs, ws, bs, ht, wt, bt_, targets, span_mask)
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
  """``(x_s, z_s, z_t)`` of materialised logits, as ``_tile`` gives them."""
  keep = ok[:, None]
  xs = _core.softcap(jnp.where(keep, xs, jnp.zeros((), xs.dtype)), plan.student_opts)
  zt = _core.softcap(jnp.where(keep, xt, jnp.zeros((), xt.dtype)), plan.opts)
  return xs, _tempered(plan, xs), zt


def _rows_fwd(plan: DistillPlan, xs, xt, ok):
  tile = _scored(plan, xs, xt, ok)
  low, zero = jnp.full(ok.shape, jnp.finfo(F32).min), jnp.zeros(ok.shape, F32)
  carry = _online(plan, *tile, (low, zero, low, zero, zero))
  stats, loss, _ = _finish(plan, carry, lambda a, b: _jsd_terms(plan, *tile[1:], a, b))
  return jnp.where(ok, loss, 0.0), (xs, xt, ok, stats)


def _rows_bwd(plan: DistillPlan, res, ct):
  xs, xt, ok, stats = res
  tile = _scored(plan, xs, xt, ok)
  g = _grad_tile(plan, tile, stats, (ct.astype(F32), None), ok)
  return g.astype(xs.dtype), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)
_rows = reverse_only(_rows)


def _materialised(hs, ws, bs, ht, wt, bt_, targets, span_mask, seg, reduction, kind, beta, opts,
                  ls, lt):  # fmt: skip
  """The ``"xla"`` path: both ``[B, T, V]`` logits, then the divergence (``"ce"`` / ``"kl"``:
  :func:`jaxnll.distill_cross_entropy` or :func:`jaxnll.segment_distill_cross_entropy`; the
  others row by row in float32 through ``_rows``, whose backward is the fused kernels'
  gated formula, so a zero cotangent leaks no NaN) and, with ``targets``,
  :func:`jaxnll.sequence_nll` / :func:`jaxnll.segment_nll` of the same student logits.  Hidden
  rows outside the span are zeroed first (NaN there reaches no gradient).  ``seg``:
  ``(segment_ids, num_segments)``, ``segment_ids`` None for per-sample results.  Returns
  ``(divergence, nll or None)``."""
  if opts.vocab_axis is not None:
    raise ValueError('vocab_axis needs a fused implementation (implementation="chunked")')
  segment_ids, num_segments = seg
  per = {} if segment_ids is None else dict(num_segments=num_segments)
  mask = _core.mask_to_bool(span_mask)
  inside = mask[..., None]

  def logits(h, w, b, layout):
    h = jnp.where(inside, h, jnp.zeros((), h.dtype))
    z = h @ w if layout == "dv" else jnp.einsum("btd,vd->btv", h, w)
    return z if b is None else z + b[None, None, :]

  xs, xt = logits(hs, ws, bs, ls), logits(ht, wt, bt_, lt)
  if kind in ("ce", "kl"):
    cap = lambda z, c=opts.logit_softcap: (c * jnp.tanh(z.astype(F32) / c)).astype(z.dtype)  # noqa: E731
    zs, zt = (xs, xt) if opts.logit_softcap is None else (cap(xs), cap(xt))
    name = "cross_entropy" if kind == "ce" else "kl"
    fn = distill_lib.distill_cross_entropy
    if segment_ids is not None:
      fn = functools.partial(distill_lib.segment_distill_cross_entropy, segment_ids=segment_ids)
    kd = fn(zs, zt, span_mask, temperature=opts.temperature, reduction=reduction, kind=name, **per)
  else:
    plan = DistillPlan(kind, beta, opts, 1, 1, 1)  # soft-cap and τ inside: one gated backward
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    tok = _rows(plan, flat(xs), flat(xt), mask.reshape(-1)).reshape(mask.shape)
    kd = _reduce(span_mask, segment_ids, num_segments, reduction, tok)
  nll = None
  if targets is not None:
    fn = nll_lib.sequence_nll
    if segment_ids is not None:
      fn = functools.partial(nll_lib.segment_nll, segment_ids=segment_ids)
    nll = fn(xs, targets, span_mask, reduction=reduction, logit_softcap=opts.logit_softcap, **per)
  return kd, nll
