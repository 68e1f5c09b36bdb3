"""Plain-``jnp`` references of every loss: obviously correct, not fast, not lean.

Tests and benchmarks compare the fast paths against these.  They materialise the full
float32 log-softmax and use masks by multiplication-free selects, nothing more.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core
from jaxnll._core import F32


def _plain_nll(z, targets, label_smoothing, z_loss):
  """Cross-entropy of float32 scored logits ``z`` through a full log-softmax; NaN where the
  target is outside ``[0, V)``."""
  vocab = z.shape[-1]
  logp = jax.nn.log_softmax(z, axis=-1)
  onehot = jax.nn.one_hot(targets, vocab, dtype=F32)
  labels = (1.0 - label_smoothing) * onehot + label_smoothing / vocab
  loss = -jnp.sum(labels * logp, axis=-1)
  if z_loss:
    loss = loss + z_loss * jnp.square(jax.nn.logsumexp(z, axis=-1))
  return jnp.where(_in_range(targets, vocab), loss, jnp.nan)


def _in_range(targets, vocab):
  return (targets >= 0) & (targets < vocab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loud_nll(z, targets, label_smoothing, z_loss):
  return _plain_nll(z, targets, label_smoothing, z_loss)


def _loud_nll_fwd(z, targets, label_smoothing, z_loss):
  return _plain_nll(z, targets, label_smoothing, z_loss), (z, targets)


def _loud_nll_bwd(label_smoothing, z_loss, res, ct):
  """Plain autodiff, then the explicit gates: a row whose cotangent is exactly 0 sends back
  nothing (another sample's loss: nothing leaks, even from NaN logits), and a bad target's
  row is NaN (its loss is) — plain autodiff alone sends back the finite softmax of a token
  that does not exist."""
  z, targets = res
  _, vjp = jax.vjp(lambda z: _plain_nll(z, targets, label_smoothing, z_loss), z)
  (g,) = vjp(jnp.where(_in_range(targets, z.shape[-1]), ct, 0.0))
  bad = ~_in_range(targets, z.shape[-1]) & (ct != 0)
  g = jnp.where((ct != 0)[..., None], g, 0.0)  # not 0 · NaN from a NaN row's softmax
  return jnp.where(bad[..., None], jnp.nan, g), None


_loud_nll.defvjp(_loud_nll_fwd, _loud_nll_bwd)


def token_nll(
  logits: Float[Array, "... V"],
  targets: Int[Array, "..."],
  *,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
) -> Float[Array, "..."]:
  """Per-position cross-entropy through a full float32 log-softmax (NaN in value and gradient
  at a target outside ``[0, V)``)."""
  z = logits.astype(F32)
  if logit_softcap is not None:
    z = logit_softcap * jnp.tanh(z / logit_softcap)
  # int64 NumPy ids range-checked before JAX narrows them (no 2**32 + 3 -> 3).
  targets = _core.int32_ids(targets)
  return _loud_nll(z, targets, float(label_smoothing), float(z_loss))


def _reduce(tok, span_mask, reduction, dtype=F32):
  w = span_mask.astype(dtype)
  inside = span_mask != 0
  total = jnp.sum(jnp.where(inside, tok * w, 0.0), axis=-1)
  if reduction == "sum":
    return total
  count = jnp.sum(w, axis=-1)
  return jnp.where(count != 0, total / jnp.where(count != 0, count, 1.0), 0.0)


def sequence_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, " B"]:
  """Sum (or mean) of the reference token losses over the span."""
  inside = span_mask != 0
  safe = jnp.where(inside[..., None], logits, 0)  # keep masked NaN out of the softmax
  tok = token_nll(safe, jnp.where(inside, _core.int32_ids(targets), 0), **token_opts)
  return _reduce(tok, span_mask, reduction)


def selective_sequence_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  valid_mask: Bool[Array, "B T"] | Float[Array, "B T"] | None = None,
  *,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, " B"]:
  """Value over ``valid_mask``, gradient of the span-only loss (via ``stop_gradient``)."""
  if valid_mask is None:
    valid_mask = jnp.ones(targets.shape, bool)
  span_value = sequence_nll(logits, targets, span_mask, reduction=reduction, **token_opts)
  valid_value = sequence_nll(
    jax.lax.stop_gradient(logits), targets, valid_mask, reduction=reduction, **token_opts
  )
  return span_value + jax.lax.stop_gradient(valid_value - span_value)


def segment_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[Array, "B T"],
  *,
  num_segments: int,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, "B S"]:
  """One :func:`sequence_nll` per segment id, stacked."""
  out = []
  for s in range(1, num_segments + 1):
    mask = jnp.where(segment_ids == s, span_mask, jnp.zeros((), span_mask.dtype))
    out.append(sequence_nll(logits, targets, mask, reduction=reduction, **token_opts))
  return jnp.stack(out, axis=-1)


def linear_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  bias: Float[Array, " V"] | None = None,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, " B"]:
  """``sequence_nll(hidden @ weight + bias, ...)`` with the logits materialised in f32."""
  logits = jnp.einsum("btd,dv->btv", hidden, weight, preferred_element_type=F32)
  if bias is not None:
    logits = logits + bias.astype(F32)
  return sequence_nll(logits, targets, span_mask, reduction=reduction, **token_opts)


def distill_cross_entropy(
  student_logits: Float[Array, "B T V"],
  teacher_logits: Float[Array, "B T V"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  temperature: float = 1.0,
  reduction: str = "sum",
  kind: str = "cross_entropy",
) -> Float[Array, " B"]:
  """``-Σ_v softmax(teacher/τ) log_softmax(student/τ)`` (or the KL) through full f32 softmaxes."""
  inside = (span_mask != 0)[..., None]
  s = jnp.where(inside, student_logits.astype(F32), 0.0) / temperature
  t = jnp.where(inside, jax.lax.stop_gradient(teacher_logits).astype(F32), 0.0) / temperature
  p = jax.nn.softmax(t, axis=-1)
  terms = jax.nn.log_softmax(s, axis=-1)
  if kind == "kl":
    terms = terms - jax.nn.log_softmax(t, axis=-1)
  tok = -jnp.sum(jnp.where(p > 0, p * terms, 0.0), axis=-1)
  return _reduce(tok, span_mask, reduction)


def _pairs_valid(chosen_count, rejected_count, like):
  if chosen_count is None:
    return jnp.ones(jnp.shape(like), bool)
  return (chosen_count > 0) & (rejected_count > 0)


def dpo_loss(
  chosen_nll: Float[Array, " P"],
  rejected_nll: Float[Array, " P"],
  ref_chosen_nll: Float[Array, " P"],
  ref_rejected_nll: Float[Array, " P"],
  *,
  beta: float = 0.1,
  kind: str = "sigmoid",
  label_smoothing: float = 0.0,
  chosen_count: Float[Array, " P"] | None = None,
  rejected_count: Float[Array, " P"] | None = None,
) -> Float[Array, " P"]:
  """DPO / cDPO / IPO / hinge straight from the formulas (``log σ`` as ``log(sigmoid)``)."""
  valid = _pairs_valid(chosen_count, rejected_count, chosen_nll)
  pick = lambda x: jnp.where(valid, jnp.asarray(x, F32), 0.0)
  log_ratio_w = pick(jax.lax.stop_gradient(ref_chosen_nll)) - pick(chosen_nll)
  log_ratio_l = pick(jax.lax.stop_gradient(ref_rejected_nll)) - pick(rejected_nll)
  h = beta * (log_ratio_w - log_ratio_l)
  if kind == "sigmoid":
    eps = label_smoothing
    loss = -(1 - eps) * jnp.log(jax.nn.sigmoid(h)) - eps * jnp.log(jax.nn.sigmoid(-h))
  elif kind == "ipo":
    loss = (log_ratio_w - log_ratio_l - 1 / (2 * beta)) ** 2
  else:
    loss = jnp.maximum(0.0, 1.0 - h)
  return jnp.where(valid, loss, 0.0)


def simpo_loss(chosen_nll, chosen_count, rejected_nll, rejected_count, *, beta=2.0, gamma=0.5):
  """SimPO: ``-log σ(β (nll_l/|y_l| - nll_w/|y_w|) - γ)``."""
  valid = _pairs_valid(chosen_count, rejected_count, chosen_nll)
  mean = lambda s, n: jnp.where(valid, s, 0.0) / jnp.where(valid, n, 1.0)
  z = beta * (mean(rejected_nll, rejected_count) - mean(chosen_nll, chosen_count)) - gamma
  return jnp.where(valid, -jnp.log(jax.nn.sigmoid(z)), 0.0)


def orpo_loss(chosen_nll, chosen_count, rejected_nll, rejected_count, *, beta=0.1):
  """ORPO: ``nll_w/|y_w| - β log σ(log odds_w - log odds_l)``, ``log odds = ℓ - log(1 - e^ℓ)``."""
  valid = _pairs_valid(chosen_count, rejected_count, chosen_nll)
  mean = lambda s, n: jnp.where(valid, s, 0.0) / jnp.where(valid, n, 1.0)
  ell_w, ell_l = -mean(chosen_nll, chosen_count), -mean(rejected_nll, rejected_count)
  odds = lambda ell: ell - jnp.log(1.0 - jnp.exp(ell))
  loss = -ell_w - beta * jnp.log(jax.nn.sigmoid(odds(ell_w) - odds(ell_l)))
  return jnp.where(valid, loss, 0.0)


def ppo_clip_loss(
  token_nll: Float[Array, "B T"],
  old_token_nll: Float[Array, "B T"],
  advantages: Float[Array, " B"] | Float[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  ref_token_nll: Float[Array, "B T"] | None = None,
  kl_coef: float = 0.0,
) -> Float[Array, " B"]:
  """The clipped surrogate written in log-probabilities, ``log π = -nll``.

  ``ratio = π / π_old``; the KL term is k3 with ``ρ = π_ref / π`` (samples from ``π``).
  """
  inside = span_mask != 0
  w = span_mask.astype(F32)
  logp = jnp.where(inside, -token_nll.astype(F32), 0.0)
  logp_old = jnp.where(inside, -jax.lax.stop_gradient(old_token_nll).astype(F32), 0.0)
  adv = jax.lax.stop_gradient(advantages).astype(F32)
  adv = jnp.where(inside, adv[:, None] if adv.ndim == 1 else adv, 0.0)
  ratio = jnp.exp(logp - logp_old)
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_low, 1 + clip_high) * adv)
  loss = -surrogate
  if ref_token_nll is not None and kl_coef:
    logp_ref = jnp.where(inside, -jax.lax.stop_gradient(ref_token_nll).astype(F32), 0.0)
    rho = jnp.exp(logp_ref - logp)
    loss = loss + kl_coef * (rho - 1.0 - jnp.log(rho))
  return jnp.sum(jnp.where(inside, loss * w, 0.0), axis=-1)


def group_advantages(
  rewards: Float[Array, " N"], group_size: int, *, normalize_std: bool = True
) -> Float[Array, " N"]:
  """``(r - group mean) / group std`` by a Python loop over groups (0 for a constant group)."""
  out = []
  r = rewards.astype(F32)
  for g in range(r.shape[0] // group_size):
    x = r[g * group_size : (g + 1) * group_size]
    same = jnp.all(x == x[0])
    a = x - jnp.mean(x)
    if normalize_std:
      a = a / jnp.where(same, 1.0, jnp.std(x))
    out.append(jnp.where(same, 0.0, a))
  return jnp.concatenate(out)


# ----------------------------------------------------------------------------- distillation
#
# The four divergences of :func:`jaxnll.fused.linear_distill_loss` straight from their
# definitions, through full log-softmaxes.  They compute in ``result_type(float32, logits)``:
# float64 inputs under ``jax.enable_x64`` give a float64 reference.

DISTILL_KINDS = ("ce", "kl", "reverse_kl", "jsd")


def distill_divergence(
  student_logits: Float[Array, "B T V"],
  teacher_logits: Float[Array, "B T V"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  kind: str = "ce",
  temperature: float = 1.0,
  beta: float = 0.5,
  reduction: str = "sum",
) -> Float[Array, " B"]:
  """Per-sample sum (or mean) over the span of a teacher-student divergence, plain jnp.

  Between ``p_t = softmax(teacher/τ)`` (under ``stop_gradient``) and
  ``p_s = softmax(student/τ)``: ``"ce"`` ``-Σ p_t log p_s``, ``"kl"`` ``KL(p_t‖p_s)``,
  ``"reverse_kl"`` ``KL(p_s‖p_t)``, ``"jsd"`` ``β·KL(p_t‖m) + (1-β)·KL(p_s‖m)`` with
  ``m = β·p_t + (1-β)·p_s``."""
  dtype = jnp.result_type(F32, student_logits.dtype, teacher_logits.dtype)
  inside = (span_mask != 0)[..., None]
  s = jnp.where(inside, student_logits.astype(dtype), 0.0) / temperature
  t = jnp.where(inside, jax.lax.stop_gradient(teacher_logits).astype(dtype), 0.0) / temperature
  log_ps, log_pt = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
  ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)

  def kl(p, log_p, log_q):  # Σ p (log p - log q), 0 · anything = 0
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)

  if kind == "ce":
    tok = -jnp.sum(jnp.where(pt > 0, pt * log_ps, 0.0), axis=-1)
  elif kind == "kl":
    tok = kl(pt, log_pt, log_ps)
  elif kind == "reverse_kl":
    tok = kl(ps, log_ps, log_pt)
  elif kind == "jsd":
    log_m = jnp.log(beta * pt + (1.0 - beta) * ps)
    tok = beta * kl(pt, log_pt, log_m) + (1.0 - beta) * kl(ps, log_ps, log_m)
  else:
    raise ValueError(f"kind must be one of {DISTILL_KINDS}, got {kind!r}")
  return _reduce(tok, span_mask, reduction, dtype)


def linear_distill_loss(
  student_hidden: Float[Array, "B T Ds"],
  student_weight: Float[Array, "Ds V"] | Float[Array, "V Ds"],
  teacher_hidden: Float[Array, "B T Dt"],
  teacher_weight: Float[Array, "Dt V"] | Float[Array, "V Dt"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  student_bias: Float[Array, " V"] | None = None,
  teacher_bias: Float[Array, " V"] | None = None,
  student_weight_layout: str = "dv",
  teacher_weight_layout: str = "dv",
  logit_softcap: float | None = None,
  **options,
) -> Float[Array, " B"]:
  """:func:`distill_divergence` of both heads' materialised logits, plain jnp.

  ``"vd"`` layouts are ``[V, D]`` tables; the logits are soft-capped ``c·tanh(x/c)`` when
  ``logit_softcap`` is set."""

  def logits(h, w, b, layout):
    dtype = jnp.result_type(F32, h.dtype, w.dtype)
    spec = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"
    z = jnp.einsum(spec, h.astype(dtype), w.astype(dtype))
    z = z if b is None else z + b.astype(dtype)
    return z if logit_softcap is None else logit_softcap * jnp.tanh(z / logit_softcap)

  inside = (span_mask != 0)[..., None]
  hs = jnp.where(inside, student_hidden, jnp.zeros((), student_hidden.dtype))
  ht = jnp.where(inside, teacher_hidden, jnp.zeros((), teacher_hidden.dtype))
  zs = logits(hs, student_weight, student_bias, student_weight_layout)
  zt = logits(ht, teacher_weight, teacher_bias, teacher_weight_layout)
  return distill_divergence(zs, zt, span_mask, **options)
