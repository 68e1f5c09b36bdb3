"""Sub-sequence negative log-likelihood from logits.

Dimension letters: ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``S`` segments per
packed row.

For a sample ``[x, y]`` (context first, target after) the loss of the target given its context
is the sum of the per-token losses over the target span:

.. math::

   L(x, y) = -\\log \\Pr(y \\mid x) = -\\sum_{t \\in \\mathrm{span}(y)}
   \\log \\mathrm{softmax}(\\mathrm{logits}_t)[\\mathrm{target}_t].

Every function here follows the conventions of the package: ``logits[b, t]`` predicts
``targets[b, t]`` (see :func:`jaxnll.shift_targets`); the span mask, never a label value,
decides what counts; the log-sum-exp and all sums are float32 whatever the logits' dtype;
positions outside the span are never read for values or gradients, so they can hold NaN,
padding ids or ``-100``.  An empty span costs exactly ``0``.

Reference: T. Xiao and J. Zhu, *Foundations of Large Language Models*, ch. 2-4 (sequence
loss and selective gradient propagation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxnll import _core
from jaxnll._core import F32, NORMALIZATIONS, REDUCTIONS, TokenOptions
from jaxnll.checks import check_logits_inputs as check_inputs  # noqa: F401 (public name)

# ----------------------------------------------------------------------------- token level
#
# The forward is two row reductions (max, then sum of exp) and a gather; the backward is one
# elementwise pass.  XLA fuses each into a single loop over the logits, so neither needs a
# float32 buffer the size of the logits: the only residual is the f32 log-sum-exp per row.
# Masked rows are handled with selects on the results, never by rewriting the input, so a
# NaN there never reaches a value or a gradient and no masked copy of the logits is made.


def _take_target(x, targets):
  """``x[n, targets[n]]``, gathered from the raw bits for 16-bit floats.

  Gathering a bf16/f16 array that is also converted to f32 elsewhere makes XLA's CPU backend
  share one f32 copy of the whole array between the two; gathering the uint16 view does not.
  """
  if x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    picked = jnp.take_along_axis(bits, targets[..., None], axis=-1)[..., 0]
    return jax.lax.bitcast_convert_type(picked, x.dtype)
  return jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]


def _row_stats(x, targets, mask, opts: TokenOptions):
  """Per-row loss, max ``m`` and ``s = Σ exp(z - m)`` of logits ``x[..., V]`` (float32).

  ``x`` may be the local slice of a vocabulary sharded over ``opts.vocab_axis``.
  """
  shard = x.shape[-1]
  offset, vocab, padded = _core.vocab_layout(shard, opts)
  z = _core.softcap(x, opts)
  if padded:
    # Padding columns drop out of every reduction (after the soft-cap, which would map a
    # very negative pad to -c, not to "no probability").
    real = _core.real_columns(shard, offset, vocab, ndim=x.ndim)
    x = jnp.where(real, x, jnp.finfo(x.dtype).min)
    z = jnp.where(real, z, jnp.finfo(z.dtype).min)
  # The soft-cap is monotonic, so the row max can be taken on the raw logits.
  row_max = _core.all_max(_core.softcap(jnp.max(x, axis=-1), opts), opts)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  sum_exp = _core.all_sum(jnp.sum(jnp.exp(z - row_max[..., None]), axis=-1), opts)
  lse = row_max + jnp.log(sum_exp)
  local = targets - offset
  here = (local >= 0) & (local < shard)
  picked = _core.softcap(_take_target(x, jnp.where(here, local, 0)), opts)
  target_logit = _core.all_sum(jnp.where(here, picked, 0.0), opts)
  target_logit = jnp.where(_core.target_in_range(targets, vocab), target_logit, jnp.nan)
  logit_sum = None
  if opts.label_smoothing:
    logit_sum = _core.all_sum(jnp.sum(jnp.where(real, z, 0.0) if padded else z, axis=-1), opts)
  loss = _core.loss_from_stats(lse, target_logit, logit_sum, vocab, opts)
  if mask is not None:
    loss = jnp.where(mask, loss, 0.0)
    row_max = jnp.where(mask, row_max, 0.0)
    sum_exp = jnp.where(mask, sum_exp, 1.0)
  return loss, (row_max, sum_exp)


def _row_grad(x, stats, targets, mask, g, opts: TokenOptions, *, dtype=None):
  """``g[..., None] * ∂loss/∂x`` for rows of logits ``x[..., V]``, in ``dtype`` (default
  ``x``'s)."""
  shard = x.shape[-1]
  offset, vocab, padded = _core.vocab_layout(shard, opts)
  z = _core.softcap(x, opts)
  dz = _core.grad_logits(z, *stats, targets, offset, vocab, opts)
  # A zero cotangent sends back exactly nothing (not NaN · 0 from a bad row); a bad target
  # whose loss is differentiated sends back NaN, as its loss is.
  dz = jnp.where(g[..., None] != 0, dz * g[..., None], 0.0)
  dz = _core.poison_bad_targets(dz, targets, vocab, g)
  keep = None if mask is None else mask[..., None]
  if padded:
    real = _core.real_columns(shard, offset, vocab, ndim=x.ndim)
    keep = real if keep is None else keep & real
  if keep is not None:
    dz = jnp.where(keep, dz, 0.0)
  return dz.astype(x.dtype if dtype is None else dtype)


# ----------------------------------------------------------------------------- linear tangents
#
# Forward mode needs a JVP rule; reverse mode then comes from transposing its tangent, which
# must be linear.  A plain ``Σ_v J[..., v] · ẋ[..., v]`` would do in exact arithmetic, but its
# transpose ``g · J`` keeps neither of the contract's rules on the cotangent: a zero cotangent
# sends back nothing (not ``0 · NaN`` from a bad row) and a differentiated bad target sends back
# NaN.  Nor the memory: linearising it saves ``J`` (the size of the logits) for the backward.
# So the tangent is one primitive, linear in its last operand ``ẋ``, whose transpose rule is
# the hand-written backward: its residuals are the logits themselves and the f32 row
# statistics, and it gates on the cotangent exactly as the ``custom_vjp`` backward did.
#
# A rule is a pair of functions of the residuals (a tuple of arrays) and static options:
# ``jac(res, static)`` gives ``J`` (float32 ``[..., V]``, used for forward-mode tangents) and
# ``vjp(res, g, static)`` gives ``g·J`` gated on ``g``, in the dtype of the tangent.

ROW_RULES: dict = {}

_row_tangent_p = Primitive("jaxnll_row_tangent")


def _row_tangent_impl(*operands, rule, static):
  *res, xd = operands
  jac = ROW_RULES[rule][0](tuple(res), static)
  return jnp.sum(jac * xd.astype(F32), axis=-1, dtype=F32)


def _row_tangent_abstract(*avals, rule, static):
  del rule, static
  xd = avals[-1]
  out, _ = jax.lax.reduce_sum_p.abstract_eval(xd, axes=(xd.ndim - 1,), out_sharding=None)
  return out.update(dtype=jnp.dtype(F32), weak_type=False)


def _row_tangent_transpose(ct, *operands, rule, static):
  *res, xd = operands
  if any(ad.is_undefined_primal(r) for r in res):
    raise NotImplementedError("jaxnll: the row tangent is linear in its tangent operand only")
  nones = [None] * len(res)
  if type(ct) is ad.Zero:
    return [*nones, ad.Zero(xd.aval)]
  return [*nones, ROW_RULES[rule][1](tuple(res), ct, static).astype(xd.aval.dtype)]


def _row_tangent_jvp(primals, tangents, *, rule, static):
  # Second order: linear in ``ẋ`` (the same primitive), and the derivative of ``J`` through
  # the residuals by ordinary differentiation of the ``jac`` rule.
  *res, xd = primals
  *t_res, t_xd = tangents
  out = _row_tangent_p.bind(*primals, rule=rule, static=static)
  t_out = None
  if type(t_xd) is not ad.Zero:
    t_out = _row_tangent_p.bind(*res, t_xd, rule=rule, static=static)
  moving = [
    i
    for i, t in enumerate(t_res)
    if type(t) is not ad.Zero and jnp.issubdtype(jnp.result_type(res[i]), jnp.inexact)
  ]
  if moving:

    def of_res(*m):
      full = list(res)
      for i, v in zip(moving, m, strict=True):
        full[i] = v
      return _row_tangent_impl(*full, xd, rule=rule, static=static)

    _, t2 = jax.jvp(of_res, tuple(res[i] for i in moving), tuple(t_res[i] for i in moving))
    t_out = t2 if t_out is None else t_out + t2
  if t_out is None:
    t_out = ad.Zero(jax.core.get_aval(out).to_tangent_aval())
  return out, t_out


def _row_tangent_batch(args, dims, *, rule, static):
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
  args = [
    jnp.broadcast_to(a, (size, *jnp.shape(a))) if d is None else jnp.moveaxis(a, d, 0)
    for a, d in zip(args, dims, strict=True)
  ]
  return _row_tangent_p.bind(*args, rule=rule, static=static), 0


_row_tangent_p.def_impl(_row_tangent_impl)
_row_tangent_p.def_abstract_eval(_row_tangent_abstract)
ad.primitive_jvps[_row_tangent_p] = _row_tangent_jvp
ad.primitive_transposes[_row_tangent_p] = _row_tangent_transpose
batching.primitive_batchers[_row_tangent_p] = _row_tangent_batch
mlir.register_lowering(_row_tangent_p, mlir.lower_fun(_row_tangent_impl, multiple_results=False))


def row_tangent(rule: str, res: tuple, xd, static):
  """``Σ_v J[..., v] ẋ[..., v]`` for the registered ``rule``: linear in ``xd``, transposed by
  the rule's gated backward."""
  return _row_tangent_p.bind(*res, xd, rule=rule, static=static)


def _scale_jac(res, static):
  return res[0][..., None]


def _scale_vjp(res, g, static):
  return jnp.where(g != 0, g * res[0], 0.0)[..., None]


ROW_RULES["scale"] = (_scale_jac, _scale_vjp)


def _loud_scale(x, c):
  """``x · c`` (float32), where ``c`` may be NaN to mark a bad result: NaN in the value and in
  the gradient that flows from it, and nothing at all from a zero cotangent."""
  return row_tangent("scale", (jnp.asarray(c, F32),), jnp.asarray(x, F32)[..., None], None)


def _loud_mean(total, count, nonempty):
  """``total / count``: ``0`` for an empty span (no position counts), NaN (value and
  gradient) for a span whose positions count but whose weights sum to ``0``."""
  zero = count == 0
  inv = jnp.where(zero, jnp.where(nonempty, jnp.nan, 0.0), 1.0 / jnp.where(zero, 1.0, count))
  return _loud_scale(total, inv)


def reduce_segments(tok, weights, mask, segment_ids, num_segments: int, reduction: str):
  """Per-segment sums (or weighted means) ``[B, S]`` of token losses, loud where they are wrong.

  A negative segment id at a position that counts puts that token in no sample: every result
  of its row is NaN (value and gradient) rather than the token silently dropped.  ``"mean"``
  follows the loud mean of :func:`sequence_nll` per segment.
  """
  seg = functools.partial(
    _core.reduce_segments, segment_ids=segment_ids, num_segments=num_segments, reduction="sum"
  )
  sums = seg(tok, weights, mask)
  stray = jnp.any(mask & (segment_ids < 0), axis=-1)[:, None]
  c = jnp.where(stray, jnp.nan, jnp.ones(sums.shape, F32))
  if reduction == "mean":
    ones = jnp.ones(tok.shape, F32)
    counts, positions = seg(ones, weights, mask), seg(ones, ones, mask)
    zero = counts == 0
    inv = jnp.where(zero, jnp.where(positions > 0, jnp.nan, 0.0), 1.0 / jnp.where(zero, 1, counts))
    c = c * inv
  return _loud_scale(sums, c)


# ----------------------------------------------------------------------------- token rows


def _nll_res(res, static):
  opts, has_mask = static
  x, row_max, sum_exp, targets = res[:4]
  return x, (row_max, sum_exp), targets, (res[4] if has_mask else None), opts


def _nll_jac(res, static):
  x, stats, targets, mask, opts = _nll_res(res, static)
  ones = jnp.ones(targets.shape, F32)
  return _row_grad(x, stats, targets, mask, ones, opts, dtype=F32)


def _nll_vjp(res, g, static):
  x, stats, targets, mask, opts = _nll_res(res, static)
  # The barrier keeps XLA from sharing one f32 conversion of the logits between the forward
  # reductions and this pass (which would materialise it): each converts on the fly.  The
  # row max goes through it too: the forward's ``exp(z - max)`` broadcasts the same value,
  # and one broadcast shared by both passes would be materialised as a [..., V] f32 buffer.
  x, stats = jax.lax.optimization_barrier((x, stats))
  return _row_grad(x, stats, targets, mask, g, opts)


ROW_RULES["nll"] = (_nll_jac, _nll_vjp)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _token_nll_rows(x, targets, mask, opts):
  return _row_stats(x, targets, mask, opts)[0]


@_token_nll_rows.defjvp
def _token_nll_rows_jvp(opts, primals, tangents):
  x, targets, mask = primals
  loss, stats = _row_stats(x, targets, mask, opts)
  # Residuals of the backward: the logits (already live) and the f32 row max and sum of
  # exponentials; the softmax is recomputed from them (exact where ``exp(z - lse)`` with a
  # rounded lse is not).
  res = (x, *stats, targets) + (() if mask is None else (mask,))
  return loss, row_tangent("nll", res, tangents[0], (opts, mask is not None))


# Inside ``shard_map`` over a vocabulary axis the tangent would need a sum over the shards,
# whose transpose depends on the user's ``check_vma``; that path keeps its custom_vjp
# (reverse mode only).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_nll_rows_sharded(x, targets, mask, opts):
  return _row_stats(x, targets, mask, opts)[0]


def _token_nll_rows_sharded_fwd(x, targets, mask, opts):
  loss, stats = _row_stats(x, targets, mask, opts)
  return loss, (x, targets, mask, stats)


def _token_nll_rows_sharded_bwd(opts, res, g):
  x, targets, mask, stats = res
  x, stats = jax.lax.optimization_barrier((x, stats))
  g = _core.whole_cotangent(g, opts)  # split over the vocabulary shards with check_vma off
  return _row_grad(x, stats, targets, mask, g, opts), None, None


_token_nll_rows_sharded.defvjp(_token_nll_rows_sharded_fwd, _token_nll_rows_sharded_bwd)


def _token_nll(logits, targets, mask, opts: TokenOptions):
  """Masked per-token loss over any leading dims (float32, 0 where ``mask`` is False)."""
  # No flattening: a reshape of the logits would stop XLA fusing their f32 conversion into the
  # reductions on CPU.
  rows = _token_nll_rows if opts.vocab_axis is None else _token_nll_rows_sharded
  return rows(logits, _core.int32_ids(targets), mask, opts)


def _check_logits_targets(logits, targets, *, batched: bool):
  """Checks the logits and targets (lists already made arrays by :func:`_core.as_array`)."""
  _core.check_floating("logits", logits)
  _core.check_integer("targets", targets)
  if batched:
    _core.check_rank("logits", logits, (3,), "[B, T, V]")
  elif jnp.ndim(logits) < 1:
    raise ValueError(f"logits must have shape [..., V], got shape {jnp.shape(logits)}")
  if jnp.shape(targets) != jnp.shape(logits)[:-1]:
    raise ValueError(
      "targets must have the shape of logits without the vocabulary axis, got "
      f"logits {jnp.shape(logits)} and targets {jnp.shape(targets)}"
    )
  _core.check_vocab("logits", jnp.shape(logits)[-1], jnp.shape(logits))


def _check_mask(name, mask, targets):
  _core.check_mask(name, mask)
  if jnp.shape(mask) != jnp.shape(targets):
    raise ValueError(
      f"{name} must have the shape of targets, got targets {jnp.shape(targets)} "
      f"and {name} {jnp.shape(mask)}"
    )


def token_nll(
  logits: Float[Array, "... V"],
  targets: Int[Array, "..."],
  *,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  temperature: float = 1.0,
) -> Float[Array, "..."]:
  """Per-position negative log-likelihood, ``logsumexp(logits) - logits[target]``.

  .. math::

     \\ell_t = \\log \\sum_v e^{z_{t,v}} - z_{t, y_t} \\;(+\\, \\zeta \\operatorname{lse}_t^2),
     \\qquad z_t = c \\tanh(x_t / c) / \\tau

  Never a full log-softmax: the forward keeps only the float32 log-sum-exp per position and
  the backward recomputes the softmax in one fused elementwise pass, so forward and backward
  need no float32 buffer the size of the logits.  Forward mode (``jax.jvp``, ``jacfwd``,
  ``hessian``) works too: a ``custom_jvp`` with a linear tangent whose transpose is that
  backward (reverse mode only with ``vocab_axis``).

  Args:
    logits: ``[..., V]`` floating (bf16, f16 or f32).
    targets: ``[...]`` integer ids in ``[0, V)``; an id outside that range gives NaN there.
    z_loss: weight of ``logsumexp**2`` added per token (PaLM / T5X auxiliary loss).
    label_smoothing: ``α``: cross-entropy against ``(1 - α)·onehot + α / V`` (as optax's
      ``smooth_labels``; no constant is subtracted).
    logit_softcap: ``c``: logits are first mapped to ``c·tanh(logits / c)`` (Gemma 2).
    vocab_axis: inside ``shard_map``, the mesh axis over which the vocabulary is sharded:
      ``logits`` is then the local slice of the vocabulary (contiguous, shard ``i`` holding ids
      ``[i·V, (i+1)·V)``) and the result is the full-vocabulary loss, the same on every shard.
      Each device only touches its slice; the row statistics are combined with collectives.
    vocab_size: the true vocabulary when the logits' vocabulary axis is padded (for example
      to a multiple of the shard count); padding columns never count.
    temperature: ``τ > 0``: the loss scores ``logits / τ`` after the soft-cap (the
      distribution sampling at temperature ``τ`` draws from); the chain rule brings ``1/τ``
      into the gradient.

  Returns:
    float32 ``[...]`` per-position losses.  Gradients come back in ``logits.dtype``.  The
    backward rebuilds the softmax from the f32 row max and sum of exponentials, so it is the
    exact softmax even where a rounded ``lse`` is not (bf16-max logits, logits near ``1e4``).

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.8, 0.2], [0.8, 0.2]]))
    >>> token_nll(logits, jnp.array([0, 1])).round(3).tolist()
    [0.223, 1.609]
  """
  logits, targets = _core.as_array("logits", logits), _core.as_array("targets", targets)
  _check_logits_targets(logits, targets, batched=False)
  opts = TokenOptions(
    z_loss, label_smoothing, logit_softcap, vocab_axis, vocab_size, temperature=temperature
  )
  return _token_nll(jnp.asarray(logits), _core.int32_ids(targets), None, opts)


# ----------------------------------------------------------------------------- sequence level


def reduce_span(token_losses, weights, mask, reduction):
  """Sum (or weighted mean) of one sequence's token losses over its span, float32."""
  total = jnp.sum(jnp.where(mask, token_losses * weights, 0.0), dtype=F32)
  if reduction == "sum":
    return total
  count = jnp.sum(jnp.where(mask, weights, 0.0), dtype=F32)
  return _loud_mean(total, count, jnp.any(mask))


def _sequence_parts(logits, targets, span_mask, name="span_mask", extra_mask=None, **token_opts):
  """Checks the arguments and returns ``(token_losses, weights, mask)`` for ``[B, T]``.

  ``token_losses`` are computed where ``mask | extra_mask`` holds and are 0 elsewhere.
  """
  logits, targets = _core.as_array("logits", logits), _core.as_array("targets", targets)
  span_mask = _core.as_array(name, span_mask)
  _check_logits_targets(logits, targets, batched=True)
  _check_mask(name, span_mask, targets)
  opts = TokenOptions(**token_opts)
  span_mask = jnp.asarray(span_mask)
  mask = _core.mask_to_bool(span_mask)
  weights = _core.mask_to_weights(span_mask)
  compute = mask if extra_mask is None else mask | extra_mask
  # Token losses are independent per position: one call over all B*T rows.
  tok = _token_nll(jnp.asarray(logits), _core.int32_ids(targets), compute, opts)
  return tok, weights, mask


def sequence_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, " B"]:
  """Per-sample negative log-likelihood of the target span, ``-log Pr(y | x)``.

  .. math::

     L_b = \\sum_t w_{b,t}\\, \\ell_{b,t} \\quad (\\text{"sum"}), \\qquad
     L_b = \\frac{\\sum_t w_{b,t} \\ell_{b,t}}{\\sum_t w_{b,t}} \\quad (\\text{"mean"}; 0
     \\text{ for an empty span})

  where ``ℓ`` is :func:`token_nll` and ``w`` the span mask (bool, or float weights).

  A span is empty by its positions: it is the positions whose weight is not ``0``.  An empty
  span costs exactly ``0`` (sum and mean).  A non-empty span whose float weights sum to ``0``
  (negative weights) has no mean: ``"mean"`` gives NaN there, in the value and in the gradient
  that flows from it (a zero cotangent still sends back nothing).

  Args:
    logits: ``[B, T, V]``, any floating dtype; ``logits[b, t]`` predicts ``targets[b, t]``.
    targets: ``[B, T]`` integer ids, already shifted (:func:`jaxnll.shift_targets`).
    span_mask: ``[B, T]`` bool mask or float weights of the target positions.
    reduction: ``"sum"`` (``-log Pr(y|x)``) or ``"mean"`` (per target token).
    **token_opts: ``z_loss``, ``label_smoothing``, ``logit_softcap``, ``vocab_axis``,
      ``vocab_size``, ``temperature`` as in :func:`token_nll`.

  Returns:
    float32 ``[B]``.

  Examples:
    The book's numbers: per-token losses 0.1, 0.3, 0.2, 0.4 sum to 1.0 and average 0.25.

    >>> import jax.numpy as jnp
    >>> p = jnp.exp(-jnp.array([[0.1, 0.3, 0.2, 0.4]]))       # Pr(target) at each step
    >>> logits = jnp.log(jnp.stack([p, 1 - p], axis=-1))      # [1, 4, 2]
    >>> targets, span = jnp.zeros((1, 4), int), jnp.ones((1, 4), bool)
    >>> float(sequence_nll(logits, targets, span)[0]), float(
    ...     sequence_nll(logits, targets, span, reduction="mean")[0])
    (1.0, 0.25)
  """
  _core.check_choice("reduction", reduction, REDUCTIONS)
  tok, weights, mask = _sequence_parts(logits, targets, span_mask, **token_opts)
  return jax.vmap(lambda *a: reduce_span(*a, reduction))(tok, weights, mask)


def sequence_nll_and_count(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  **token_opts,
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
  """Per-sample sums ``-log Pr(y|x)`` and target-token counts (weight sums), float32.

  The currency of batch reduction: feed both to :func:`loss_terms` / :func:`batch_loss`.
  """
  sums = sequence_nll(logits, targets, span_mask, reduction="sum", **token_opts)
  return sums, span_counts(span_mask)


def span_counts(span_mask: Bool[Array, "B T"] | Float[Array, "B T"]) -> Float[Array, " B"]:
  """Target tokens (weight sum) per sample, float32."""
  span_mask = _core.as_array("span_mask", span_mask)
  _core.check_mask("span_mask", span_mask)
  return jnp.sum(_core.mask_to_weights(jnp.asarray(span_mask)), axis=-1, dtype=F32)


def selective_sequence_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  valid_mask: Bool[Array, "B T"] | Float[Array, "B T"] | None = None,
  *,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, " B"]:
  """Selective gradient propagation: the loss of every valid token, the gradient of the span.

  The whole sequence is built in the forward pass, but error gradients flow back only from
  the target sub-sequence:

  .. math::

     \\tilde L = L_{\\text{span}} + \\operatorname{stop\\_gradient}(L_{\\text{valid}} -
     L_{\\text{span}}),

  so the value is the ``reduction`` over ``valid_mask`` (context and target, for monitoring)
  and the gradient is exactly that of ``sequence_nll(logits, targets, span_mask)``.

  Bad values follow from that: NaN / inf logits or an id outside ``[0, V)`` at a position of
  ``valid_mask`` outside the span make the *value* NaN (it reports that position's loss) but
  never reach the gradient, which stays the span's, finite; at a position outside both masks
  they reach neither.  The check of :func:`jaxnll.checked` covers the span and ``valid_mask``.

  Args:
    logits, targets, span_mask: as in :func:`sequence_nll`.
    valid_mask: ``[B, T]`` positions whose loss the value reports (default: all).
    reduction: ``"sum"`` or ``"mean"``; used for both the value and the gradient.
    **token_opts: as in :func:`token_nll`.

  Returns:
    float32 ``[B]``.
  """
  _core.check_choice("reduction", reduction, REDUCTIONS)
  targets = _core.as_array("targets", targets)
  if valid_mask is None:
    valid_mask = jnp.ones(jnp.shape(targets), jnp.bool_)
  valid_mask = _core.as_array("valid_mask", valid_mask)
  _check_mask("valid_mask", valid_mask, targets)
  valid_mask = jnp.asarray(valid_mask)
  valid = _core.mask_to_bool(valid_mask)
  tok, weights, mask = _sequence_parts(logits, targets, span_mask, extra_mask=valid, **token_opts)
  valid_weights = _core.mask_to_weights(valid_mask)
  reduce = jax.vmap(lambda *a: reduce_span(*a, reduction))
  span_value = reduce(tok, weights, mask)
  valid_value = reduce(jax.lax.stop_gradient(tok), valid_weights, valid)
  return span_value + jax.lax.stop_gradient(valid_value - span_value)


def segment_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[ArrayLike, "B T"],
  *,
  num_segments: int,
  reduction: str = "sum",
  **token_opts,
) -> Float[Array, "B S"]:
  """Per-sample losses of packed rows: one value per segment.

  Segment id ``0`` is padding; samples are ids ``1..num_segments``; ``out[b, s - 1]`` is the
  loss of segment ``s`` of row ``b`` (``0`` for a segment that is absent or has an empty span).
  Build targets with ``shift_targets(tokens, span, segment_ids)`` so nothing is predicted
  across a boundary.  Ids above ``num_segments`` are ignored.  A negative id at a position of
  the span belongs to no sample: every result of that row is NaN, in value and gradient (loud,
  rather than the token silently dropped).  ``"mean"`` is per segment as in
  :func:`sequence_nll`.

  Returns:
    float32 ``[B, num_segments]``.
  """
  _core.check_choice("reduction", reduction, REDUCTIONS)
  tok, weights, mask = _sequence_parts(logits, targets, span_mask, **token_opts)
  segment_ids = _core.as_array("segment_ids", segment_ids)
  _core.check_segments(segment_ids, num_segments, "targets", mask)
  segment_ids = jnp.asarray(segment_ids)
  return reduce_segments(tok, weights, mask, segment_ids, num_segments, reduction)


# ----------------------------------------------------------------------------- batch reduction


def loss_terms(
  sums: Float[Array, " B"], counts: Float[Array, " B"], *, normalize: str = "tokens"
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """``(numerator, denominator)`` of the batch loss; add them over micro-batches or devices.

  The batch loss is ``numerator / denominator`` (``numerator`` alone for ``"sum"``, whose
  denominator is ``0``).  Because both parts are plain sums over samples, adding them across
  gradient-accumulation steps or devices before dividing reproduces the full batch exactly,
  whatever each part's token count — unlike averaging per-micro-batch averages.

  * ``"tokens"``: ``Σ sums / Σ counts`` — the global token mean (the default for training).
  * ``"samples"``: the mean over samples with a non-empty span of their per-token means.
  * ``"sum"``: ``Σ sums``.
  """
  _core.check_choice("normalize", normalize, NORMALIZATIONS)
  sums, counts = _core.as_array("sums", sums), _core.as_array("counts", counts)
  _core.check_floating("sums", sums)  # integer sums are not losses (a cast loses nothing loud)
  if not jnp.issubdtype(jnp.result_type(counts), jnp.number):
    raise TypeError(f"counts must be numeric (token counts), got dtype {jnp.result_type(counts)}")
  sums = jnp.asarray(sums, F32)
  counts = jnp.asarray(counts, F32)
  if sums.shape != counts.shape:
    raise ValueError(
      f"sums and counts must have the same shape, got {sums.shape} and {counts.shape}"
    )
  if normalize == "tokens":
    return jnp.sum(sums), jnp.sum(counts)
  if normalize == "samples":
    means = _core.safe_divide(sums, counts)
    return jnp.sum(means), jnp.sum(counts != 0, dtype=F32)
  return jnp.sum(sums), jnp.zeros((), F32)


def finish_loss(
  numerator: Float[Array, ""], denominator: Float[Array, ""], *, normalize: str = "tokens"
) -> Float[Array, ""]:
  """Divides the summed :func:`loss_terms`; ``0`` (not NaN) when nothing was counted."""
  _core.check_choice("normalize", normalize, NORMALIZATIONS)
  if normalize == "sum":
    return numerator
  return _core.safe_divide(numerator, denominator)


def batch_loss(
  sums: Float[Array, " B"], counts: Float[Array, " B"], *, normalize: str = "tokens"
) -> Float[Array, ""]:
  """The batch loss from per-sample sums and token counts (see :func:`loss_terms`).

  Examples:
    Two micro-batches: 2 target tokens at NLL 1 each and 8 at NLL 3 each.  The token mean is
    ``(2 + 24) / 10 = 2.6``; averaging the two micro-batch means would give 2.0.

    >>> import jax.numpy as jnp
    >>> float(batch_loss(jnp.array([2.0, 24.0]), jnp.array([2.0, 8.0])))
    2.6
  """
  num, den = loss_terms(sums, counts, normalize=normalize)
  return finish_loss(num, den, normalize=normalize)
