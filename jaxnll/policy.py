"""Policy-gradient losses from per-token NLL: the clipped surrogate, a k3 KL, group advantages.

Dimension letters: ``B`` batch (sampled responses), ``T`` sequence length, ``N`` rewards,
``G`` responses per prompt (a group).

Reinforcement learning of a language model scores *sampled* responses ``y ~ π_old(·|x)``
and reweights their per-token log-likelihoods.  Everything here takes the per-token NLL
``ℓ_t = -log π(y_t | x, y_{<t})`` that :func:`jaxnll.token_nll` (from logits) and
``jaxnll.linear_token_nll`` (fused with the head, no ``[B, T, V]`` logits) return, so the
losses compose with every entry of the package.  With ``ℓ`` the current policy's NLL (the one
that is differentiated), ``ℓ^old`` the NLL under the policy that sampled the responses and
``ℓ^ref`` under a frozen reference, the per-token importance ratio and the per-token loss are

.. math::

   r_t = \\frac{π(y_t)}{π_{old}(y_t)} = e^{ℓ^{old}_t - ℓ_t}, \\qquad
   c_t = -\\min\\big(r_t A_t,\\; \\mathrm{clip}(r_t, 1 - ε_{low}, 1 + ε_{high}) A_t\\big)
         + β\\, k3_t,

summed over the response span per sample (:func:`ppo_clip_loss`).

**The KL term and its sign.**  Schulman's ``k3`` estimator of ``KL(π ‖ π_ref)`` from samples
``y ~ π`` uses the ratio ``ρ = π_ref(y) / π(y)``: ``k3 = (ρ - 1) - log ρ``, unbiased
(``E_π[ρ] = 1``) and ``≥ 0`` sample by sample (``e^u - u - 1 ≥ 0``).  In NLLs,
``log ρ = log π_ref - log π = ℓ - ℓ^{ref}``, hence

.. math::

   k3_t = e^{ℓ_t - ℓ^{ref}_t} - (ℓ_t - ℓ^{ref}_t) - 1 .

Swapping the two NLLs would estimate the reverse divergence ``KL(π_ref ‖ π)`` with samples from
the wrong distribution (the mistake the contract warns about); :mod:`jaxnll.reference` spells
the formula out in log-probabilities so the tests pin the sign.

**Normalisation** is the batch reduction of the package: per-sample sums and target-token
counts go to :func:`policy_loss_terms` (:func:`jaxnll.loss_terms` with a ``"sum"`` constant),
whose ``(numerator, denominator)`` add exactly over micro-batches and devices.  The three
choices that the literature argues about are

* ``"tokens"``: ``Σ_b Σ_t c / Σ_b |y_b|`` — the global token mean (DAPO, Yu et al. 2025): every
  token weighs the same, long responses are not discounted;
* ``"samples"``: the mean over responses of their per-token means (GRPO, Shao et al. 2024): a
  token of a short response weighs more than one of a long response, which favours long wrong
  answers and short right ones (the length bias Liu et al. 2025 point out);
* ``"sum"`` with a ``constant`` (Dr. GRPO, Liu et al. 2025): ``Σ_b Σ_t c / constant``, e.g.
  the generation budget times the number of responses — no length-dependent weighting at all.

Conventions as everywhere in jaxnll: float32 results and sums whatever the input dtype; the
span mask decides what counts; positions outside it may hold anything (NaN, inf) and never
reach a value or a gradient; an empty span costs exactly ``0``; option values are checked at
trace time.

References: J. Schulman, F. Wolski, P. Dhariwal, A. Radford and O. Klimov, *Proximal Policy
Optimization Algorithms* (2017); Z. Shao et al., *DeepSeekMath* (2024; GRPO); Q. Yu et al.,
*DAPO: an Open-Source LLM Reinforcement Learning System at Scale* (2025; asymmetric
"clip-higher" and the token mean); Z. Liu et al., *Understanding R1-Zero-Like Training: A
Critical Perspective* (2025; Dr. GRPO); J. Schulman, *Approximating KL Divergence* (blog,
2020; the k3 estimator).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Bool, Float

from jaxnll import _core
from jaxnll._core import F32, NORMALIZATIONS
from jaxnll.nll import loss_terms


def ppo_clip_loss(
  token_nll: Float[ArrayLike, "B T"],
  old_token_nll: Float[ArrayLike, "B T"],
  advantages: Float[ArrayLike, " B"] | Float[ArrayLike, "B T"],
  span_mask: Bool[ArrayLike, "B T"] | Float[ArrayLike, "B T"],
  *,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  ref_token_nll: Float[ArrayLike, "B T"] | None = None,
  kl_coef: float = 0.0,
) -> Float[ArrayLike, " B"]:
  """Per-sample clipped policy-gradient loss (PPO / GRPO / DAPO) from per-token NLL.

  .. math::

     L_b = \\sum_t w_{b,t} \\Big[-\\min\\big(r_{b,t} A_{b,t},\\,
     \\mathrm{clip}(r_{b,t}, 1 - ε_{low}, 1 + ε_{high})\\, A_{b,t}\\big)
     + β \\big(e^{ℓ_{b,t} - ℓ^{ref}_{b,t}} - (ℓ_{b,t} - ℓ^{ref}_{b,t}) - 1\\big)\\Big],
     \\qquad r_{b,t} = e^{ℓ^{old}_{b,t} - ℓ_{b,t}},

  with ``w`` the span mask (bool or float weights).  The second term is Schulman's ``k3``
  estimate of ``KL(π ‖ π_ref)`` (module docstring for the sign).  At ``π = π_old`` the
  value is ``-Σ_t A_t`` and the gradient with respect to ``ℓ`` is ``A_t`` per token, the
  REINFORCE gradient; where the ratio has left the trust region in the direction the
  advantage pushes, the clipped branch is selected and that token's gradient is exactly 0.

  Args:
    token_nll: ``[B, T]`` per-token NLL of the sampled tokens under the current policy (the
      differentiated input), e.g. ``jaxnll.token_nll(logits, targets)``.
    old_token_nll: ``[B, T]`` the same under the policy that sampled them (treated as data:
      ``stop_gradient``).
    advantages: ``[B]`` one advantage per sample (GRPO: :func:`group_advantages`) or ``[B, T]``
      one per token (treated as data).
    span_mask: ``[B, T]`` bool mask or float weights of the response tokens.
    clip_low: ``ε_low ≥ 0``: ratios below ``1 - ε_low`` are clipped (``< 1``).
    clip_high: ``ε_high ≥ 0``: ratios above ``1 + ε_high`` are clipped (DAPO's
      "clip-higher" uses a larger ``ε_high`` than ``ε_low``).
    ref_token_nll: ``[B, T]`` NLL under the frozen reference (data); required when
      ``kl_coef > 0``.
    kl_coef: ``β ≥ 0``, weight of the k3 KL term.

  Returns:
    float32 ``[B]``: per-sample sums over the span.  Normalise with :func:`policy_loss_terms`.

  Examples:
    On-policy (``ℓ = ℓ^{old}``, ratio 1) the loss is minus the summed advantage:

    >>> import jax.numpy as jnp
    >>> nll = jnp.array([[0.5, 1.0, 2.0]])
    >>> span = jnp.array([[False, True, True]])
    >>> float(ppo_clip_loss(nll, nll, jnp.array([0.5]), span)[0])
    -1.0
  """
  _core.check_floating("token_nll", token_nll)
  _core.check_rank("token_nll", token_nll, (2,), "[B, T]")
  shape = jnp.shape(token_nll)
  _core.check_floating("old_token_nll", old_token_nll)
  _core.check_like("old_token_nll", old_token_nll, "token_nll", shape)
  _core.check_floating("advantages", advantages)
  if jnp.shape(advantages) not in (shape[:1], shape):
    raise ValueError(
      f"advantages must have shape [B] {shape[:1]} or [B, T] {shape}, got {jnp.shape(advantages)}"
    )
  _core.check_mask("span_mask", span_mask)
  _core.check_like("span_mask", span_mask, "token_nll", shape)
  clip_low = _core.check_float_option("clip_low", clip_low, low=0.0, high=1.0, high_open=True)
  clip_high = _core.check_float_option("clip_high", clip_high, low=0.0)
  kl_coef = _core.check_float_option("kl_coef", kl_coef, low=0.0)
  if kl_coef > 0.0 and ref_token_nll is None:
    raise ValueError(f"kl_coef={kl_coef} needs ref_token_nll (the reference policy's NLL)")
  if ref_token_nll is not None:
    _core.check_floating("ref_token_nll", ref_token_nll)
    _core.check_like("ref_token_nll", ref_token_nll, "token_nll", shape)

  span_mask = jnp.asarray(span_mask)
  inside = _core.mask_to_bool(span_mask)
  weights = _core.mask_to_weights(span_mask)
  sg = jax.lax.stop_gradient

  # Select the inputs before any arithmetic: a NaN / inf outside the span is replaced by 0,
  # so neither the value nor the gradient (0 · NaN) ever sees it.
  def inside_only(x):
    return jnp.where(inside, jnp.asarray(x).astype(F32), 0.0)

  new = inside_only(token_nll)
  old = inside_only(sg(old_token_nll))
  adv = jnp.asarray(sg(advantages)).astype(F32)
  adv = inside_only(jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, shape))
  ratio = jnp.exp(old - new)
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  if ref_token_nll is not None and kl_coef > 0.0:
    log_rho = new - inside_only(sg(ref_token_nll))  # log π_ref - log π
    per_token = per_token + kl_coef * (jnp.exp(log_rho) - log_rho - 1.0)
  return jnp.sum(jnp.where(inside, per_token * weights, 0.0), axis=-1, dtype=F32)


def k3_kl(
  token_nll: Float[ArrayLike, "B T"],
  ref_token_nll: Float[ArrayLike, "B T"],
  span_mask: Bool[ArrayLike, "B T"] | Float[ArrayLike, "B T"],
) -> Float[ArrayLike, " B"]:
  """Per-sample sums of Schulman's k3 estimate of ``KL(π ‖ π_ref)`` over the span.

  .. math::

     \\mathrm{KL}_b = \\sum_t w_{b,t} \\big(e^{ℓ_{b,t} - ℓ^{ref}_{b,t}} - (ℓ_{b,t} -
     ℓ^{ref}_{b,t}) - 1\\big) \\;\\ge 0

  for responses sampled from ``π`` (the term :func:`ppo_clip_loss` adds with ``kl_coef``).

  Returns:
    float32 ``[B]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> span = jnp.ones((1, 2), bool)
    >>> float(k3_kl(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 2.0]]), span)[0])
    0.0
  """
  _core.check_floating("token_nll", token_nll)
  _core.check_rank("token_nll", token_nll, (2,), "[B, T]")
  _core.check_floating("ref_token_nll", ref_token_nll)
  _core.check_like("ref_token_nll", ref_token_nll, "token_nll", jnp.shape(token_nll))
  _core.check_mask("span_mask", span_mask)
  _core.check_like("span_mask", span_mask, "token_nll", jnp.shape(token_nll))
  span_mask = jnp.asarray(span_mask)
  inside = _core.mask_to_bool(span_mask)
  log_rho = jnp.where(inside, jnp.asarray(token_nll).astype(F32), 0.0) - jnp.where(
    inside, jax.lax.stop_gradient(jnp.asarray(ref_token_nll)).astype(F32), 0.0
  )
  k3 = jnp.exp(log_rho) - log_rho - 1.0
  weights = _core.mask_to_weights(span_mask)
  return jnp.sum(jnp.where(inside, k3 * weights, 0.0), axis=-1, dtype=F32)


def group_advantages(
  rewards: Float[ArrayLike, " N"], group_size: int, *, normalize_std: bool = True
) -> Float[ArrayLike, " N"]:
  """GRPO advantages: each reward minus its group's mean, divided by the group's std.

  .. math::

     A_i = \\frac{R_i - \\operatorname{mean}_{j \\in g(i)} R_j}
     {\\operatorname{std}_{j \\in g(i)} R_j}

  Groups are consecutive runs of ``group_size`` rewards (the ``G`` responses to one prompt).
  The std is the population std (``ddof=0``).  A group whose rewards are all equal (every
  answer right, or every answer wrong) carries no learning signal: its advantages are exactly
  ``0``, never NaN (detected as max == min, so rounding in the mean cannot turn it into
  ``±1``).  A NaN or infinite reward makes its whole group's advantages NaN (loud, not the
  ``0`` of a group without signal).  ``normalize_std=False`` keeps the centred rewards
  (Dr. GRPO).

  Args:
    rewards: ``[N]`` floating, ``N`` a multiple of ``group_size``.
    group_size: ``G ≥ 1`` responses per prompt (a Python int).
    normalize_std: divide by the group's std.

  Returns:
    float32 ``[N]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), 2).tolist()
    [1.0, -1.0, 0.0, 0.0]
  """
  _core.check_floating("rewards", rewards)
  _core.check_rank("rewards", rewards, (1,), "[N]")
  group_size = _core.check_int("group_size", group_size)
  n = jnp.shape(rewards)[0]
  if group_size < 1 or n % group_size:
    raise ValueError(
      f"group_size must be >= 1 and divide the number of rewards, got group_size={group_size} "
      f"and rewards of shape {jnp.shape(rewards)}"
    )
  r = jnp.asarray(rewards).astype(F32).reshape(n // group_size, group_size)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  flat = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
  if normalize_std:
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=1, keepdims=True))
    ok = ~flat & (std > 0)
    centred = jnp.where(ok, _core.safe_divide(centred, std), 0.0)
  # A NaN or infinite reward is broken input: its whole group is NaN (loud), never the 0 of a
  # group without signal (NaN fails max == min, then std > 0, and read as "flat").
  finite = jnp.all(jnp.isfinite(r), axis=1, keepdims=True)
  return jnp.where(finite, jnp.where(flat, 0.0, centred), jnp.nan).reshape(n)


def policy_loss_terms(
  sums: Float[ArrayLike, " B"],
  counts: Float[ArrayLike, " B"],
  *,
  normalize: Literal["tokens", "samples", "sum"] = "tokens",
  constant: float = 1.0,
) -> tuple[Float[ArrayLike, ""], Float[ArrayLike, ""]]:
  """``(numerator, denominator)`` of a policy-gradient batch loss; add them over micro-batches
  and devices, then divide once (:func:`jaxnll.nll.finish_loss`).

  * ``"tokens"`` (DAPO): ``(Σ sums, Σ counts)`` — the global token mean;
  * ``"samples"`` (GRPO): ``(Σ sums / counts, #non-empty samples)`` — per-sample means;
  * ``"sum"`` (Dr. GRPO): ``(Σ sums / constant, 0)`` — a sum divided by a constant that does
    not depend on the batch (the generation budget times the number of responses of the
    whole step, say); ``finish_loss`` returns the numerator as it is.

  Args:
    sums: ``[B]`` per-sample sums (:func:`ppo_clip_loss`).
    counts: ``[B]`` response tokens per sample (:func:`jaxnll.nll.span_counts`).
    normalize: ``"tokens"``, ``"samples"`` or ``"sum"``.
    constant: the divisor of ``"sum"`` (``> 0``).

  Returns:
    float32 scalars ``(numerator, denominator)``.

  Examples:
    A short response (2 tokens, loss sum 2) and a long one (8 tokens, loss sum 24):

    >>> import jax.numpy as jnp
    >>> s, c = jnp.array([2.0, 24.0]), jnp.array([2.0, 8.0])
    >>> [float(x) for x in policy_loss_terms(s, c, normalize="tokens")]
    [26.0, 10.0]
    >>> [float(x) for x in policy_loss_terms(s, c, normalize="samples")]
    [4.0, 2.0]
    >>> [round(float(x), 4) for x in policy_loss_terms(s, c, normalize="sum", constant=20.0)]
    [1.3, 0.0]
  """
  _core.check_choice("normalize", normalize, NORMALIZATIONS)
  constant = _core.check_float_option("constant", constant, low=0.0, low_open=True)
  num, den = loss_terms(sums, counts, normalize=normalize)
  if normalize == "sum":
    num = num / constant
  return num, den
