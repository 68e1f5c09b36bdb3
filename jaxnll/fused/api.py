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

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core, nll
from jaxnll._core import F32, TokenOptions
from jaxnll.checks import check_fused_inputs as check_inputs  # noqa: F401 (public name)
from jaxnll.fused import auto, chunked, kernel, pallas_tpu, token_chunked, xla
from jaxnll.fused.kernel import Auto, Call, Fused, Kernel

#: Target tokens per chunk (:data:`jaxnll.fused.kernel.DEFAULT_TOKEN_CHUNK`).
DEFAULT_TOKEN_CHUNK = kernel.DEFAULT_TOKEN_CHUNK
#: Vocabulary columns per chunk (:data:`jaxnll.fused.kernel.DEFAULT_VOCAB_CHUNK`).
DEFAULT_VOCAB_CHUNK = kernel.DEFAULT_VOCAB_CHUNK
#: Bytes of f32 weight-gradient chunk the gradient pass widens to with 16-bit weights
#: (:data:`jaxnll.fused.kernel.WEIGHT_GRAD_CHUNK_BYTES`).
WEIGHT_GRAD_CHUNK_BYTES = kernel.WEIGHT_GRAD_CHUNK_BYTES
#: Cap of the ``one_pass`` row block (:data:`jaxnll.fused.chunked.ONE_PASS_BLOCK_BYTES`).
ONE_PASS_BLOCK_BYTES = chunked.ONE_PASS_BLOCK_BYTES

#: The implementations behind ``implementation=``, one :class:`~jaxnll.fused.kernel.Kernel`
#: each.  ``"auto"`` picks per platform at lowering time (:mod:`jaxnll.fused.auto`: TPU
#: ``"pallas_tpu"``, GPU ``"token_chunked"``, otherwise ``"chunked"``); the compacted kernels
#: run through :class:`~jaxnll.fused.kernel.Fused` (their planning in their modules, their
#: gradients by :mod:`jaxnll.fused.vjp`); ``"xla"``: the float32 logits materialised (as the
#: fused kernels compute them, so the same numbers at bf16 / f16), then
#: :func:`jaxnll.sequence_nll` (what XLA makes of the plain program); ``"reference"``:
#: :mod:`jaxnll.reference` (float32 log-softmax, for tests).
TABLE: dict[str, Kernel] = {
  "auto": Auto(
    auto, {"pallas_tpu": pallas_tpu, "token_chunked": token_chunked, "chunked": chunked}
  ),
  "chunked": Fused("chunked", chunked),
  "token_chunked": Fused("token_chunked", token_chunked),
  "pallas_tpu": Fused("pallas_tpu", pallas_tpu),
  "xla": xla.XLA,
  "reference": xla.REFERENCE,
}
IMPLEMENTATIONS = tuple(TABLE)
SCHEDULES = ("auto", "one_pass", "two_pass")

#: ``weight_layout=``: ``"dv"`` a ``[D, V]`` head kernel (Flax ``Linear``), ``"vd"`` a
#: ``[V, D]`` table (an embedding, as tied heads use) read in place, without a transposed copy.
LAYOUTS = _core.LAYOUTS


def _setup(
  hidden, weight, targets, span_mask, bias, implementation, weight_layout, token_chunk,
  vocab_chunk, **token,
) -> tuple[Kernel, Call]:  # fmt: skip
  """The implementation of ``implementation=`` and the call's checked arrays and options."""
  hidden, weight, targets, span_mask, bias = _core.check_fused_arrays(
    hidden, weight, targets, span_mask, bias, weight_layout
  )
  _core.check_choice("implementation", implementation, IMPLEMENTATIONS)
  call = Call(
    hidden, weight, bias, targets, span_mask, TokenOptions(**token), weight_layout, token_chunk,
    vocab_chunk,
  )  # fmt: skip
  return TABLE[implementation], call


def _is_empty(call: Call) -> bool:
  """No position at all (``B = 0`` or ``T = 0``): the entries return zeros (zero gradients)."""
  return call.num_tokens == 0


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
  impl, call = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout, token_chunk,
    vocab_chunk, z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if _is_empty(call):
    return jnp.zeros(call.hidden.shape[:1], F32)
  return impl.sequence(call, reduction=reduction)


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
  segment_ids: Int[Array, "B T"] | None = None,
  num_segments: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, " B"] | Float[Array, "B S"]]:
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

  Packed rows: with ``segment_ids`` the aux output is per *segment*, ``[B, num_segments]``
  (as :func:`linear_segment_nll` with ``reduction="sum"``), summed from the same per-token
  losses as the batch loss — one pass over the head for both.  The loss itself does not
  change (it is still normalised over the rows of ``span_mask``); a span position whose
  segment id is ``0`` (or above ``num_segments``) counts in the loss and in no segment's sum
  (so a caller that trains on every token can report the target spans' sums alone).

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
    segment_ids, num_segments: ``[B, T]`` integer segment ids and the number of segment
      columns (a Python int), as in :func:`linear_segment_nll`: the aux output per segment.

  Returns:
    ``(loss, sums)``: float32 scalar and float32 ``[B]`` per-sample sums (``[B, S]``
    per-segment sums with ``segment_ids``).

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
  impl, call = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout, token_chunk,
    vocab_chunk, z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if segment_ids is not None or num_segments is not None:
    if segment_ids is None:
      raise ValueError("num_segments is given without segment_ids: pass both or neither")
    _core.check_segments(segment_ids, num_segments, "targets", call.targets)
    segment_ids = jnp.asarray(segment_ids)
  if _is_empty(call):
    b = call.hidden.shape[0]
    return jnp.zeros((), F32), jnp.zeros((b,) if segment_ids is None else (b, num_segments), F32)
  return impl.loss(
    call, normalize=normalize, schedule=schedule, segment_ids=segment_ids,
    num_segments=num_segments,
  )  # fmt: skip


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
  impl, call = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout, token_chunk,
    vocab_chunk, z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  segment_ids = jnp.asarray(segment_ids)
  if _is_empty(call):
    return jnp.zeros((call.hidden.shape[0], num_segments), F32)
  return impl.segments(call, segment_ids, num_segments=num_segments, reduction=reduction)


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
  impl, call = _setup(
    hidden, weight, targets, span_mask, bias, implementation, weight_layout, token_chunk,
    vocab_chunk, z_loss=z_loss, label_smoothing=label_smoothing, logit_softcap=logit_softcap,
    temperature=temperature, vocab_axis=vocab_axis, vocab_size=vocab_size,
  )  # fmt: skip
  if not isinstance(return_entropy, bool):
    raise TypeError(f"return_entropy must be a Python bool, got {return_entropy!r}")
  if _is_empty(call):
    zeros = jnp.zeros(call.hidden.shape[:2], F32)
    return (zeros, zeros) if return_entropy else zeros
  return impl.tokens(call, entropy=return_entropy)
