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

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core
from jaxnll._core import F32, TokenOptions
from jaxnll.checks import check_fused_inputs as check_inputs  # noqa: F401 (public name)
from jaxnll.fused import auto, chunked, compact, pallas_tpu, token_chunked
from jaxnll.fused.compact import Compacted, Plan, safe_inverse

#: ``"xla"``: the logits materialised, then :func:`jaxnll.sequence_nll` (what XLA makes of the
#: plain program); ``"reference"``: :mod:`jaxnll.reference` (float32 log-softmax, for tests).
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
  lse_c, loss_c = impl.stats_pass(bt)
  sums = compact.per_sample(bt, loss_c, span_mask)
  if plan.reduction == "mean":
    sums = sums * safe_inverse(compact.counts(span_mask))
  return sums, lse_c


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
  out, lse_c = _sequence_value(plan, *args)
  # Residuals: the inputs (already live) and one f32 log-sum-exp per position.
  return out, (*args, lse_c, need)


def _sequence_grads(plan, res, per_sample):
  """Gradients of ``Σ_b per_sample[b] · Σ_t w_t ℓ_t`` (hidden, weight, bias)."""
  hidden, weight, bias, targets, span_mask, lse_c, need = res
  need = tuple(x is not None for x in need)
  impl = _kernel(plan)
  bt = Compacted(plan, hidden, weight, bias, targets, span_mask)
  dh_c, dw, db = impl.grad_pass(bt, compact.compact_scale(bt, per_sample, span_mask), lse_c, need)
  return compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)


def _sequence_bwd(plan, res, ct):
  if isinstance(ct, SymbolicZero):
    return (None,) * 5
  span_mask = res[4]
  if plan.reduction == "mean":
    ct = ct * safe_inverse(compact.counts(span_mask))
  dh, dw, db = _sequence_grads(plan, res, ct)
  return dh, dw, db, None, None


_sequence.defvjp(_sequence_fwd, _sequence_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- scalar entry


def _batch_weights(sums, counts, normalize):
  """``∂ loss / ∂ sums[b]``: the batch loss is linear in the per-sample sums."""
  from jaxnll.nll import batch_loss

  return jax.grad(lambda s: batch_loss(s, counts, normalize=normalize))(sums)


def _batch_value(sums, counts, normalize):
  from jaxnll.nll import batch_loss

  return batch_loss(sums, counts, normalize=normalize)


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
    lse_c, loss_c, dh_c, dw, db = impl.one_pass(bt, scale_c, wanted)
  else:
    lse_c, loss_c = impl.stats_pass(bt)
    dh_c, dw, db = impl.grad_pass(bt, scale_c, lse_c, wanted)
  grads = compact.finish_grads(bt, dh_c, dw, db, hidden, weight, bias)
  sums = compact.per_sample(bt, loss_c, span_mask)
  loss = _batch_value(sums, counts, plan.normalize)
  return (loss, sums), (grads, (hidden, weight, bias, targets, span_mask, lse_c, need))


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
    grads = [_scaled(ct_loss, dh), _scaled(ct_loss, dw), _scaled(ct_loss, db)]
  if not isinstance(ct_sums, SymbolicZero):
    # The per-sample sums were differentiated too: one more (recomputing) gradient pass.
    extra = _sequence_grads(plan, seq_res, ct_sums)
    grads = [_add(g, e) for g, e in zip(grads, extra, strict=True)]
  return (*grads, None, None)


_loss.defvjp(_loss_fwd, _loss_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- public API


def _check(hidden, weight, targets, span_mask, bias):
  """Checks the arrays and returns them as arrays (Python lists converted; targets as int32
  with every id outside ``[0, 2**31)`` at ``-1``, so no wider id wraps to a valid one)."""
  hidden, weight = _core.as_array("hidden", hidden), _core.as_array("weight", weight)
  targets, span_mask = _core.as_array("targets", targets), _core.as_array("span_mask", span_mask)
  bias = None if bias is None else _core.as_array("bias", bias)
  _core.check_floating("hidden", hidden)
  _core.check_floating("weight", weight)
  _core.check_integer("targets", targets)
  _core.check_mask("span_mask", span_mask)
  _core.check_rank("hidden", hidden, (3,), "[B, T, D]")
  _core.check_rank("weight", weight, (2,), "[D, V]")
  hs, ws = jnp.shape(hidden), jnp.shape(weight)
  if hs[2] != ws[0]:
    raise ValueError(
      f"weight must have shape [D, V] with D = hidden.shape[-1] = {hs[2]}, "
      f"got hidden {hs} and weight {ws}"
    )
  for name, x in (("targets", targets), ("span_mask", span_mask)):
    if jnp.shape(x) != hs[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hs[:2]}, got shape {jnp.shape(x)}")
  if bias is not None:
    _core.check_floating("bias", bias)
    if jnp.shape(bias) != ws[1:]:
      raise ValueError(f"bias must have shape [V] = {ws[1:]}, got shape {jnp.shape(bias)}")
  _core.check_vocab("weight", ws[1], ws)
  hidden, weight, span_mask = map(jnp.asarray, (hidden, weight, span_mask))
  bias = None if bias is None else jnp.asarray(bias)
  return hidden, weight, _core.int32_ids(targets), span_mask, bias


def _chunks(token_chunk, vocab_chunk, num_tokens, weight):
  """``(token_chunk, vocab_chunk, grad_vocab_chunk)`` after defaults and clipping."""
  for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive Python int or None, got {value!r}")
  d, vocab = weight.shape
  tc = DEFAULT_TOKEN_CHUNK if token_chunk is None else token_chunk
  vc = max(1, min(DEFAULT_VOCAB_CHUNK if vocab_chunk is None else vocab_chunk, vocab))
  gc = vc
  if vocab_chunk is None and jnp.dtype(weight.dtype).itemsize < 4:
    gc = min(vocab, max(vc, WEIGHT_GRAD_CHUNK_BYTES // (4 * d) // vc * vc))
  return max(1, min(tc, num_tokens)), vc, gc


def _plan(
  implementation, opts, token_chunk, vocab_chunk, num_tokens, weight, *, schedule=None, **fields
) -> Plan:
  """The static plan of one call of a kernel of :data:`KERNELS` (``schedule``: the scalar
  entry's, None for the per-sample entry).  ``"auto"`` carries one plan per platform."""
  if implementation == "auto":
    branches = tuple(
      _plan(name, opts, token_chunk, vocab_chunk, num_tokens, weight, schedule=schedule, **fields)
      for name in auto.BRANCHES
    )
    return auto.plan(branches, one_pass=schedule is not None)
  one_pass = False
  if schedule is not None and implementation == "chunked":
    one_pass = schedule == "one_pass" or (schedule == "auto" and weight.dtype == F32)
    if one_pass and token_chunk is None:
      cap = ONE_PASS_BLOCK_BYTES // (4 * weight.shape[1])
      token_chunk = max(8, min(DEFAULT_TOKEN_CHUNK, cap) // 8 * 8)
  elif schedule is not None:
    # Blocks of whole vocabulary rows: the gradients come from the block the loss used.
    one_pass = schedule != "two_pass"
  tc, vc, gc = _chunks(token_chunk, vocab_chunk, num_tokens, weight)
  plan = Plan(
    opts, tc, vc, one_pass=one_pass, grad_vocab_chunk=gc, implementation=implementation, **fields
  )
  configure = getattr(KERNELS[implementation], "configure", None)
  if configure is not None:
    plan = configure(plan, token_chunk, vocab_chunk, num_tokens, weight)
  rows = -(-num_tokens // plan.token_chunk) * plan.token_chunk
  return dataclasses.replace(plan, padded_rows=max(plan.padded_rows, rows))


def _materialised(implementation, hidden, weight, bias, targets, span_mask, opts):
  """``(per_sample(reduction), counts)`` of the paths that build the ``[B, T, V]`` logits."""
  if implementation == "reference":
    from jaxnll import reference

    if opts.vocab_axis is not None or opts.vocab_size is not None:
      raise ValueError(
        'implementation="xla" takes no vocab_axis / vocab_size; use implementation="xla"'
      )
    token_opts = dict(
      z_loss=opts.z_loss, label_smoothing=opts.label_smoothing, logit_softcap=opts.logit_softcap
    )

    def per_sample(reduction):
      return reference.linear_sequence_nll(
        hidden, weight, targets, span_mask, bias=bias, reduction=reduction, **token_opts
      )

  else:
    from jaxnll.nll import sequence_nll

    logits = hidden @ weight
    logits = logits if bias is None else logits + bias

    def per_sample(reduction):
      return sequence_nll(
        logits, targets, span_mask, reduction=reduction, **dataclasses.asdict(opts)
      )

  return per_sample, compact.counts(span_mask)


def linear_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  bias: Float[Array, " V"] | None = None,
  reduction: str = "sum",
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
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
  not ``B·T``.  The forward keeps one float32 log-sum-exp per target token; the backward
  recomputes the logits a ``[C, K]`` block at a time (one matmul forward, three backward).

  Args:
    hidden: ``[B, T, D]`` final hidden states, any floating dtype.
    weight: ``[D, V]`` head kernel (Flax ``Linear`` layout), any floating dtype.  Matmuls run
      in ``result_type(hidden, weight)`` and accumulate in float32.
    targets: ``[B, T]`` integer ids, already shifted (:func:`jaxnll.shift_targets`); only read
      inside the span.  An id outside ``[0, V)`` inside the span makes that sample NaN
      (:func:`jaxnll.checked` raises a clear error instead).
    span_mask: ``[B, T]`` bool mask or float weights of the target positions.  Positions
      outside it are never read: NaN/inf hidden states there reach no value or gradient.  Float
      weights get no gradient.
    bias: optional ``[V]`` head bias.
    reduction: ``"sum"`` (``-log Pr(y|x)``) or ``"mean"`` (per target token; 0 if empty).
    z_loss, label_smoothing, logit_softcap: as in :func:`jaxnll.token_nll`.
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
    implementation: ``"auto"`` (default: the kernel of the platform the function is lowered
      for — TPU ``"pallas_tpu"``, GPU ``"token_chunked"``, otherwise ``"chunked"``, chosen by
      :func:`jax.lax.platform_dependent`), ``"chunked"`` (token × vocabulary blocks),
      ``"token_chunked"`` (token blocks, full-vocabulary matmuls:
      :mod:`jaxnll.fused.token_chunked`), ``"pallas_tpu"`` (Pallas Mosaic kernels, interpret
      mode off TPU: :mod:`jaxnll.fused.pallas_tpu`), ``"xla"`` (materialise the logits and call
      :func:`jaxnll.sequence_nll`) or ``"reference"``
      (:func:`jaxnll.reference.linear_sequence_nll`).
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
  hidden, weight, targets, span_mask, bias = _check(hidden, weight, targets, span_mask, bias)
  _core.check_choice("reduction", reduction, ("sum", "mean"))
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  opts = TokenOptions(z_loss, label_smoothing, logit_softcap, vocab_axis, vocab_size)
  b, t, _ = hidden.shape
  _chunks(token_chunk, vocab_chunk, b * t, weight)
  if implementation in ("xla", "reference"):
    return _materialised(implementation, hidden, weight, bias, targets, span_mask, opts)[0](
      reduction
    )
  plan = _plan(implementation, opts, token_chunk, vocab_chunk, b * t, weight, reduction=reduction)
  return _sequence(
    plan, *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis)
  )


def linear_nll_loss(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  normalize: str = "tokens",
  bias: Float[Array, " V"] | None = None,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  logit_softcap: float | None = None,
  vocab_axis: str | None = None,
  vocab_size: int | None = None,
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
    z_loss, label_smoothing, logit_softcap: as in :func:`jaxnll.token_nll`.
    vocab_axis, vocab_size: vocabulary-parallel head, as in :func:`linear_sequence_nll`.
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
  hidden, weight, targets, span_mask, bias = _check(hidden, weight, targets, span_mask, bias)
  from jaxnll.nll import NORMALIZATIONS

  _core.check_choice("normalize", normalize, NORMALIZATIONS)
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  _core.check_choice("schedule", schedule, SCHEDULES)
  opts = TokenOptions(z_loss, label_smoothing, logit_softcap, vocab_axis, vocab_size)
  if implementation in ("xla", "reference"):
    from jaxnll.nll import batch_loss

    per_sample, counts = _materialised(
      implementation, hidden, weight, bias, targets, span_mask, opts
    )
    sums = per_sample("sum")
    return batch_loss(sums, counts, normalize=normalize), sums
  b, t, _ = hidden.shape
  plan = _plan(
    implementation,
    opts,
    token_chunk,
    vocab_chunk,
    b * t,
    weight,
    normalize=normalize,
    schedule=schedule,
  )
  return _loss(
    plan, *compact.vary_alike(hidden, weight, bias, targets, span_mask, vocab_axis=vocab_axis)
  )
