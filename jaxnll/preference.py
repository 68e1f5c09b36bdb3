"""Preference losses per pair — DPO, IPO, hinge, SimPO, ORPO — from per-sample NLL sums.

Dimension letter: ``P`` pairs.

Preference optimisation compares the log-likelihood of a *chosen* answer ``y_w`` and a
*rejected* answer ``y_l`` to the same prompt ``x``.  Every loss here is a few lines of float32
math on the per-sample sums that :func:`jaxnll.sequence_nll` or
:func:`jaxnll.linear_sequence_nll` return (``log π(y | x) = -nll``) and, for the length
normalised ones, the target-token counts; so they compose with every entry of the package,
the fused, span-compacted and vocabulary-parallel ones included, and their gradient reaches
the model through those entries' per-sample cotangents.

With ``π`` the policy, ``π_ref`` a frozen reference model and ``nll`` / ``ref_nll`` their
per-sample NLL sums, the DPO family scores the *implicit reward margin*

.. math::

   h = \\beta \\big[(\\mathrm{ref\\_nll}_w - \\mathrm{nll}_w)
       - (\\mathrm{ref\\_nll}_l - \\mathrm{nll}_l)\\big]
     = \\beta \\Big[\\log \\frac{π(y_w|x)}{π_{ref}(y_w|x)}
       - \\log \\frac{π(y_l|x)}{π_{ref}(y_l|x)}\\Big].

Conventions: inputs are float ``[P]`` (any floating dtype; the math is float32); results are
float32 ``[P]`` (one loss per pair: reduce them yourself, e.g. a mean over the non-empty
pairs, which stays exact under accumulation when you add sums and counts).  A pair whose
chosen or rejected span is empty (its count is ``0``) costs exactly ``0`` and gets exactly
zero, finite gradients, whatever its NLL entries hold (selects, never masks by
multiplication).  A negative, NaN or infinite count is broken input, not an empty span: that
pair's loss and its gradient are NaN.  The reference model's NLLs are data: they are under
``stop_gradient``.  Option values outside their domain raise ``ValueError`` at trace time (a
value of the wrong type ``TypeError``), naming the option.

References: R. Rafailov et al., *Direct Preference Optimization: Your Language Model is
Secretly a Reward Model* (2023); E. Mitchell, *A note on DPO with noisy preferences &
relationship to IPO* (2023, conservative DPO); M. G. Azar et al., *A General Theoretical
Paradigm to Understand Learning from Human Preferences* (2023, IPO); Y. Zhao et al., *SLiC-HF*
(2023, the hinge form); Y. Meng, M. Xia and D. Chen, *SimPO: Simple Preference Optimization
with a Reference-Free Reward* (2024); J. Hong, N. Lee and J. Thorne, *ORPO: Monolithic
Preference Optimization without Reference Model* (2024).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Bool, Float

from jaxnll import _core
from jaxnll._core import F32

DPO_KINDS = ("sigmoid", "ipo", "hinge")
_LOG_HALF = -math.log(2.0)
# ORPO's mean log-probability is kept at or below this (log(1 - e^ℓ) is -inf at ℓ = 0).
_MAX_MEAN_LOGP = -(2.0**-100)

# ----------------------------------------------------------------------------- helpers


def _count(count) -> jax.Array | None:
  """A token count as float32, NaN where it is negative, NaN or infinite: such a count is
  broken input, never an empty span — the pair's loss (and its gradient) is NaN, loud."""
  if count is None:
    return None
  c = jnp.asarray(count).astype(F32)
  return jnp.where((c >= 0) & jnp.isfinite(c), c, jnp.nan)


def _valid(chosen_count, rejected_count, shape) -> jax.Array:
  """Pairs that are not empty (all, without counts): only a count of exactly 0 empties a pair.
  A NaN count (see :func:`_count`) keeps its pair, so that its NaN reaches the loss."""
  if chosen_count is None:
    return jnp.ones(shape, bool)
  return (jnp.asarray(chosen_count) != 0) & (jnp.asarray(rejected_count) != 0)


def _broken(chosen_count, rejected_count) -> jax.Array | float:
  """``NaN`` for pairs with a broken count (:func:`_count`), 1 elsewhere: a factor of a loss's
  inner value, it makes that pair's loss and its gradient NaN (an added NaN would leave the
  gradient of a piecewise-linear loss finite)."""
  if chosen_count is None:
    return 1.0
  bad = jnp.isnan(chosen_count) | jnp.isnan(rejected_count)
  return jnp.where(bad, jnp.nan, 1.0)


def _safe(x, valid, fill=0.0) -> jax.Array:
  """``x`` in float32 where the pair is valid, ``fill`` elsewhere (the inner "where")."""
  return jnp.where(valid, jnp.asarray(x).astype(F32), fill)


def _mean(total, count, valid) -> jax.Array:
  """``total / count`` for valid pairs (their count is > 0), 0 elsewhere."""
  return jnp.where(valid, total / _safe(count, valid, 1.0), 0.0)


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - e^x)`` for ``x < 0``, accurate everywhere (Mächler, 2012).

  ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below ``-log 2``; each branch gets a safe
  argument so the unused one has a finite gradient.
  """
  near = x > _LOG_HALF
  a = jnp.log(-jnp.expm1(jnp.where(near, x, -1.0)))
  b = jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x)))
  return jnp.where(near, a, b)


def reward_margin(
  chosen_nll: Float[ArrayLike, " P"],
  rejected_nll: Float[ArrayLike, " P"],
  ref_chosen_nll: Float[ArrayLike, " P"],
  ref_rejected_nll: Float[ArrayLike, " P"],
  *,
  beta: float = 0.1,
) -> Float[ArrayLike, " P"]:
  """The implicit reward margin ``h`` of the module docstring (float32 ``[P]``), the
  reference NLLs under ``stop_gradient``."""
  sg = jax.lax.stop_gradient
  c, r = jnp.asarray(chosen_nll).astype(F32), jnp.asarray(rejected_nll).astype(F32)
  rc, rr = (
    sg(jnp.asarray(ref_chosen_nll).astype(F32)),
    sg(jnp.asarray(ref_rejected_nll).astype(F32)),
  )
  return beta * ((rc - c) - (rr - r))


# ----------------------------------------------------------------------------- losses


def dpo_loss(
  chosen_nll: Float[ArrayLike, " P"],
  rejected_nll: Float[ArrayLike, " P"],
  ref_chosen_nll: Float[ArrayLike, " P"],
  ref_rejected_nll: Float[ArrayLike, " P"],
  *,
  beta: float = 0.1,
  kind: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
  label_smoothing: float = 0.0,
  chosen_count: Float[ArrayLike, " P"] | None = None,
  rejected_count: Float[ArrayLike, " P"] | None = None,
) -> Float[ArrayLike, " P"]:
  """Direct preference optimisation loss per pair (DPO, conservative DPO, IPO, hinge).

  With the implicit reward margin ``h`` (module docstring):

  .. math::

     \\text{sigmoid:}\\ -(1-ε)\\log σ(h) - ε \\log σ(-h), \\qquad
     \\text{ipo:}\\ \\Big(\\frac{h}{β} - \\frac{1}{2β}\\Big)^2, \\qquad
     \\text{hinge:}\\ \\max(0, 1 - h).

  ``ε = label_smoothing`` is conservative DPO (the preference label is wrong with probability
  ``ε``); ``ε = 0`` is DPO.  IPO regresses the log-likelihood-ratio gap to ``1 / (2β)``
  instead of pushing it to infinity.  ``log σ`` is computed as ``jax.nn.log_sigmoid`` (no
  overflow for large ``|h|``).  The reference NLLs are under ``stop_gradient``.

  Args:
    chosen_nll: ``[P]`` policy ``-log π(y_w | x)`` per pair (a per-sample NLL sum).
    rejected_nll: ``[P]`` policy ``-log π(y_l | x)``.
    ref_chosen_nll: ``[P]`` reference ``-log π_ref(y_w | x)`` (no gradient).
    ref_rejected_nll: ``[P]`` reference ``-log π_ref(y_l | x)`` (no gradient).
    beta: ``β > 0``, the strength of the KL constraint (the IPO ``τ``).
    kind: ``"sigmoid"`` (DPO), ``"ipo"`` or ``"hinge"``.
    label_smoothing: ``ε`` in ``[0, 0.5)`` (sigmoid only).
    chosen_count: optional ``[P]`` target-token counts of the chosen answers; with
      ``rejected_count``, a pair with an empty span costs exactly 0 (zero gradients).
    rejected_count: optional ``[P]`` target-token counts of the rejected answers.

  Returns:
    float32 ``[P]``, one loss per pair.

  Examples:
    Policy = reference: ``h = 0`` and the DPO loss is ``log 2``.

    >>> import jax.numpy as jnp
    >>> nll = jnp.array([3.0, 5.0])
    >>> [round(float(x), 4) for x in dpo_loss(nll, nll + 1, nll, nll + 1)]
    [0.6931, 0.6931]
    >>> float(dpo_loss(jnp.array([2.0]), jnp.array([6.0]), jnp.array([3.0]),
    ...                jnp.array([5.0]), beta=0.5, kind="hinge")[0])  # h = 0.5 (1 + 1)
    0.0

  References: Rafailov et al. (2023); Mitchell (2023); Azar et al. (2023); Zhao et al. (2023).
  """
  _core.check_choice("kind", kind, DPO_KINDS)
  beta = _core.check_float_option("beta", beta, low=0.0, low_open=True)
  label_smoothing = _core.check_float_option(
    "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True
  )
  if label_smoothing and kind != "sigmoid":
    raise ValueError(f"label_smoothing applies to kind 'sigmoid' only, got kind {kind!r}")
  _core.check_together("chosen_count", chosen_count, "rejected_count", rejected_count)
  shape = _core.check_per_sample(
    "one value per pair",
    chosen_nll=chosen_nll,
    rejected_nll=rejected_nll,
    ref_chosen_nll=ref_chosen_nll,
    ref_rejected_nll=ref_rejected_nll,
    chosen_count=chosen_count,
    rejected_count=rejected_count,
  )
  chosen_count, rejected_count = _count(chosen_count), _count(rejected_count)
  valid = _valid(chosen_count, rejected_count, shape)
  sg = jax.lax.stop_gradient
  h = reward_margin(
    _safe(chosen_nll, valid),
    _safe(rejected_nll, valid),
    _safe(sg(ref_chosen_nll), valid),
    _safe(sg(ref_rejected_nll), valid),
    beta=beta,
  )
  h = h * _broken(chosen_count, rejected_count)
  if kind == "sigmoid":
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h)
    if label_smoothing:
      loss = loss - label_smoothing * jax.nn.log_sigmoid(-h)
  elif kind == "ipo":
    loss = jnp.square(h / beta - 1.0 / (2.0 * beta))
  else:
    loss = jnp.maximum(0.0, 1.0 - h)
  return jnp.where(valid, loss, 0.0)


def simpo_loss(
  chosen_nll: Float[ArrayLike, " P"],
  chosen_count: Float[ArrayLike, " P"],
  rejected_nll: Float[ArrayLike, " P"],
  rejected_count: Float[ArrayLike, " P"],
  *,
  beta: float = 2.0,
  gamma: float = 0.5,
) -> Float[ArrayLike, " P"]:
  """SimPO loss per pair: a reference-free, length-normalised reward with a target margin.

  .. math::

     -\\log σ\\Big(β \\Big(\\frac{\\mathrm{nll}_l}{|y_l|} - \\frac{\\mathrm{nll}_w}{|y_w|}\\Big)
       - γ\\Big),

  i.e. the reward of an answer is ``β`` times its mean log-probability per target token, and
  the chosen one must beat the rejected one by at least ``γ``.

  Args:
    chosen_nll: ``[P]`` policy ``-log π(y_w | x)`` (per-sample NLL sum).
    chosen_count: ``[P]`` target-token count ``|y_w|`` (weight sum); 0 makes the pair cost 0.
    rejected_nll: ``[P]`` policy ``-log π(y_l | x)``.
    rejected_count: ``[P]`` target-token count ``|y_l|``.
    beta: ``β > 0``, the reward scale.
    gamma: ``γ``, the target reward margin (finite, any sign; the paper uses 0.5-1.6).

  Returns:
    float32 ``[P]``, one loss per pair.

  Examples:
    Equal mean NLLs and ``γ = 0``: ``-log σ(0) = log 2``; an empty span costs 0.

    >>> import jax.numpy as jnp
    >>> loss = simpo_loss(jnp.array([4.0, 1.0]), jnp.array([2.0, 0.0]),
    ...                   jnp.array([6.0, 9.0]), jnp.array([3.0, 3.0]), gamma=0.0)
    >>> [round(float(x), 4) for x in loss]
    [0.6931, 0.0]

  Reference: Meng, Xia and Chen (2024).
  """
  beta = _core.check_float_option("beta", beta, low=0.0, low_open=True)
  gamma = _core.check_float_option("gamma", gamma)
  shape = _core.check_per_sample(
    "one value per pair",
    chosen_nll=chosen_nll,
    chosen_count=chosen_count,
    rejected_nll=rejected_nll,
    rejected_count=rejected_count,
  )
  chosen_count, rejected_count = _count(chosen_count), _count(rejected_count)
  valid = _valid(chosen_count, rejected_count, shape)
  chosen = _mean(_safe(chosen_nll, valid), chosen_count, valid)
  rejected = _mean(_safe(rejected_nll, valid), rejected_count, valid)
  loss = -jax.nn.log_sigmoid(beta * (rejected - chosen) - gamma)
  return jnp.where(valid, loss, 0.0)


#: ``nll_mean=`` of :func:`jaxnll.orpo_loss`.
ORPO_NLL_MEANS = ("pair", "tokens")


def orpo_loss(
  chosen_nll: Float[ArrayLike, " P"],
  chosen_count: Float[ArrayLike, " P"],
  rejected_nll: Float[ArrayLike, " P"],
  rejected_count: Float[ArrayLike, " P"],
  *,
  beta: float = 0.1,
  nll_mean: Literal["pair", "tokens"] = "pair",
  return_terms: bool = False,
) -> Float[ArrayLike, " P"] | tuple[Float[ArrayLike, " P"], dict[str, Float[ArrayLike, " P"]]]:
  """ORPO loss per pair: the chosen answer's NLL plus an odds-ratio preference term.

  .. math::

     \\mathrm{NLL}_p - β \\log σ\\big(\\log \\mathrm{odds}_w - \\log
     \\mathrm{odds}_l\\big), \\qquad \\log \\mathrm{odds} = ℓ - \\log(1 - e^{ℓ}), \\quad
     ℓ = -\\frac{\\mathrm{nll}}{|y|},

  with the NLL term, by ``nll_mean``:

  * ``"pair"`` (default): ``NLL_p = nll_w / |y_w|``, each pair's own token mean — the mean
    over pairs is a mean of per-pair means (every chosen answer weighs the same, whatever its
    length; the paper's ``L_SFT`` per example).
  * ``"tokens"``: one token mean over every chosen token of the pairs of this call,
    ``Σ nll_w / Σ |y_w|`` (non-empty pairs), as TRL's ``ORPOTrainer`` and Liger's fused ORPO
    compute it (a long chosen answer weighs more).  So that the mean of the per-pair losses
    over the ``n`` non-empty pairs is exactly that token mean plus the mean odds-ratio term,
    pair ``p`` holds the share ``NLL_p = n · nll_w,p / Σ |y_w|``.  The normalisation is over
    this call's pairs: with micro-batches or devices, add ``Σ nll_w`` and ``Σ |y_w|`` across
    them yourself (the ``"pair"`` convention needs nothing of the kind).

  The two agree when every chosen answer has the same length and otherwise differ by the
  length weighting (about 1e-3 relative on typical batches).  The odds-ratio term is the same
  in both: ``ℓ`` is each answer's mean log-probability per target token (``≤ 0``).
  ``log(1 - e^ℓ)`` is computed as ``log(-expm1(ℓ))`` near 0 and ``log1p(-exp(ℓ))`` below
  ``-log 2`` (accurate and finite for every ``ℓ < 0``); ``ℓ`` is kept at or below ``-2^-100``
  so that an answer with probability 1 in float32 gives a large finite log-odds, not
  ``inf - inf``.

  Args:
    chosen_nll: ``[P]`` policy ``-log π(y_w | x)`` (per-sample NLL sum).
    chosen_count: ``[P]`` target-token count ``|y_w|``; 0 makes the pair cost 0.
    rejected_nll: ``[P]`` policy ``-log π(y_l | x)``.
    rejected_count: ``[P]`` target-token count ``|y_l|``.
    beta: ``β > 0``, the weight of the odds-ratio term (the paper's ``λ``).
    nll_mean: ``"pair"`` or ``"tokens"`` (above).
    return_terms: also return the terms, as ``(loss, terms)`` with ``terms["nll"]`` the NLL
      term ``NLL_p``, ``terms["odds_ratio"]`` the odds-ratio term ``-β log σ(·)`` (their sum
      is ``loss``) and ``terms["log_odds_ratio"]`` ``log odds_w - log odds_l`` (what TRL
      logs), each float32 ``[P]`` and 0 for an empty pair.

  Returns:
    float32 ``[P]``, one loss per pair (or ``(loss, terms)`` with ``return_terms``).

  Examples:
    Mean log-probabilities ``log 0.5`` for both answers: log-odds 0 and 0, so the loss is
    ``log 2 + β log 2``.

    >>> import jax.numpy as jnp, math
    >>> n = jnp.array([2 * math.log(2.0)])
    >>> round(float(orpo_loss(n, jnp.array([2.0]), n, jnp.array([2.0]), beta=0.1)[0]), 5)
    0.76246
    >>> loss, terms = orpo_loss(n, jnp.array([2.0]), n, jnp.array([2.0]), return_terms=True)
    >>> round(float(terms["nll"][0]), 5), round(float(terms["odds_ratio"][0]), 5)
    (0.69315, 0.06931)

  Reference: Hong, Lee and Thorne (2024).
  """
  beta = _core.check_float_option("beta", beta, low=0.0, low_open=True)
  _core.check_choice("nll_mean", nll_mean, ORPO_NLL_MEANS)
  return_terms = _core.check_bool("return_terms", return_terms)
  shape = _core.check_per_sample(
    "one value per pair",
    chosen_nll=chosen_nll,
    chosen_count=chosen_count,
    rejected_nll=rejected_nll,
    rejected_count=rejected_count,
  )
  chosen_count, rejected_count = _count(chosen_count), _count(rejected_count)
  valid = _valid(chosen_count, rejected_count, shape)
  chosen = _mean(_safe(chosen_nll, valid), chosen_count, valid)
  rejected = _mean(_safe(rejected_nll, valid), rejected_count, valid)

  def log_odds(mean_nll):
    ell = jnp.minimum(-mean_nll, _MAX_MEAN_LOGP)
    return ell - _log1mexp(ell)

  log_ratio = log_odds(chosen) - log_odds(rejected)
  odds_term = -beta * jax.nn.log_sigmoid(log_ratio)
  if nll_mean == "pair":
    nll = chosen
  else:
    pairs = jnp.sum(valid, dtype=F32)
    tokens = jnp.sum(_safe(chosen_count, valid))
    share = _core.safe_divide(pairs, tokens)
    nll = _safe(chosen_nll, valid) * share
  loss = jnp.where(valid, nll + odds_term, 0.0)
  if not return_terms:
    return loss
  terms = {
    "nll": jnp.where(valid, nll, 0.0),
    "odds_ratio": jnp.where(valid, odds_term, 0.0),
    "log_odds_ratio": jnp.where(valid, log_ratio, 0.0),
  }
  return loss, terms


# ----------------------------------------------------------------------------- diagnostics


def preference_metrics(
  chosen_nll: Float[ArrayLike, " P"],
  rejected_nll: Float[ArrayLike, " P"],
  ref_chosen_nll: Float[ArrayLike, " P"] | None = None,
  ref_rejected_nll: Float[ArrayLike, " P"] | None = None,
  *,
  beta: float = 0.1,
  chosen_count: Float[ArrayLike, " P"] | None = None,
  rejected_count: Float[ArrayLike, " P"] | None = None,
  length_normalize: bool = False,
) -> dict[str, Float[ArrayLike, " P"] | Bool[ArrayLike, " P"]]:
  """Per-pair diagnostics: implicit rewards, their margin, and whether the pair is ranked right.

  .. math::

     r_w = β\\,(\\mathrm{ref\\_nll}_w - \\mathrm{nll}_w), \\quad
     r_l = β\\,(\\mathrm{ref\\_nll}_l - \\mathrm{nll}_l), \\quad
     \\mathrm{margin} = r_w - r_l, \\quad \\mathrm{ranked\\_right} = \\mathrm{margin} > 0.

  Without a reference (SimPO, ORPO) ``ref_nll = 0``: the reward is ``β log π(y | x)``; with
  ``length_normalize`` every NLL (the reference's too) is first divided by its token count
  (SimPO's reward, ``β`` times the mean log-probability; for ORPO, whose log-odds increase
  with the mean log-probability, ``ranked_right`` is then exactly "the odds ratio favours the
  chosen answer").  All values are under ``stop_gradient``; pairs with an empty span (counts
  given) hold 0 / False.

  Args:
    chosen_nll, rejected_nll: ``[P]`` policy NLL sums.
    ref_chosen_nll, ref_rejected_nll: ``[P]`` reference NLL sums, or both None.
    beta: ``β > 0`` of the rewards.
    chosen_count, rejected_count: ``[P]`` token counts (needed by ``length_normalize``).
    length_normalize: rewards from per-token means.

  Returns:
    ``{"chosen_reward", "rejected_reward", "margin"}`` float32 ``[P]``, ``"ranked_right"`` and
    ``"valid"`` (non-empty pairs) bool ``[P]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> m = preference_metrics(jnp.array([2.0]), jnp.array([6.0]),
    ...                        jnp.array([3.0]), jnp.array([5.0]), beta=0.5)
    >>> [float(m[k][0]) for k in ("chosen_reward", "rejected_reward", "margin")]
    [0.5, -0.5, 1.0]
    >>> bool(m["ranked_right"][0])
    True
  """
  beta = _core.check_float_option("beta", beta, low=0.0, low_open=True)
  _core.check_together("chosen_count", chosen_count, "rejected_count", rejected_count)
  _core.check_together("ref_chosen_nll", ref_chosen_nll, "ref_rejected_nll", ref_rejected_nll)
  length_normalize = _core.check_bool("length_normalize", length_normalize)
  if length_normalize and chosen_count is None:
    raise ValueError("length_normalize=True needs chosen_count and rejected_count")
  shape = _core.check_per_sample(
    "one value per pair",
    chosen_nll=chosen_nll,
    rejected_nll=rejected_nll,
    ref_chosen_nll=ref_chosen_nll,
    ref_rejected_nll=ref_rejected_nll,
    chosen_count=chosen_count,
    rejected_count=rejected_count,
  )
  sg = jax.lax.stop_gradient
  chosen_count, rejected_count = _count(chosen_count), _count(rejected_count)
  valid = _valid(chosen_count, rejected_count, shape)
  zero = jnp.zeros(shape, F32)
  ref_c = zero if ref_chosen_nll is None else _safe(sg(ref_chosen_nll), valid)
  ref_r = zero if ref_rejected_nll is None else _safe(sg(ref_rejected_nll), valid)
  c, r = _safe(sg(chosen_nll), valid), _safe(sg(rejected_nll), valid)
  if length_normalize:
    c, ref_c = _mean(c, chosen_count, valid), _mean(ref_c, chosen_count, valid)
    r, ref_r = _mean(r, rejected_count, valid), _mean(ref_r, rejected_count, valid)
  broken = _broken(chosen_count, rejected_count)  # NaN for a pair with a broken count
  chosen_reward = jnp.where(valid, beta * (ref_c - c) * broken, 0.0)
  rejected_reward = jnp.where(valid, beta * (ref_r - r) * broken, 0.0)
  margin = chosen_reward - rejected_reward
  return {
    "chosen_reward": chosen_reward,
    "rejected_reward": rejected_reward,
    "margin": margin,
    "ranked_right": valid & (margin > 0),
    "valid": valid,
  }
