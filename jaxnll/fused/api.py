"""The language-model head fused with the sub-sequence loss: no ``[B, T, V]`` logits, and work
that follows the number of *target* tokens.

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary,
``N = B·T`` flattened positions, ``C`` token chunk, ``K`` vocabulary chunk.

With ``hidden: [B, T, D]`` and the head ``weight: [D, V]`` (Flax ``Linear`` kernel layout,
optional ``bias: [V]``) the logits are ``x = hidden @ weight + bias``, and

.. math::

   L_b = \\sum_t w_{b,t}\\, \\ell(x_{b,t}, y_{b,t}),

with ``ℓ`` the per-token loss of :func:`jaxnll.token_nll` (same ``z_loss``, ``label_smoothing``
and ``logit_softcap``).  In fine-tuning most positions are context whose loss is masked, and
the logits are the largest tensor of the step (16k tokens × 128k vocabulary is 8 GB in f32).
The kernels here therefore

* **compact** the target positions: a stable sort of the span mask over the flattened ``B·T``
  positions puts every target token first (static shapes), and the token loops run for
  ``ceil(n_targets / C)`` chunks only (a ``while`` loop bounded at run time), so the cost of a
  half-context batch is about half;
* **never store logits**: the forward keeps one float32 log-sum-exp per target token, computed
  chunk by chunk with an online log-sum-exp over vocabulary chunks; the backward recomputes a
  ``[C, K]`` block of logits at a time;
* **accumulate in float32**: every matmul accumulates in f32; the weight gradient is built one
  vocabulary chunk at a time (token loop inside), so it is summed over all token chunks in an
  f32 ``[D, K]`` buffer and cast once — no ``[D, V]`` f32 buffer for bf16 weights.

:func:`linear_sequence_nll` returns per-sample losses and differentiates through a
``custom_vjp`` (forward: one matmul per target token; backward: three).
:func:`linear_nll_loss` returns the scalar batch loss; its forward rule computes the gradients
while each logits block is hot (the fused linear-cross-entropy trick), so forward + backward
costs three matmuls over the target tokens (``schedule="one_pass"``, the default for f32
weights), like the unfused path over all tokens, or four with only chunk-sized f32 buffers
(``"two_pass"``, the default for 16-bit weights).  A gradient nobody asks for (a frozen head)
costs no matmul in either entry.

Reference: T. Xiao and J. Zhu, *Foundations of Large Language Models*, ch. 2-4; the chunked
head follows Liger's fused linear cross-entropy, Cut Cross-Entropy (Wijmans et al., 2024) and
tokamax's ``linear_softmax_cross_entropy_loss``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core, nll, reference
from jaxnll._core import F32, TokenOptions
from jaxnll.checks import check_fused_inputs as check_inputs  # noqa: F401 (public name)
from jaxnll.fused import auto, chunked, compact, pallas_tpu, token_chunked
from jaxnll.fused.compact import Compacted, Plan, reverse_only, safe_inverse

#: ``"xla"``: the float32 logits materialised (as the fused kernels compute them, so the same
#: numbers at bf16 / f16), then :func:`jaxnll.sequence_nll` (what XLA makes of the plain
#: program); ``"reference"``: :mod:`jaxnll.reference` (float32 log-softmax, for tests).
#: ``"auto"`` picks per platform at lowering time (:mod:`jaxnll.fused.auto`).
IMPLEMENTATIONS = ("auto", "chunked", "token_chunked", "pallas_tpu", "xla", "reference")
SCHEDULES = ("auto", "one_pass", "two_pass")

#: Target tokens per chunk (rows of a logits block).  A multiple of 8 keeps matmul tiles full.
DEFAULT_TOKEN_CHUNK = 512
#: Vocabulary columns per chunk.  ``[C, K]`` f32 = 4 MiB at the defaults.
DEFAULT_VOCAB_CHUNK = 2048
#: With 16-bit weights and the default ``vocab_chunk``, the gradient pass widens its chunks to
#: about this many bytes of f32 ``[D, K]`` weight-gradient accumulator (4096 columns at
#: ``D = 4096``).  The weight gradient is written once per chunk, and XLA's CPU backend, which
#: has no in-place bf16 update, rewrites the whole ``[D, V]`` gradient each time: fewer, wider
#: chunks keep that cost small (on other backends it is merely harmless).
WEIGHT_GRAD_CHUNK_BYTES = 64 * 2**20
#: ``one_pass`` keeps a whole ``[C, V]`` f32 row block; ``C`` is capped so that block stays
#: under this many bytes (128 tokens at a 128k vocabulary).
ONE_PASS_BLOCK_BYTES = 64 * 2**20


#: The kernels behind ``implementation=``: each module has ``stats_pass``, ``grad_pass`` and
#: ``one_pass`` over a :class:`~jaxnll.fused.compact.Compacted` batch.
KERNELS = {
  "chunked": chunked,
  "token_chunked": token_chunked,
  "pallas_tpu": pallas_tpu,
  "auto": auto,
}


def _kernel(plan: Plan):
  return KERNELS[plan.implementation]


def _sequence_value(plan, hidden, weight, bias, targets, span_mask):
  impl = _kernel(plan)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  stats_c, loss_c = impl.stats_pass(bt)
  sums = compact.per_sample(bt, loss_c, span_mask)
  if plan.reduction == "mean":
    sums = sums * safe_inverse(compact.counts(span_mask))
  return sums, stats_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sequence(plan, hidden, weight, bias, targets, span_mask):
  return _sequence_value(plan, hidden, weight, bias, targets, span_mask)[0]


def _primal(x):
  return x.value if isinstance(x, CustomVJPPrimal) else x


def _needed(hidden, weight, bias):
  """Which of (hidden, weight, bias) are differentiated, as residual-safe pytree structure
  (``()`` yes, ``None`` no: static, unlike a bool leaf)."""
  return tuple(
    () if isinstance(x, CustomVJPPrimal) and x.perturbed else None for x in (hidden, weight, bias)
  )


def _sequence_fwd(plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  args = [_primal(x) for x in (hidden, weight, bias, targets, span_mask)]
  out, stats_c = _sequence_value(plan, *args)
  # Residuals: the inputs (already live) and the f32 row max and sum of exponentials per
  # position (the exact softmax is rebuilt from them, not from a rounded log-sum-exp).
  return out, (*args, stats_c, need)


def _sequence_grads(plan, res, per_sample):
  """Gradients of ``Σ_b per_sample[b] · Σ_t w_t ℓ_t`` (hidden, weight, bias)."""
  hidden, weight, bias, targets, span_mask, stats_c, need = res
  need = tuple(x is not None for x in need)
  impl = _kernel(plan)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  scale_c = compact.compact_scale(bt, per_sample, span_mask)
  dh_c, dw, db = impl.grad_pass(bt, scale_c, stats_c, need)
  return compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)


def _sequence_bwd(plan, res, ct):
  if isinstance(ct, SymbolicZero):
    return (None,) * 5
  span_mask = res[4]
  ct = _core.whole_cotangent(ct, plan.opts, plan.cotangents_split)
  if plan.reduction == "mean":
    ct = ct * safe_inverse(compact.counts(span_mask))
  dh, dw, db = _sequence_grads(plan, res, ct)
  return dh, dw, db, None, None


_sequence.defvjp(_sequence_fwd, _sequence_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- scalar entry


def _batch_weights(sums, counts, normalize):
  """``∂ loss / ∂ sums[b]``: the batch loss is linear in the per-sample sums."""
  return jax.grad(lambda s: nll.batch_loss(s, counts, normalize=normalize))(sums)


def _batch_value(sums, counts, normalize):
  return nll.batch_loss(sums, counts, normalize=normalize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(plan, hidden, weight, bias, targets, span_mask):
  sums, _ = _sequence_value(plan, hidden, weight, bias, targets, span_mask)
  return _batch_value(sums, compact.counts(span_mask), plan.normalize), sums


def _loss_fwd(plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  wanted = tuple(x is not None for x in need)
  hidden, weight, bias, targets, span_mask = (
    _primal(x) for x in (hidden, weight, bias, targets, span_mask)
  )
  counts = compact.counts(span_mask)
  # Which tokens get which weight is known before any logit: the gradient can be built in the
  # same pass as the loss.
  per_sample = _batch_weights(jnp.zeros_like(counts), counts, plan.normalize)
  impl = _kernel(plan)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  scale_c = compact.compact_scale(bt, per_sample, span_mask)
  if plan.one_pass:
    stats_c, loss_c, dh_c, dw, db = impl.one_pass(bt, scale_c, wanted)
  else:
    stats_c, loss_c = impl.stats_pass(bt)
    dh_c, dw, db = impl.grad_pass(bt, scale_c, stats_c, wanted)
  grads = compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)
  sums = compact.per_sample(bt, loss_c, span_mask)
  loss = _batch_value(sums, counts, plan.normalize)
  return (loss, sums), (grads, (hidden, weight, bias, targets, span_mask, stats_c, need))


def _scaled(ct, g):
  return None if g is None else (ct * g.astype(F32)).astype(g.dtype)


def _add(a, b):
  if a is None or b is None:
    return b if a is None else a
  return (a.astype(F32) + b.astype(F32)).astype(a.dtype)


def _loss_bwd(plan, res, cts):
  (dh, dw, db), seq_res = res
  ct_loss, ct_sums = cts
  if isinstance(ct_loss, SymbolicZero):
    grads = [None, None, None]
  else:
    ct_loss = _core.whole_cotangent(ct_loss, plan.opts, plan.cotangents_split)
    grads = [_scaled(ct_loss, dh), _scaled(ct_loss, dw), _scaled(ct_loss, db)]
  if not isinstance(ct_sums, SymbolicZero):
    # The per-sample sums were differentiated too: one more (recomputing) gradient pass.
    ct_sums = _core.whole_cotangent(ct_sums, plan.opts, plan.cotangents_split)
    extra = _sequence_grads(plan, seq_res, ct_sums)
    grads = [_add(g, e) for g, e in zip(grads, extra, strict=True)]
  return (*grads, None, None)


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- per-token entry
#
# Per-token outputs ``[B, T]`` (NLL, and the entropy with ``plan.entropy``) with per-token
# cotangents: the backward turns them into the compacted per-token scales of the gradient
# pass.  The per-segment entry is a (plain, differentiable) segment sum of these.


def _token_outputs(bt: Compacted, stats_c, loss_c, span_mask):
  mask = _core.mask_to_bool(span_mask)
  nll = jnp.where(mask, bt.uncompact(loss_c).reshape(mask.shape), 0.0)
  if not bt.plan.entropy:
    return nll
  ent = jnp.where(mask, bt.uncompact(bt.entropy(stats_c)).reshape(mask.shape), 0.0)
  return nll, ent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tokens(plan, hidden, weight, bias, targets, span_mask):
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  stats_c, loss_c = _kernel(plan).stats_pass(bt)
  return _token_outputs(bt, stats_c, loss_c, span_mask)


def _tokens_fwd(plan, hidden, weight, bias, targets, span_mask):
  need = _needed(hidden, weight, bias)
  args = [_primal(x) for x in (hidden, weight, bias, targets, span_mask)]
  bt = Compacted(plan, *args)
  stats_c, loss_c = _kernel(plan).stats_pass(bt)
  return _token_outputs(bt, stats_c, loss_c, args[4]), (*args, stats_c, need)


def _tokens_bwd(plan, res, cts):
  hidden, weight, bias, targets, span_mask, stats_c, need = res
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
  dh_c, dw, db = _kernel(plan).grad_pass(bt, scale_c, stats_c, need, ent_c)
  return (*compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias), None, None)


_tokens.defvjp(_tokens_fwd, _tokens_bwd, symbolic_zeros=True)


_sequence, _loss, _tokens = reverse_only(_sequence), reverse_only(_loss), reverse_only(_tokens)


# ----------------------------------------------------------------------------- public API

#: The kernels' ``custom_vjp`` functions, jitted with the plan static: what a ``shard_map``
#: body that runs eagerly calls (see :func:`_call`).
_JITTED = {}


def _call(fn, plan: Plan, *args):
  """``fn(plan, *args)`` of a kernel's ``custom_vjp``; inside a ``shard_map`` through
  ``jax.jit`` (the plan static).  An eager ``shard_map`` body runs each operation on its own
  and cannot run a ``custom_vjp`` with symbolic zeros; a jitted call is one operation it can
  run (under an outer ``jax.jit`` the inner one is inlined: no cost)."""
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return fn(plan, *args)
  if fn not in _JITTED:
    _JITTED[fn] = jax.jit(fn, static_argnums=0)
  return _JITTED[fn](plan, *args)


#: ``weight_layout=``: ``"dv"`` a ``[D, V]`` head kernel (Flax ``Linear``), ``"vd"`` a
#: ``[V, D]`` table (an embedding, as tied heads use) read in place, without a transposed copy.
LAYOUTS = ("dv", "vd")


def _vocab_axis_of(weight_layout: str) -> int:
  return 0 if weight_layout == "vd" else 1


def _check(hidden, weight, targets, span_mask, bias, weight_layout="dv"):
  """Checks the arrays and returns them as arrays (Python lists converted; targets as int32
  with every id outside ``[0, 2**31)`` at ``-1``, so no wider id wraps to a valid one)."""
  _core.check_choice("weight_layout", weight_layout, LAYOUTS)
  hidden, weight = _core.as_array("hidden", hidden), _core.as_array("weight", weight)
  targets, span_mask = _core.as_array("targets", targets), _core.as_array("span_mask", span_mask)
  bias = None if bias is None else _core.as_array("bias", bias)
  vd = weight_layout == "vd"
  spec = "[V, D]" if vd else "[D, V]"
  _core.check_floating("hidden", hidden)
  _core.check_floating("weight", weight)
  _core.check_integer("targets", targets)
  _core.check_mask("span_mask", span_mask)
  _core.check_rank("hidden", hidden, (3,), "[B, T, D]")
  _core.check_rank("weight", weight, (2,), spec)
  hs, ws = jnp.shape(hidden), jnp.shape(weight)
  d, v = (ws[1], ws[0]) if vd else ws
  if hs[2] != d:
    raise ValueError(
      f"weight must have shape {spec} with D = hidden.shape[-1] = {hs[2]}, "
      f"got hidden {hs} and weight {ws} (weight_layout={weight_layout!r})"
    )
  for name, x in (("targets", targets), ("span_mask", span_mask)):
    if jnp.shape(x) != hs[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hs[:2]}, got shape {jnp.shape(x)}")
  if bias is not None:
    _core.check_floating("bias", bias)
    if jnp.shape(bias) != (v,):
      raise ValueError(f"bias must have shape [V] = {(v,)}, got shape {jnp.shape(bias)}")
  _core.check_vocab("weight", v, ws)
  hidden, weight, span_mask = map(jnp.asarray, (hidden, weight, span_mask))
  bias = None if bias is None else jnp.asarray(bias)
  return hidden, weight, _core.int32_ids(targets), span_mask, bias


def _chunks(token_chunk, vocab_chunk, num_tokens, weight, weight_layout="dv"):
  """``(token_chunk, vocab_chunk, grad_vocab_chunk)`` after defaults and clipping."""
  for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive Python int or None, got {value!r}")
  d, vocab = weight.shape[::-1] if weight_layout == "vd" else weight.shape
  tc = DEFAULT_TOKEN_CHUNK if token_chunk is None else token_chunk
  vc = max(1, min(DEFAULT_VOCAB_CHUNK if vocab_chunk is None else vocab_chunk, vocab))
  gc = vc
  if vocab_chunk is None and jnp.dtype(weight.dtype).itemsize < 4:
    gc = min(vocab, max(vc, WEIGHT_GRAD_CHUNK_BYTES // (4 * d) // vc * vc))
  return max(1, min(tc, num_tokens)), vc, gc


def _setup(hidden, weight, targets, span_mask, bias, implementation, weight_layout, **token):
  """Checked arguments as arrays and their :class:`TokenOptions` (shared by every entry)."""
  arrays = _check(hidden, weight, targets, span_mask, bias, weight_layout)
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  return arrays, TokenOptions(**token)


def _is_empty(hidden) -> bool:
  """No position at all (``B = 0`` or ``T = 0``): the entries return zeros (zero gradients)."""
  return hidden.shape[0] * hidden.shape[1] == 0


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


def _materialised(implementation, hidden, weight, bias, span_mask, opts, weight_layout):
  """``(logits, lib, token_opts)`` of the paths that build the ``[B, T, V]`` logits.

  The logits are float32, as in the fused kernels (:func:`_head`: so ``"xla"`` gives their
  numbers at bf16 / f16 too).  Hidden rows outside the span are zeroed (a select) before the
  matmul, so NaN/inf there reaches neither a value nor the weight gradient (``hᵀ·∂z`` would
  turn ``NaN · 0`` into NaN); inside the span, a row whose loss gets a zero cotangent is kept
  out of the weight gradient by :func:`_head`'s backward.  ``"xla"`` hands the logits to
  :mod:`jaxnll.nll`; ``"reference"`` scores them itself (soft-cap, temperature) and hands
  them to :mod:`jaxnll.reference`.
  """
  inside = _core.mask_to_bool(span_mask)[..., None]
  hidden = jnp.where(inside, hidden, jnp.zeros((), hidden.dtype))
  vmas = (_vma(hidden), _vma(weight), _vma(bias))
  logits = _head(hidden, weight, bias, weight_layout == "vd", vmas)
  if implementation == "reference":
    if opts.vocab_axis is not None or opts.vocab_size is not None:
      raise ValueError(
        'implementation="reference" takes no vocab_axis / vocab_size; use implementation="xla"'
      )
    if opts.logit_softcap is not None:
      logits = opts.logit_softcap * jnp.tanh(logits / opts.logit_softcap)
    logits = logits / opts.temperature
    return logits, reference, dict(z_loss=opts.z_loss, label_smoothing=opts.label_smoothing)
  return logits, nll, dataclasses.asdict(opts)


def _plain_entropy(logits, mask, opts, implementation):
  """Entropy of ``softmax(z)`` per position of materialised logits (0 outside ``mask``)."""
  if opts.vocab_axis is not None:
    raise ValueError(
      'return_entropy with vocab_axis needs a fused implementation (implementation="chunked")'
    )
  z = logits if implementation == "reference" else _core.softcap(logits, opts)
  z = jnp.where(mask[..., None], z, 0.0)
  logp = jax.nn.log_softmax(z, axis=-1)
  live = logp > -jnp.inf  # a -inf logit has p = 0 and adds nothing (no 0 · inf NaN)
  logp = jnp.where(live, logp, 0.0)
  ent = -jnp.sum(jnp.where(live, jnp.exp(logp) * logp, 0.0), axis=-1)
  return jnp.where(mask, ent, 0.0)


def _plan(
  implementation,
  opts,
  hidden,
  weight,
  token_chunk,
  vocab_chunk,
  weight_layout,
  *,
  schedule=None,
  **fields,
) -> Plan:
  """The static plan of one call of a kernel of :data:`KERNELS` (``schedule``: the scalar
  entry's, None for the others).  ``"auto"`` carries one plan per platform."""
  args = (opts, hidden, weight, token_chunk, vocab_chunk, weight_layout)
  if implementation == "auto":
    branches = tuple(_plan(name, *args, schedule=schedule, **fields) for name in auto.BRANCHES)
    return auto.plan(branches, one_pass=schedule is not None)
  b, t, _ = hidden.shape
  num_tokens = b * t
  vocab = weight.shape[_vocab_axis_of(weight_layout)]
  one_pass = False
  if schedule is not None and implementation == "chunked":
    one_pass = schedule == "one_pass" or (schedule == "auto" and weight.dtype == F32)
    if one_pass and token_chunk is None:
      cap = ONE_PASS_BLOCK_BYTES // (4 * vocab)
      token_chunk = max(8, min(DEFAULT_TOKEN_CHUNK, cap) // 8 * 8)
  elif schedule is not None:
    # Blocks of whole vocabulary rows: the gradients come from the block the loss used.
    one_pass = schedule != "two_pass"
  tc, vc, gc = _chunks(token_chunk, vocab_chunk, num_tokens, weight, weight_layout)
  plan = Plan(
    opts,
    tc,
    vc,
    one_pass=one_pass,
    grad_vocab_chunk=gc,
    implementation=implementation,
    weight_layout=weight_layout,
    cotangents_split=_core.cotangents_split(opts),
    **fields,
  )
  configure = getattr(KERNELS[implementation], "configure", None)
  if configure is not None:
    plan = configure(plan, token_chunk, vocab_chunk, num_tokens, vocab)
  rows = -(-num_tokens // plan.token_chunk) * plan.token_chunk
  return dataclasses.replace(plan, padded_rows=max(plan.padded_rows, rows))


def linear_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  bias: Float[Array, " V"] | None = None,
  reduction: str = "sum",
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  temperature: float = 1.0,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  weight_layout: Literal["dv", "vd"] = "dv",
  implementation: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> Float[Array, " B"]:
  """Per-sample NLL of the target span through the LM head, without the ``[B, T, V]`` logits.

  Equal, in value and in gradients with respect to ``hidden``, ``weight`` and ``bias``, to

  .. math::

     L_b = \\sum_t w_{b,t}\\, \\ell(h_{b,t} W + \\beta,\\; y_{b,t})
     \\quad = \\texttt{sequence\\_nll(hidden @ weight + bias, targets, span\\_mask)},

  but only target positions are computed: the cost grows with the number of target tokens,
  not ``B·T``.  The forward keeps the float32 row max and sum of exponentials per target
  token (the backward rebuilds the exact softmax from them, ``exp(z - m) / s``); the backward
  recomputes the logits a ``[C, K]`` block at a time (one matmul forward, three backward).

  Args:
    hidden: ``[B, T, D]`` final hidden states, any floating dtype.
    weight: ``[D, V]`` head kernel (Flax ``Linear`` layout), or with ``weight_layout="vd"`` a
      ``[V, D]`` table (an embedding, as tied heads use), any floating dtype.  Matmuls run
      in ``result_type(hidden, weight)`` and accumulate in float32.
    targets: ``[B, T]`` integer ids, already shifted (:func:`jaxnll.shift_targets`); only read
      inside the span.  An id outside ``[0, V)`` inside the span makes that sample NaN
      (:func:`checked` raises a clear error instead).
    span_mask: ``[B, T]`` bool mask or float weights of the target positions.  Positions
      outside it are never read: NaN/inf hidden states there reach no value or gradient.  Float
      weights get no gradient.
    bias: optional ``[V]`` head bias.
    reduction: ``"sum"`` (``-log Pr(y|x)``) or ``"mean"`` (per target token; 0 if empty).
    z_loss, label_smoothing, logit_softcap, temperature: as in :func:`jaxnll.token_nll`
      (``temperature=τ`` scores ``logits / τ`` after the soft-cap).
    vocab_axis: inside ``shard_map``, the mesh axis over which the vocabulary is sharded:
      ``weight`` (and ``bias``) are then the local columns (shard ``i`` holding ids
      ``[i·V, (i+1)·V)``), each device computes only its slice, the per-token log-sum-exp
      and target logit are combined with collectives (Megatron-style vocabulary-parallel
      cross-entropy) and the result is the full-vocabulary loss, replicated over the axis.
      ``hidden``, ``targets`` and ``span_mask`` are the same on every shard of the axis; the
      gradient for ``hidden`` is summed over the shards.  :mod:`jaxnll.parallel` builds the
      ``shard_map`` for a given mesh.
    vocab_size: the true vocabulary when the (sharded) columns are padded, for example to a
      multiple of the shard count; padding columns never count.
    weight_layout: ``"dv"`` (``weight: [D, V]``) or ``"vd"`` (``weight: [V, D]``, read in
      place: row blocks contracted on ``D``, no transposed copy; its gradient is ``[V, D]``).
    implementation: ``"auto"`` (default: the kernel of the platform the function is lowered
      for — TPU ``"pallas_tpu"``, GPU ``"token_chunked"``, otherwise ``"chunked"``, chosen by
      :func:`jax.lax.platform_dependent`), ``"chunked"`` (token × vocabulary blocks),
      ``"token_chunked"`` (token blocks, full-vocabulary matmuls:
      :mod:`jaxnll.fused.token_chunked`), ``"pallas_tpu"`` (Pallas Mosaic kernels, interpret
      mode off TPU: :mod:`jaxnll.fused.pallas_tpu`), ``"xla"`` (materialise the logits and call
      :func:`jaxnll.sequence_nll`) or ``"reference"`` (:mod:`jaxnll.reference` on float32
      logits).  The materialised paths zero the hidden rows outside the span first, so
      NaN/inf there reaches no gradient either.  ``B = 0`` or ``T = 0`` gives zeros.
    token_chunk: target tokens per block, default :data:`DEFAULT_TOKEN_CHUNK` (512; for
      ``"token_chunked"`` set by :data:`jaxnll.fused.token_chunked.LOGITS_BLOCK_BYTES`, for
      ``"pallas_tpu"`` the row block, 256).  The skipping granularity: a batch with ``n``
      targets runs ``ceil(n / token_chunk)`` blocks.
    vocab_chunk: vocabulary columns per block, default :data:`DEFAULT_VOCAB_CHUNK` (2048;
      with 16-bit weights the backward widens the default, see
      :data:`WEIGHT_GRAD_CHUNK_BYTES`).  Neither chunk needs to divide ``B·T`` or ``V``.

  Returns:
    float32 ``[B]``; gradients come back in the inputs' dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y = jnp.ones((2, 5), int)
    >>> span = jnp.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    >>> fused = linear_sequence_nll(h, w, y, span, token_chunk=2, vocab_chunk=4)
    >>> plain = linear_sequence_nll(h, w, y, span, implementation="xla")
    >>> bool(jnp.allclose(fused, plain, rtol=1e-5)), float(fused[1])
    (True, 0.0)
  """
  _core.check_choice("reduction", reduction, ("sum", "mean"))
  (hidden, weight, targets, span_mask, bias), opts = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout,
    z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if _is_empty(hidden):
    return jnp.zeros(hidden.shape[:1], F32)
  if implementation in ("xla", "reference"):
    logits, lib, kw = _materialised(
      implementation, hidden, weight, bias, span_mask, opts, weight_layout
    )
    return lib.sequence_nll(logits, targets, span_mask, reduction=reduction, **kw)
  plan = _plan(
    implementation, opts, hidden, weight, token_chunk, vocab_chunk, weight_layout,
    reduction=reduction,
  )  # fmt: skip
  return _call(
    _sequence,
    plan,
    *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis),
  )


def linear_nll_loss(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  normalize: str = "tokens",
  bias: Float[Array, " V"] | None = None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  temperature: float = 1.0,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  weight_layout: Literal["dv", "vd"] = "dv",
  implementation: str = "auto",
  schedule: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, " B"]]:
  """The scalar training loss through the LM head, with the gradients built in the forward.

  ``loss = batch_loss(sums, counts, normalize=normalize)`` with
  ``sums = linear_sequence_nll(..., reduction="sum")`` and ``counts`` the span weight sums
  (see :func:`jaxnll.batch_loss`).  Because the loss is one scalar, the ``custom_vjp``
  forward rule computes ``∂loss/∂hidden``, ``∂loss/∂weight`` and ``∂loss/∂bias`` while each
  logits block is hot and the backward only scales them by the incoming cotangent.

  Schedules (``schedule=``):

  * ``"one_pass"``: each logits block is computed once — three matmuls over the target
    tokens, the same matmul work as the unfused path over target tokens.  It holds a
    ``[C, V]`` f32 block (``C`` capped by :data:`ONE_PASS_BLOCK_BYTES`) and sums the weight
    gradient over token chunks in one f32 ``[D, V]`` buffer.
  * ``"two_pass"``: a log-sum-exp pass then a gradient pass (four matmuls) with only
    ``[C, K]`` and ``[D, K]`` f32 blocks — for bf16 heads, where a ``[D, V]`` f32 buffer would
    be twice the weight.
  * ``"auto"`` (default): ``one_pass`` for float32 weights (its f32 buffer is the gradient
    itself), ``two_pass`` otherwise.

  The per-sample sums (aux output) are differentiable too: a non-zero cotangent for them
  (rare: ``has_aux`` passes none) costs one extra recomputing gradient pass.

  Args:
    hidden, weight, targets, span_mask, bias: as in :func:`linear_sequence_nll`.
    normalize: ``"tokens"`` (``Σ sums / Σ counts``, the default), ``"samples"`` (mean of
      per-sample means over non-empty samples) or ``"sum"``.
    z_loss, label_smoothing, logit_softcap, temperature: as in :func:`jaxnll.token_nll`.
    vocab_axis, vocab_size: vocabulary-parallel head, as in :func:`linear_sequence_nll`.
    weight_layout: ``"dv"`` or ``"vd"``, as in :func:`linear_sequence_nll`.
    implementation: as in :func:`linear_sequence_nll` (``"xla"`` and ``"reference"``
      materialise the logits, then :func:`jaxnll.batch_loss`).
    schedule: ``"auto"``, ``"one_pass"`` or ``"two_pass"`` (above).
    token_chunk, vocab_chunk: as in :func:`linear_sequence_nll`.

  Returns:
    ``(loss, sums)``: float32 scalar and float32 ``[B]`` per-sample sums.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((2, 5), int), jnp.ones((2, 5), bool)
    >>> f = lambda w: linear_nll_loss(h, w, y, span, token_chunk=4)
    >>> (loss, sums), g = jax.value_and_grad(f, has_aux=True)(w)
    >>> bool(jnp.isclose(loss, sums.sum() / 10)), g.shape
    (True, (8, 11))
  """
  _core.check_choice("normalize", normalize, nll.NORMALIZATIONS)
  _core.check_choice("schedule", schedule, SCHEDULES)
  (hidden, weight, targets, span_mask, bias), opts = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout,
    z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if _is_empty(hidden):
    return jnp.zeros((), F32), jnp.zeros(hidden.shape[:1], F32)
  if implementation in ("xla", "reference"):
    logits, lib, kw = _materialised(
      implementation, hidden, weight, bias, span_mask, opts, weight_layout
    )
    sums = lib.sequence_nll(logits, targets, span_mask, reduction="sum", **kw)
    return nll.batch_loss(sums, compact.counts(span_mask), normalize=normalize), sums
  plan = _plan(
    implementation, opts, hidden, weight, token_chunk, vocab_chunk, weight_layout,
    normalize=normalize, schedule=schedule,
  )  # fmt: skip
  return _call(
    _loss,
    plan,
    *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis),
  )


def linear_segment_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[Array, "B T"],
  *,
  num_segments: int,
  reduction: Literal["sum", "mean"] = "sum",
  bias: Float[Array, " V"] | None = None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  temperature: float = 1.0,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  weight_layout: Literal["dv", "vd"] = "dv",
  implementation: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> Float[Array, "B S"]:
  """Per-sample NLL of packed rows through the LM head: one value per segment, one pass.

  Equal (values and gradients) to
  ``segment_nll(hidden @ weight + bias, targets, span_mask, segment_ids, ...)``:

  .. math::

     L_{b,s} = \\sum_t [\\mathrm{seg}_{b,t} = s]\\, w_{b,t}\\, \\ell(h_{b,t} W + \\beta,
     \\; y_{b,t}) \\quad (\\text{"sum"}; \\text{"mean" divides by }
     \\textstyle\\sum_t [\\mathrm{seg}_{b,t} = s]\\, w_{b,t}, 0 \\text{ if empty}),

  computed in one span-compacted pass over the target tokens of every segment (no
  ``[B, T, V]`` logits); the per-token losses are summed by segment id.  Segment ``0`` is
  padding; samples are ids ``1..num_segments``, ``out[b, s - 1]`` being segment ``s`` of row
  ``b``.  Each ``(row, segment)`` output takes its own cotangent: the backward turns them into
  per-token scales of one recomputing gradient pass.

  Args:
    hidden: ``[B, T, D]`` final hidden states, any floating dtype.
    weight: ``[D, V]`` head kernel, or ``[V, D]`` with ``weight_layout="vd"``.
    targets: ``[B, T]`` integer ids, already shifted with
      ``shift_targets(tokens, span, segment_ids)`` so nothing is predicted across a boundary.
    span_mask: ``[B, T]`` bool mask or float weights of the target positions.
    segment_ids: ``[B, T]`` integer segment of each position (0: padding; ids above
      ``num_segments`` are ignored).
    num_segments: ``S``, the number of segment columns of the result (a Python int).
    reduction: ``"sum"`` or ``"mean"`` (per target token of the segment).
    options: ``bias``, ``z_loss``, ``label_smoothing``, ``logit_softcap``, ``temperature``,
      ``vocab_axis``, ``vocab_size``, ``weight_layout``, ``implementation``, ``token_chunk``,
      ``vocab_chunk`` (keywords) as in :func:`linear_sequence_nll`.

  Returns:
    float32 ``[B, num_segments]``; gradients come back in the inputs' dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (1, 6, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((1, 6), int), jnp.array([[0, 1, 1, 0, 1, 0]], bool)
    >>> seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    >>> per = linear_segment_nll(h, w, y, span, seg, num_segments=3)
    >>> whole = linear_sequence_nll(h, w, y, span)
    >>> per.shape, bool(jnp.isclose(per.sum(), whole[0])), float(per[0, 2])
    ((1, 3), True, 0.0)

  References:
    Krell et al., *Efficient Sequence Packing without Cross-contamination* (2021); the fused
    head as in :func:`linear_sequence_nll`.
  """
  _core.check_choice("reduction", reduction, ("sum", "mean"))
  _core.check_segments(segment_ids, num_segments, "targets", targets)
  (hidden, weight, targets, span_mask, bias), opts = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout,
    z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  segment_ids = jnp.asarray(segment_ids)
  if _is_empty(hidden):
    return jnp.zeros((hidden.shape[0], num_segments), F32)
  if implementation in ("xla", "reference"):
    logits, lib, kw = _materialised(
      implementation, hidden, weight, bias, span_mask, opts, weight_layout
    )
    return lib.segment_nll(
      logits, targets, span_mask, segment_ids, num_segments=num_segments, reduction=reduction,
      **kw,
    )  # fmt: skip
  plan = _plan(implementation, opts, hidden, weight, token_chunk, vocab_chunk, weight_layout)
  tok = _call(
    _tokens,
    plan,
    *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis),
  )
  mask, weights = _core.mask_to_bool(span_mask), _core.mask_to_weights(span_mask)
  # Loud like segment_nll: a negative segment id inside the span makes its row NaN.
  return nll.reduce_segments(tok, weights, mask, segment_ids, num_segments, reduction)


def linear_token_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  temperature: float = 1.0,
  return_entropy: bool = False,
  bias: Float[Array, " V"] | None = None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
  weight_layout: Literal["dv", "vd"] = "dv",
  implementation: str = "auto",
  token_chunk: int | None = None,
  vocab_chunk: int | None = None,
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], Float[Array, "B T"]]:
  """Per-token NLL of the target tokens (and each one's entropy) through the LM head.

  With ``z = c·tanh(x / c) / τ`` the scored logits of ``x = hidden @ weight + bias``
  (soft-cap first, then the temperature, as sampling at ``τ`` does):

  .. math::

     \\ell_{b,t} = \\log \\sum_v e^{z_{b,t,v}} - z_{b,t,y_{b,t}}, \\qquad
     H_{b,t} = -\\sum_v p_{b,t,v} \\log p_{b,t,v}, \\quad p = \\mathrm{softmax}(z),
     \\qquad \\frac{\\partial H}{\\partial z_v} = -p_v (\\log p_v + H),

  both ``0`` outside the span, without the ``[B, T, V]`` logits and at the cost of the target
  tokens only (span-compacted).  The primitive of policy-gradient and preference losses:
  ``log π(y_t | ·) = -ℓ_t``.  Both outputs are differentiable with per-token cotangents
  (one recomputing gradient pass for both).  ``z_loss`` / ``label_smoothing`` change ``ℓ`` as
  in :func:`jaxnll.token_nll`, never the entropy.

  Args:
    hidden: ``[B, T, D]`` final hidden states, any floating dtype.
    weight: ``[D, V]`` head kernel, or ``[V, D]`` with ``weight_layout="vd"``.
    targets: ``[B, T]`` integer ids, already shifted; read only inside the span.
    span_mask: ``[B, T]`` bool mask or float weights; non-zero positions are scored (the
      weights select, they do not scale the per-token outputs).
    temperature: ``τ > 0``; the chain rule brings ``1/τ`` into the gradients.
    return_entropy: also return the entropy of ``softmax(z)`` at each target position.
    options: ``bias``, ``z_loss``, ``label_smoothing``, ``logit_softcap``, ``vocab_axis``,
      ``vocab_size``, ``weight_layout``, ``implementation``, ``token_chunk``, ``vocab_chunk``
      (keywords) as in :func:`linear_sequence_nll`.

  Returns:
    float32 ``[B, T]`` per-token NLL, or ``(nll, entropy)`` with ``return_entropy=True``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((2, 5), int), jnp.array([[0, 1, 1, 1, 0]] * 2, bool)
    >>> nll, ent = linear_token_nll(h, w, y, span, temperature=0.7, return_entropy=True)
    >>> seq = linear_sequence_nll(h, w, y, span, temperature=0.7)
    >>> bool(jnp.allclose(nll.sum(1), seq)), float(ent[0, 0]), bool(ent[0, 1] > 0)
    (True, 0.0, True)

  References:
    Schulman et al., *Proximal Policy Optimization Algorithms* (2017); Shao et al.,
    *DeepSeekMath* (GRPO, 2024); the fused head as in :func:`linear_sequence_nll`.
  """
  (hidden, weight, targets, span_mask, bias), opts = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout,
    z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if not isinstance(return_entropy, bool):
    raise TypeError(f"return_entropy must be a Python bool, got {return_entropy!r}")
  if _is_empty(hidden):
    zeros = jnp.zeros(hidden.shape[:2], F32)
    return (zeros, zeros) if return_entropy else zeros
  if implementation in ("xla", "reference"):
    logits, lib, kw = _materialised(
      implementation, hidden, weight, bias, span_mask, opts, weight_layout
    )
    mask = _core.mask_to_bool(span_mask)
    tok = lib.token_nll(logits, jnp.where(mask, targets, 0), **kw)
    nll = jnp.where(mask, tok, 0.0)
    if not return_entropy:
      return nll
    return nll, _plain_entropy(logits, mask, opts, implementation)
  plan = _plan(
    implementation, opts, hidden, weight, token_chunk, vocab_chunk, weight_layout,
    entropy=return_entropy,
  )  # fmt: skip
  return _call(
    _tokens,
    plan,
    *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis),
  )
