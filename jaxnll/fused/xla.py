"""The materialised implementations, ``"xla"`` and ``"reference"``: the float32 ``[B, T, V]``
logits built (as the fused kernels compute them), then the losses from logits.

``"xla"`` hands the logits to :mod:`jaxnll.nll` (what XLA makes of the plain program; what
the tests compare the fused kernels against); ``"reference"`` scores them itself (soft-cap,
temperature) and hands them to :mod:`jaxnll.reference` (float32 log-softmax).  Both satisfy
:class:`jaxnll.fused.kernel.Kernel` and differentiate through JAX's autodiff of those
losses and of ``_head``, the matmul with the fused kernels' dtypes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxnll import _core, nll, reference
from jaxnll._core import F32
from jaxnll.fused import compact
from jaxnll.fused.compact import reverse_only
from jaxnll.fused.kernel import Call


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head(hidden, weight, bias, vd, vmas):
  """float32 logits ``hidden @ weight (+ bias)`` of the materialised paths, as the fused
  kernels compute them: operands in ``result_type(hidden, weight)``, float32 accumulation
  and result (a bf16 head scored in bf16 loses two digits of every logit).  ``vmas``: the
  mesh axes each operand varies along (:func:`_vma`), which its gradient must match."""
  return _head_fwd(hidden, weight, bias, vd, vmas)[0]


def _vma(x) -> frozenset:
  """The mesh axes ``x`` varies along inside ``shard_map`` with ``check_vma`` (else none)."""
  return frozenset() if x is None else frozenset(compact.varying_axes(x))


def _head_fwd(hidden, weight, bias, vd, vmas):
  del vmas
  cdt = jnp.result_type(hidden.dtype, weight.dtype)
  spec = "btd,vd->btv" if vd else "btd,dv->btv"
  z = jnp.einsum(spec, hidden.astype(cdt), weight.astype(cdt), preferred_element_type=F32)
  if bias is not None:
    z = z + bias.astype(F32)[None, None, :]
  return z, (hidden, weight, bias)


def _head_bwd(vd, vmas, res, g):
  """The matmul's gradients with the fused kernels' dtypes (``∂z`` cast to the matmul dtype,
  float32 accumulation); a row of ``∂z`` that is all zero (a sample whose loss has a zero
  cotangent, a context position) keeps its hidden state out of the weight gradient, so NaN
  there cannot turn ``0`` into ``NaN · 0``."""
  hidden, weight, bias = res
  cdt = jnp.result_type(hidden.dtype, weight.dtype)
  live = jnp.any(g != 0, axis=-1, keepdims=True)
  gq = g.astype(cdt)
  h = jnp.where(live, hidden, jnp.zeros((), hidden.dtype)).astype(cdt)
  w = weight.astype(cdt)
  dh = jnp.einsum("btv,vd->btd" if vd else "btv,dv->btd", gq, w, preferred_element_type=F32)
  dw = jnp.einsum("btv,btd->vd" if vd else "btd,btv->dv", *((gq, h) if vd else (h, gq)),
                  preferred_element_type=F32)  # fmt: skip
  db = None if bias is None else jnp.sum(g, axis=(0, 1)).astype(bias.dtype)
  grads = (dh, dw, db)
  return tuple(_invariant_like(d, x, v) for d, x, v in zip(grads, res, vmas, strict=True))


def _invariant_like(grad, primal, vma):
  """``grad`` in ``primal``'s dtype, summed over every mesh axis it varies along and the
  primal (whose axes are ``vma``) does not: inside a ``shard_map`` with ``check_vma``, hidden
  states replicated over a vocabulary axis the head is split along get the sum of each
  shard's part."""
  if grad is None:
    return None
  extra = tuple(sorted(_vma(grad) - vma))
  if extra:
    grad = jax.lax.psum(grad, extra)
  return grad.astype(primal.dtype)


_head.defvjp(_head_fwd, _head_bwd)
_head = reverse_only(_head)  # the plain path's gated matmul: reverse mode too


class Materialised:
  """The :class:`~jaxnll.fused.kernel.Kernel` that builds the logits: ``name`` is ``"xla"``
  (:mod:`jaxnll.nll`) or ``"reference"`` (:mod:`jaxnll.reference`)."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"Materialised({self.name!r})"

  def logits(self, call: Call):
    """``(logits, lib, token_opts)``: float32 logits as in the fused kernels (:func:`_head`:
    so ``"xla"`` gives their numbers at bf16 / f16 too).  Hidden rows outside the span are
    zeroed (a select) before the matmul, so NaN/inf there reaches neither a value nor the
    weight gradient (``hᵀ·∂z`` would turn ``NaN · 0`` into NaN); inside the span, a row whose
    loss gets a zero cotangent is kept out of the weight gradient by :func:`_head`'s
    backward."""
    opts, hidden, weight, bias = call.opts, call.hidden, call.weight, call.bias
    inside = _core.mask_to_bool(call.span_mask)[..., None]
    hidden = jnp.where(inside, hidden, jnp.zeros((), hidden.dtype))
    vmas = (_vma(hidden), _vma(weight), _vma(bias))
    logits = _head(hidden, weight, bias, call.weight_layout == "vd", vmas)
    if self.name == "reference":
      if opts.vocab_axis is not None or opts.vocab_size is not None:
        raise ValueError(
          'implementation="reference" takes no vocab_axis / vocab_size; use implementation="xla"'
        )
      if opts.logit_softcap is not None:
        logits = opts.logit_softcap * jnp.tanh(logits / opts.logit_softcap)
      logits = logits / opts.temperature
      return logits, reference, dict(z_loss=opts.z_loss, label_smoothing=opts.label_smoothing)
    return logits, nll, dataclasses.asdict(opts)

  def sequence(self, call: Call, *, reduction: str):
    logits, lib, kw = self.logits(call)
    return lib.sequence_nll(logits, call.targets, call.span_mask, reduction=reduction, **kw)

  def loss(self, call: Call, *, normalize, schedule, segment_ids=None, num_segments=None):
    del schedule  # the logits are built once either way
    logits, lib, kw = self.logits(call)
    sums = lib.sequence_nll(logits, call.targets, call.span_mask, reduction="sum", **kw)
    value = nll.batch_loss(sums, compact.counts(call.span_mask), normalize=normalize)
    if segment_ids is not None:
      sums = lib.segment_nll(
        logits, call.targets, call.span_mask, segment_ids, num_segments=num_segments, **kw
      )
    return value, sums

  def tokens(self, call: Call, *, entropy: bool):
    logits, lib, kw = self.logits(call)
    mask = _core.mask_to_bool(call.span_mask)
    tok = jnp.where(mask, lib.token_nll(logits, jnp.where(mask, call.targets, 0), **kw), 0.0)
    if not entropy:
      return tok
    return tok, self.entropy(logits, mask, call.opts)

  def segments(self, call: Call, segment_ids, *, num_segments: int, reduction: str):
    logits, lib, kw = self.logits(call)
    return lib.segment_nll(
      logits, call.targets, call.span_mask, segment_ids, num_segments=num_segments,
      reduction=reduction, **kw,
    )  # fmt: skip

  def entropy(self, logits, mask, opts):
    """Entropy of ``softmax(z)`` per position of materialised logits (0 outside ``mask``)."""
    if opts.vocab_axis is not None:
      raise ValueError(
        'return_entropy with vocab_axis needs a fused implementation (implementation="chunked")'
      )
    z = logits if self.name == "reference" else _core.softcap(logits, opts)
    z = jnp.where(mask[..., None], z, 0.0)
    logp = jax.nn.log_softmax(z, axis=-1)
    live = logp > -jnp.inf  # a -inf logit has p = 0 and adds nothing (no 0 · inf NaN)
    logp = jnp.where(live, logp, 0.0)
    ent = -jnp.sum(jnp.where(live, jnp.exp(logp) * logp, 0.0), axis=-1)
    return jnp.where(mask, ent, 0.0)


XLA = Materialised("xla")
REFERENCE = Materialised("reference")
