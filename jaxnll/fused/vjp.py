"""The custom-VJP rules of the compacted kernels (every implementation but the materialised).

Three differentiable functions over a kernel module's passes (:class:`jaxnll.fused.kernel.Passes`)
and a static :class:`~jaxnll.fused.compact.Plan`, each on the call's
``(hidden, weight, bias, targets, span_mask)``:

* :func:`sequence` — per-sample sums (or means) ``[B]``; forward: the statistics pass;
  backward: one recomputing gradient pass with per-token scales ``ct[b]·w_{b,t}`` (with
  ``plan.hidden_grad_in_forward`` the forward also carries the unnormalised hidden gradient,
  which is linear in the cotangent, and the backward recomputes only for the weight);
* :func:`loss` — the scalar entry ``(batch loss, sums)``: the gradients of the loss are built
  in the forward (``one_pass``, or the statistics then the gradient pass), the backward only
  scales them; the sums are per sample ``[B]``, or per segment ``[B, S]`` when the plan has
  ``num_segments`` (from the same per-token losses: no second pass over the head).  A
  cotangent for the sums costs one more recomputing gradient pass;
* :func:`tokens` — per-token losses ``[B, T]`` (and entropies): per-token cotangents become the
  compacted scales of one gradient pass.

Gradients nobody asks for (``CustomVJPPrimal.perturbed`` false: a frozen head) are not
computed.  :func:`call` runs them inside an eager ``shard_map`` body.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from jaxnll import _core, nll
from jaxnll._core import F32
from jaxnll.fused import compact
from jaxnll.fused.compact import Compacted, reverse_only, safe_inverse


def _primal(x):
  return x.value if isinstance(x, CustomVJPPrimal) else x


def _needed(hidden, weight, bias):
  """Which of (hidden, weight, bias) are differentiated, as residual-safe pytree structure
  (``()`` yes, ``None`` no: static, unlike a bool leaf)."""
  return tuple(
    () if isinstance(x, CustomVJPPrimal) and x.perturbed else None for x in (hidden, weight, bias)
  )


def _forward(passes, plan, bt: Compacted, need):
  """The forward pass: ``(stats_c, loss_c, carry)``.  ``carry`` is the kernel's unnormalised
  hidden gradient (``plan.hidden_grad_in_forward`` and the hidden states differentiated),
  else None."""
  if plan.hidden_grad_in_forward and need[0] is not None:
    return passes.forward_with_hidden(bt)
  return (*passes.stats_pass(bt), None)


def _grad_pass(passes, bt, scale_c, stats_c, need, entropy_scale_c=None, carry=None):
  if carry is None:
    return passes.grad_pass(bt, scale_c, stats_c, need, entropy_scale_c)
  return passes.grad_pass(bt, scale_c, stats_c, need, entropy_scale_c, carry=carry)


def _grads(passes, plan, res, scale_c):
  """Gradients (hidden, weight, bias) of ``Σ scale_c·ℓ`` by one gradient pass."""
  hidden, weight, bias, targets, span_mask, stats_c, need, carry = res
  need = tuple(x is not None for x in need)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  dh_c, dw, db = _grad_pass(passes, bt, scale_c(bt), stats_c, need, carry=carry)
  return compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)


def _per_sample_scale(per_sample, span_mask):
  return lambda bt: compact.compact_scale(bt, per_sample, span_mask)


# ----------------------------------------------------------------------------- per-sample


def _sequence_value(passes, plan, need, hidden, weight, bias, targets, span_mask):
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  stats_c, loss_c, carry = _forward(passes, plan, bt, need)
  sums = compact.per_sample(bt, loss_c, span_mask)
  if plan.reduction == "mean":
    sums = sums * safe_inverse(compact.counts(span_mask))
  return sums, stats_c, carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def sequence(passes, plan, hidden, weight, bias, targets, span_mask):
  args = (hidden, weight, bias, targets, span_mask)
  return _sequence_value(passes, plan, (None,), *args)[0]


def _sequence_fwd(passes, plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  args = [_primal(x) for x in (hidden, weight, bias, targets, span_mask)]
  out, stats_c, carry = _sequence_value(passes, plan, need, *args)
  # Residuals: the inputs (already live), the f32 row max and sum of exponentials per
  # position (the exact softmax is rebuilt from them, not from a rounded log-sum-exp) and the
  # kernel's hidden-gradient carry, if any.
  return out, (*args, stats_c, need, carry)


def _sequence_bwd(passes, plan, res, ct):
  if isinstance(ct, SymbolicZero):
    return (None,) * 5
  span_mask = res[4]
  ct = _core.whole_cotangent(ct, plan.opts, plan.cotangents_split)
  if plan.reduction == "mean":
    ct = ct * safe_inverse(compact.counts(span_mask))
  dh, dw, db = _grads(passes, plan, res, _per_sample_scale(ct, span_mask))
  return dh, dw, db, None, None


sequence.defvjp(_sequence_fwd, _sequence_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- scalar entry


def _batch_weights(sums, counts, normalize):
  """``∂ loss / ∂ sums[b]``: the batch loss is linear in the per-sample sums."""
  return jax.grad(lambda s: nll.batch_loss(s, counts, normalize=normalize))(sums)


def _segment_sums(bt: Compacted, loss_c, span_mask, segment_ids, num_segments):
  """Per-segment sums ``[B, S]`` of the compacted per-token losses (loud like
  :func:`jaxnll.segment_nll`: a negative id inside the span makes its row NaN)."""
  tok = bt.uncompact(loss_c).reshape(span_mask.shape)
  return _reduce_segments(tok, span_mask, segment_ids, num_segments)


def _reduce_segments(tok, span_mask, segment_ids, num_segments):
  mask, weights = _core.mask_to_bool(span_mask), _core.mask_to_weights(span_mask)
  return nll.reduce_segments(tok, weights, mask, segment_ids, num_segments, "sum")


def _segment_scale(ct, span_mask, segment_ids, num_segments):
  """Per-token scales (compacted) of a cotangent ``ct [B, S]`` for the per-segment sums: the
  sums are linear in the per-token losses."""

  def scale(bt):
    zeros = jnp.zeros(span_mask.shape, F32)
    _, pull = jax.vjp(lambda t: _reduce_segments(t, span_mask, segment_ids, num_segments), zeros)
    (per_token,) = pull(ct.astype(F32))
    return bt.compact(per_token.reshape(-1))

  return scale


def _loss_value(passes, plan, hidden, weight, bias, targets, span_mask, segment_ids):
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  stats_c, loss_c = passes.stats_pass(bt)
  sums = compact.per_sample(bt, loss_c, span_mask)
  loss = nll.batch_loss(sums, compact.counts(span_mask), normalize=plan.normalize)
  if plan.num_segments:
    sums = _segment_sums(bt, loss_c, span_mask, segment_ids, plan.num_segments)
  return loss, sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def loss(passes, plan, hidden, weight, bias, targets, span_mask, segment_ids=None):
  return _loss_value(passes, plan, hidden, weight, bias, targets, span_mask, segment_ids)


def _loss_fwd(passes, plan, hidden, weight, bias, targets, span_mask, segment_ids=None):
  need = _needed(hidden, weight, bias)
  wanted = tuple(x is not None for x in need)
  hidden, weight, bias, targets, span_mask, segment_ids = (
    _primal(x) for x in (hidden, weight, bias, targets, span_mask, segment_ids)
  )
  counts = compact.counts(span_mask)
  # Which tokens get which weight is known before any logit: the gradient can be built in the
  # same pass as the loss.
  per_sample = _batch_weights(jnp.zeros_like(counts), counts, plan.normalize)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  scale_c = compact.compact_scale(bt, per_sample, span_mask)
  if plan.one_pass:
    stats_c, loss_c, dh_c, dw, db = passes.one_pass(bt, scale_c, wanted)
  else:
    stats_c, loss_c = passes.stats_pass(bt)
    dh_c, dw, db = passes.grad_pass(bt, scale_c, stats_c, wanted)
  grads = compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)
  sums = compact.per_sample(bt, loss_c, span_mask)
  value = nll.batch_loss(sums, counts, normalize=plan.normalize)
  if plan.num_segments:
    sums = _segment_sums(bt, loss_c, span_mask, segment_ids, plan.num_segments)
  res = (hidden, weight, bias, targets, span_mask, stats_c, need, None)
  return (value, sums), (grads, res, segment_ids)


def _scaled(ct, g):
  return None if g is None else (ct * g.astype(F32)).astype(g.dtype)


def _add(a, b):
  if a is None or b is None:
    return b if a is None else a
  return (a.astype(F32) + b.astype(F32)).astype(a.dtype)


def _loss_bwd(passes, plan, res, cts):
  (dh, dw, db), seq_res, segment_ids = res
  ct_loss, ct_sums = cts
  if isinstance(ct_loss, SymbolicZero):
    grads = [None, None, None]
  else:
    ct_loss = _core.whole_cotangent(ct_loss, plan.opts, plan.cotangents_split)
    grads = [_scaled(ct_loss, dh), _scaled(ct_loss, dw), _scaled(ct_loss, db)]
  if not isinstance(ct_sums, SymbolicZero):
    # The sums were differentiated too: one more (recomputing) gradient pass.
    ct_sums = _core.whole_cotangent(ct_sums, plan.opts, plan.cotangents_split)
    span_mask = seq_res[4]
    if plan.num_segments:
      scale = _segment_scale(ct_sums, span_mask, segment_ids, plan.num_segments)
    else:
      scale = _per_sample_scale(ct_sums, span_mask)
    extra = _grads(passes, plan, seq_res, scale)
    grads = [_add(g, e) for g, e in zip(grads, extra, strict=True)]
  return (*grads, None, None, None)


loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- per-token entry
#
# Per-token outputs ``[B, T]`` (NLL, and the entropy with ``plan.entropy``) with per-token
# cotangents: the backward turns them into the compacted per-token scales of the gradient
# pass.  The per-segment entry is a (plain, differentiable) segment sum of these.


def _token_outputs(bt: Compacted, stats_c, loss_c, span_mask):
  mask = _core.mask_to_bool(span_mask)
  tok = jnp.where(mask, bt.uncompact(loss_c).reshape(mask.shape), 0.0)
  if not bt.plan.entropy:
    return tok
  ent = jnp.where(mask, bt.uncompact(bt.entropy(stats_c)).reshape(mask.shape), 0.0)
  return tok, ent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def tokens(passes, plan, hidden, weight, bias, targets, span_mask):
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  stats_c, loss_c = passes.stats_pass(bt)
  return _token_outputs(bt, stats_c, loss_c, span_mask)


def _tokens_fwd(passes, plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  args = [_primal(x) for x in (hidden, weight, bias, targets, span_mask)]
  bt = Compacted(plan, *args)
  stats_c, loss_c, carry = _forward(passes, plan, bt, need)
  return _token_outputs(bt, stats_c, loss_c, args[4]), (*args, stats_c, need, carry)


def _tokens_bwd(passes, plan, res, cts):
  hidden, weight, bias, targets, span_mask, stats_c, need, carry = res
  cts = cts if plan.entropy else (cts, None)
  cts = [None if (c is None or isinstance(c, SymbolicZero)) else c for c in cts]
  if all(c is None for c in cts):
    return (None,) * 5
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  mask = _core.mask_to_bool(span_mask)

  def compacted(ct):
    ct = _core.whole_cotangent(ct, plan.opts, plan.cotangents_split)
    return bt.compact(jnp.where(mask, ct.astype(F32), 0.0).reshape(-1))

  scale_c = bt.compact(jnp.zeros(mask.size, F32)) if cts[0] is None else compacted(cts[0])
  ent_c = None if cts[1] is None else compacted(cts[1])
  need = tuple(x is not None for x in need)
  dh_c, dw, db = _grad_pass(passes, bt, scale_c, stats_c, need, ent_c, carry)
  return (*compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias), None, None)


tokens.defvjp(_tokens_fwd, _tokens_bwd, symbolic_zeros=True)


sequence, loss, tokens = reverse_only(sequence), reverse_only(loss), reverse_only(tokens)


# ----------------------------------------------------------------------------- calling them

#: The rules jitted with the kernel and plan static: what a ``shard_map`` body that runs
#: eagerly calls (see :func:`call`).
_JITTED = {}


def call(fn, passes, plan, *args):
  """``fn(passes, plan, *args)``; inside a ``shard_map`` through ``jax.jit`` (kernel and plan
  static).  An eager ``shard_map`` body runs each operation on its own and cannot run a
  ``custom_vjp`` with symbolic zeros; a jitted call is one operation it can run (under an
  outer ``jax.jit`` the inner one is inlined: no cost)."""
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return fn(passes, plan, *args)
  if fn not in _JITTED:
    _JITTED[fn] = jax.jit(fn, static_argnums=(0, 1))
  return _JITTED[fn](passes, plan, *args)


def vary_alike(call_, extra=()):
  """The call's arrays (and ``extra`` ones: segment ids), marked under ``shard_map`` by
  :func:`jaxnll.fused.compact.vary_alike`."""
  arrays = compact.vary_alike(*call_.arrays, vocab_axis=call_.opts.vocab_axis)
  return (*arrays, *extra)
