"""Knowledge-distillation cross-entropy against a teacher, per sample, over the target span.

Dimension letters: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.

Token-level knowledge distillation trains a student to match the teacher's whole next-token
distribution at every target position instead of the one observed token.  With temperature
``τ``, ``p = softmax(teacher / τ)`` (held fixed: ``stop_gradient``) and
``q = softmax(student / τ)``, the per-token losses are

.. math::

   \\mathrm{CE}_t = -\\sum_v p_{t,v} \\log q_{t,v}, \\qquad
   \\mathrm{KL}_t = \\mathrm{CE}_t - H(p_t) = \\sum_v p_{t,v} (\\log p_{t,v} - \\log q_{t,v}),

and the per-sample loss is their sum (or weighted mean) over the target span, exactly as
:func:`jaxnll.sequence_nll` reduces the NLL.  The cross-entropy and the KL have the same
gradient with respect to the student, ``(q - p) / τ``; the KL is ``≥ 0`` and ``0`` when the
two distributions agree, which makes it the number people compare.

**Temperature convention: no** ``τ²`` **factor.**  The value is the plain cross-entropy between
the tempered distributions, ``optax.softmax_cross_entropy(student / τ, softmax(teacher / τ))``
summed over the span, and its gradient shrinks like ``1 / τ``.  Hinton et al. multiply the
soft loss by ``τ²`` so that its gradient keeps the magnitude of a hard-label loss when ``τ``
changes; do that yourself (``tau**2 * distill_cross_entropy(...)``) if you mix the two.  The
training mode of :mod:`jaxnll.train.modes.distill` does.

Conventions as for every jaxnll loss: the softmaxes and all sums are float32 whatever the
logits' dtype; the gradient comes back in the student's dtype; positions outside the span are
never read for values or gradients (they may hold NaN); an empty span costs exactly ``0``.
A vocabulary entry the teacher gives probability exactly ``0`` (e.g. ``-inf`` padding of the
vocabulary, in both models) contributes nothing, as ``0 · log 0 = 0``.

References: G. Hinton, O. Vinyals and J. Dean, *Distilling the Knowledge in a Neural Network*
(2015); Y. Kim and A. M. Rush, *Sequence-Level Knowledge Distillation* (2016); T. Xiao and
J. Zhu, *Foundations of Large Language Models*, ch. 3-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.checks import check_distill_inputs as check_inputs  # noqa: F401 (public name)
from jaxnll.nll import REDUCTIONS, ROW_RULES, reduce_segments, reduce_span, row_tangent

KINDS = ("cross_entropy", "kl")

# ----------------------------------------------------------------------------- token level
#
# Forward: the row maxima, then one pass over both rows for the two sums of exponentials and
# the teacher-weighted dot product.  XLA fuses each into a loop over the logits, converting to
# float32 on the fly, so no float32 buffer the size of the logits exists.  The residuals are
# two f32 log-sum-exps per row (each as row max and log of the shifted sum); the backward
# recomputes both softmaxes in one elementwise pass.  Masked rows are handled with selects on
# the results, never by rewriting the inputs.  Every difference of logits is taken relative
# to its row max, so large logits (a near one-hot teacher) cost no precision.


def _tempered(x, temperature: float):
  """``x / τ`` in float32."""
  x = x.astype(F32)
  return x if temperature == 1.0 else x / temperature


def _row_max(x, temperature: float):
  # Dividing by τ > 0 is monotonic: the max of the raw (maybe 16-bit) logits is exact.
  m = _tempered(jnp.max(x, axis=-1), temperature)
  return jnp.where(jnp.isfinite(m), m, 0.0)


@jax.custom_jvp
def _row_sums(*terms):
  """Sums of several ``[..., V]`` terms over the vocabulary in one variadic reduction.

  One reduction with several operands is one loop over the logits into which XLA fuses every
  producer; separate ``jnp.sum`` calls that share a producer (the teacher's exponentials, the
  f32 student) make XLA's CPU backend materialise that producer as a float32 ``[..., V]``
  buffer.
  """
  zeros = tuple(jnp.zeros((), F32) for _ in terms)
  axis = terms[0].ndim - 1
  return jax.lax.reduce(
    terms, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), (axis,)
  )


@_row_sums.defjvp
def _row_sums_jvp(primals, tangents):
  # Only second derivatives reach this (the first are the custom_jvp rule's below): plain
  # sums, which JAX can transpose and which need no symbolic-zero support from lax.reduce.
  return _row_sums(*primals), tuple(jnp.sum(t, axis=-1, dtype=F32) for t in tangents)


def _row_stats(s, t, mask, temperature: float, kind: str):
  """Per-row loss and the log-sum-exps of student ``s`` and teacher ``t`` (float32)."""
  ms, mt = _row_max(s, temperature), _row_max(t, temperature)
  zs, zt = _tempered(s, temperature), _tempered(t, temperature)
  es = jnp.exp(zs - ms[..., None])
  et = jnp.exp(zt - mt[..., None])  # teacher probabilities, unnormalised
  if kind == "cross_entropy":
    # CE = lse_s - Σ p zs = log(sum_s) + Σ p (ms - zs): two terms >= 0, no cancellation.
    gap = ms[..., None] - zs
  else:
    # KL = Σ p ((zt - mt) - (zs - ms)) + log(sum_s) - log(sum_t); exactly 0 when zs == zt.
    gap = (zt - mt[..., None]) - (zs - ms[..., None])
  # 0 · (anything) is 0 where the teacher's probability is 0 (-inf padding in both models).
  sum_s, sum_t, dot = _row_sums(es, et, jnp.where(et > 0, et * gap, 0.0))
  log_s, log_t = jnp.log(sum_s), jnp.log(sum_t)
  if kind == "cross_entropy":
    loss = log_s + dot / sum_t
  else:
    # Rounding can make it a few ulps negative; the true value never is.
    loss = jnp.maximum(dot / sum_t + (log_s - log_t), 0.0)
  # The log-sum-exps are kept as (row max, log of the shifted sum): the backward's
  # ``exp((z - max) - log_sum)`` is then as exact as a softmax computed from scratch, where
  # ``exp(z - lse)`` would lose the ulps of a large ``lse``.
  stats = tuple(jnp.where(mask, x, 0.0) for x in (ms, log_s, mt, log_t))
  return jnp.where(mask, loss, 0.0), stats


def _distill_res(res, static):
  s, t, mask, ms, log_s, mt, log_t = res
  temperature, kind = static
  return s, t, mask, (ms, log_s, mt, log_t), temperature, kind


def _distill_grad(s, t, mask, stats, g, temperature):
  """``g · ∂loss/∂s`` (float32) from the two log-sum-exps; exactly 0 where ``g`` is 0."""
  ms, log_s, mt, log_t = stats
  zs, zt = _tempered(s, temperature), _tempered(t, temperature)
  q = jnp.exp((zs - ms[..., None]) - log_s[..., None])
  p = jnp.exp((zt - mt[..., None]) - log_t[..., None])
  ds = q - p
  # A zero cotangent sends back exactly nothing, not NaN · 0 from a bad row.
  return jnp.where((mask & (g != 0))[..., None], ds * (g / temperature)[..., None], 0.0)


def _distill_jac(res, static):
  s, t, mask, stats, temperature, _ = _distill_res(res, static)
  return _distill_grad(s, t, mask, stats, jnp.ones(mask.shape, F32), temperature)


def _distill_vjp(res, g, static):
  s, t, mask, stats, temperature, _ = _distill_res(res, static)
  # As in token_nll: keep XLA from sharing one f32 conversion of the logits between the
  # forward reductions and this pass (which would materialise it).  Not needed for the loss
  # alone at the shapes measured (bench/distill_memory.py); a guard inside bigger graphs.
  s, t = jax.lax.optimization_barrier((s, t))
  return _distill_grad(s, t, mask, stats, g, temperature).astype(s.dtype)


ROW_RULES["distill"] = (_distill_jac, _distill_vjp)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _distill_rows(s, t, mask, temperature, kind):
  return _row_stats(s, t, mask, temperature, kind)[0]


@_distill_rows.defjvp
def _distill_rows_jvp(temperature, kind, primals, tangents):
  s, t, mask = primals
  loss, stats = _row_stats(s, t, mask, temperature, kind)
  # Residuals of the backward: the two logits (already live) and two f32 log-sum-exps per
  # row; both softmaxes are recomputed.  The teacher is a constant (under stop_gradient in
  # every caller): only the student's tangent moves the loss.
  res = (s, t, mask, *stats)
  return loss, row_tangent("distill", res, tangents[0], (temperature, kind))


# ----------------------------------------------------------------------------- argument checks


def _check_temperature(temperature) -> float:
  return _core.check_temperature(temperature)


def _check_args(student_logits, teacher_logits, span_mask):
  """Checks the three arrays and returns them as arrays (Python lists are converted)."""
  student_logits = _core.as_array("student_logits", student_logits)
  teacher_logits = _core.as_array("teacher_logits", teacher_logits)
  span_mask = _core.as_array("span_mask", span_mask)
  _core.check_floating("student_logits", student_logits)
  _core.check_floating("teacher_logits", teacher_logits)
  _core.check_rank("student_logits", student_logits, (3,), "[B, T, V]")
  _core.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _core.check_mask("span_mask", span_mask)
  if jnp.shape(span_mask) != jnp.shape(student_logits)[:-1]:
    raise ValueError(
      "span_mask must have the shape [B, T] of student_logits without the vocabulary axis, "
      f"got student_logits {jnp.shape(student_logits)} and span_mask {jnp.shape(span_mask)}"
    )
  _core.check_vocab("student_logits", jnp.shape(student_logits)[-1], jnp.shape(student_logits))
  return student_logits, teacher_logits, span_mask


# ----------------------------------------------------------------------------- public


def distill_cross_entropy(
  student_logits: Float[Array, "B T V"],
  teacher_logits: Float[Array, "B T V"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  temperature: float = 1.0,
  reduction: str = "sum",
  kind: str = "cross_entropy",
) -> Float[Array, " B"]:
  """Per-sample distillation cross-entropy ``-Σ_t Σ_v p_teacher log p_student`` over the span.

  .. math::

     L_b = \\sum_t w_{b,t} \\Big( -\\sum_v p_{b,t,v} \\log q_{b,t,v} \\Big), \\quad
     p = \\mathrm{softmax}(\\mathrm{teacher} / τ), \\;
     q = \\mathrm{softmax}(\\mathrm{student} / τ),

  (``"mean"`` divides by ``Σ_t w_{b,t}``; ``0`` for an empty span).  ``kind="kl"`` subtracts
  the teacher's entropy per token.  **No** ``τ²`` **factor** is applied (module docstring): the
  value equals ``optax.softmax_cross_entropy(student / τ, softmax(teacher / τ))`` summed over
  the span.  The teacher is under ``stop_gradient``: its gradient is exactly zero.

  Memory-lean: a ``custom_jvp`` whose tangent is linear keeps only four float32 row
  statistics per position and the backward recomputes both softmaxes, so forward + backward
  need no float32 ``[B, T, V]`` buffer, whatever the logits' dtype.  Forward mode
  (``jax.jvp``, ``jacfwd``, ``hessian``) works too.

  Args:
    student_logits: ``[B, T, V]``, any floating dtype; ``student_logits[b, t]`` is the
      student's prediction at position ``t`` (coordinates as in :func:`jaxnll.sequence_nll`).
    teacher_logits: ``[B, T, V]`` (any floating dtype) at the same positions.
    span_mask: ``[B, T]`` bool mask or float weights of the positions that count.
    temperature: ``τ`` (a Python float, finite and at least
      :data:`jaxnll._core.MIN_TEMPERATURE` = 1e-6) applied to both softmaxes.
    reduction: ``"sum"`` or ``"mean"`` (per span token).
    kind: ``"cross_entropy"`` or ``"kl"`` (cross-entropy minus the teacher's entropy).

  Returns:
    float32 ``[B]``.  The gradient with respect to ``student_logits`` is in its dtype.

  Examples:
    A teacher sure of the token the student gives 0.8 costs ``-log 0.8``; the KL to itself
    is 0.

    >>> import jax.numpy as jnp
    >>> student = jnp.log(jnp.array([[[0.8, 0.2]]]))
    >>> teacher = jnp.array([[[0.0, -1e4]]])
    >>> span = jnp.ones((1, 1), bool)
    >>> round(float(distill_cross_entropy(student, teacher, span)[0]), 4)
    0.2231
    >>> float(distill_cross_entropy(student, student, span, kind="kl")[0])
    0.0
  """
  student_logits, teacher_logits, span_mask = _check_args(student_logits, teacher_logits, span_mask)
  temperature = _check_temperature(temperature)
  _core.check_choice("reduction", reduction, REDUCTIONS)
  _core.check_choice("kind", kind, KINDS)
  span_mask = jnp.asarray(span_mask)
  mask = _core.mask_to_bool(span_mask)
  weights = _core.mask_to_weights(span_mask)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
  tok = _distill_rows(jnp.asarray(student_logits), teacher, mask, temperature, kind)
  return jax.vmap(lambda *a: reduce_span(*a, reduction))(tok, weights, mask)


def segment_distill_cross_entropy(
  student_logits: Float[Array, "B T V"],
  teacher_logits: Float[Array, "B T V"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[ArrayLike, "B T"],
  *,
  num_segments: int,
  temperature: float = 1.0,
  reduction: str = "sum",
  kind: str = "cross_entropy",
) -> Float[Array, "B S"]:
  """Per-sample distillation losses of packed rows: one value per segment.

  As :func:`jaxnll.segment_nll` is to :func:`jaxnll.sequence_nll`: ``out[b, s - 1]`` is
  :func:`distill_cross_entropy` restricted to segment ``s`` of row ``b`` (segment id ``0`` is
  padding; ``0`` for an absent segment or an empty span), with one pass over the logits.

  Returns:
    float32 ``[B, num_segments]``.
  """
  student_logits, teacher_logits, span_mask = _check_args(student_logits, teacher_logits, span_mask)
  temperature = _check_temperature(temperature)
  _core.check_choice("reduction", reduction, REDUCTIONS)
  _core.check_choice("kind", kind, KINDS)
  segment_ids = _core.as_array("segment_ids", segment_ids)
  _core.check_segments(segment_ids, num_segments, "span_mask", span_mask)
  span_mask, segment_ids = jnp.asarray(span_mask), jnp.asarray(segment_ids)
  mask = _core.mask_to_bool(span_mask) & (segment_ids != 0)
  weights = _core.mask_to_weights(span_mask)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
  tok = _distill_rows(jnp.asarray(student_logits), teacher, mask, temperature, kind)
  return reduce_segments(tok, weights, mask, segment_ids, num_segments, reduction)
