"""The written interface of the fused head: what every ``implementation=`` provides.

Two levels, each a :class:`typing.Protocol`:

* :class:`Kernel` — one implementation as :mod:`jaxnll.fused.api` dispatches to it: the four
  entries (per-sample, scalar, per-token, per-segment) on one call's checked arrays
  (:class:`Call`).  ``"xla"`` and ``"reference"`` (:mod:`jaxnll.fused.xla`) satisfy it by
  materialising the logits; the compacted kernels satisfy it through :class:`Fused`, which
  plans the call and differentiates it with the rules of :mod:`jaxnll.fused.vjp`.
* :class:`Passes` — a compacted kernel (:mod:`~jaxnll.fused.chunked`,
  :mod:`~jaxnll.fused.token_chunked`, :mod:`~jaxnll.fused.pallas_tpu`,
  :mod:`~jaxnll.fused.auto`): its planning (``configure``) and three passes over a
  :class:`~jaxnll.fused.compact.Compacted` batch.  The modules themselves are the objects
  that satisfy it.

Planning: :func:`base_plan` builds the plan every compacted kernel starts from (default and
clipped chunks); the kernel's own ``configure`` then sets its blocks and schedule, so a
kernel's planning quirks live in its module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp

from jaxnll import _core, nll
from jaxnll._core import TokenOptions
from jaxnll.fused import vjp
from jaxnll.fused.compact import Compacted, Plan

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


@dataclasses.dataclass(frozen=True)
class Call:
  """One call's checked arrays and options (what an entry hands to its :class:`Kernel`)."""

  hidden: Any  # [B, T, D]
  weight: Any  # [D, V] or [V, D]
  bias: Any  # [V] or None
  targets: Any  # int32 [B, T]
  span_mask: Any  # [B, T] bool or float
  opts: TokenOptions
  weight_layout: str = "dv"
  token_chunk: int | None = None
  vocab_chunk: int | None = None

  @property
  def arrays(self) -> tuple:
    return (self.hidden, self.weight, self.bias, self.targets, self.span_mask)

  @property
  def num_tokens(self) -> int:
    return self.hidden.shape[0] * self.hidden.shape[1]

  @property
  def vocab(self) -> int:
    """The head's (local) vocabulary columns."""
    return self.weight.shape[0 if self.weight_layout == "vd" else 1]


@dataclasses.dataclass(frozen=True)
class Request:
  """The static facts a compacted kernel plans from (``schedule``: the scalar entry's, None
  for the others; ``token_chunk`` / ``vocab_chunk``: the caller's, None when unset)."""

  num_tokens: int
  vocab: int
  hidden_size: int
  weight_dtype: Any
  token_chunk: int | None
  vocab_chunk: int | None
  schedule: str | None


@runtime_checkable
class Kernel(Protocol):
  """One ``implementation=`` of the fused head, as :mod:`jaxnll.fused.api` calls it.

  Every method takes the checked arrays of one call (:class:`Call`, ``B·T > 0``) and returns
  float32 results that equal, in value and gradients with respect to ``hidden``, ``weight``
  and ``bias``, the same loss on the logits ``hidden @ weight + bias``.
  """

  def sequence(self, call: Call, *, reduction: str) -> Any:
    """Per-sample losses ``[B]`` (``"sum"`` or ``"mean"``)."""
    ...

  def loss(
    self,
    call: Call,
    *,
    normalize: str,
    schedule: str,
    segment_ids: Any = None,
    num_segments: int | None = None,
  ) -> tuple[Any, Any]:
    """``(batch loss, sums)``: sums per sample ``[B]``, or per segment ``[B, S]`` with
    ``segment_ids`` — from the same pass as the loss."""
    ...

  def tokens(self, call: Call, *, entropy: bool) -> Any:
    """Per-token losses ``[B, T]`` (0 outside the span), with ``entropy`` also each
    position's entropy: ``(nll, entropy)``."""
    ...

  def segments(self, call: Call, segment_ids: Any, *, num_segments: int, reduction: str) -> Any:
    """Per-segment losses ``[B, num_segments]`` of packed rows."""
    ...


@runtime_checkable
class Passes(Protocol):
  """A compacted kernel: a module with these functions (``stats_c``: the per-token residual
  tuple ``(m, s[, nu])`` of ``Compacted.combine``; gradients f32
  ``[rows, D]`` for hidden, the weight's layout for the weight, ``None`` where not in
  ``need``).  A kernel whose ``configure`` sets ``plan.hidden_grad_in_forward`` (only
  :mod:`~jaxnll.fused.pallas_tpu`) also has ``forward_with_hidden(bt) -> (stats_c, loss_c,
  carry)`` and takes that ``carry=`` in ``grad_pass``: the per-sample and per-token entries'
  hidden gradient from the forward, scaled by the cotangent (:mod:`jaxnll.fused.vjp`)."""

  def configure(self, plan: Plan, request: Request) -> Plan:
    """The kernel's plan from :func:`base_plan`'s: its blocks, its schedule."""
    ...

  def stats_pass(self, bt: Compacted) -> tuple[tuple, Any]:
    """Forward: ``(stats_c, loss_c)``, float32 per compacted position."""
    ...

  def grad_pass(
    self, bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None
  ) -> tuple[Any, Any, Any]:
    """Gradients of ``Σ scale·ℓ (+ Σ entropy_scale·H)`` by recomputation:
    ``(dh_c, dweight, dbias)``."""
    ...

  def one_pass(self, bt: Compacted, scale_c, need=(True, True, True)) -> tuple:
    """Loss and gradients of ``Σ scale·ℓ`` together (the scalar entry, whose per-token
    weights are known before any logit): ``(stats_c, loss_c, dh_c, dweight, dbias)``."""
    ...


# ----------------------------------------------------------------------------- planning


def chunks(token_chunk, vocab_chunk, num_tokens, weight, weight_layout="dv"):
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


def request(call: Call, schedule: str | None) -> Request:
  d = call.weight.shape[1 if call.weight_layout == "vd" else 0]
  return Request(
    call.num_tokens, call.vocab, d, call.weight.dtype, call.token_chunk, call.vocab_chunk, schedule
  )


def base_plan(name: str, call: Call, schedule: str | None = None, **fields) -> Plan:
  """The plan a compacted kernel starts from: chunks of :func:`chunks`; the scalar entry
  (``schedule`` given) computes each logits block once unless ``"two_pass"`` is asked."""
  tc, vc, gc = chunks(
    call.token_chunk, call.vocab_chunk, call.num_tokens, call.weight, call.weight_layout
  )
  return Plan(
    call.opts,
    tc,
    vc,
    one_pass=schedule is not None and schedule != "two_pass",
    grad_vocab_chunk=gc,
    implementation=name,
    weight_layout=call.weight_layout,
    cotangents_split=_core.cotangents_split(call.opts),
    **fields,
  )


def plan_with(name: str, passes: Passes, call: Call, schedule=None, **fields) -> Plan:
  """``passes``' plan of ``call``: :func:`base_plan`, the kernel's ``configure``, and the
  compacted rows padded to whole blocks."""
  plan = passes.configure(base_plan(name, call, schedule, **fields), request(call, schedule))
  rows = -(-call.num_tokens // plan.token_chunk) * plan.token_chunk
  return dataclasses.replace(plan, padded_rows=max(plan.padded_rows, rows))


# ----------------------------------------------------------------------------- compacted kernels


class Fused:
  """The :class:`Kernel` of a compacted kernel module (:class:`Passes`): plans each call and
  runs it through the custom-VJP rules of :mod:`jaxnll.fused.vjp`."""

  def __init__(self, name: str, passes: Any):  # a Passes module (or auto's dispatcher)
    self.name, self.passes = name, passes

  def __repr__(self):
    return f"Fused({self.name!r})"

  def plan(self, call: Call, schedule: str | None = None, **fields) -> Plan:
    return plan_with(self.name, self.passes, call, schedule, **fields)

  def _run(self, fn, plan, call: Call, *extra):
    arrays = vjp.vary_alike(call, extra)
    return vjp.call(fn, self.passes, plan, *arrays)

  def sequence(self, call: Call, *, reduction: str):
    return self._run(vjp.sequence, self.plan(call, reduction=reduction), call)

  def loss(self, call: Call, *, normalize, schedule, segment_ids=None, num_segments=None):
    plan = self.plan(call, schedule, normalize=normalize)
    if segment_ids is not None:
      plan = dataclasses.replace(plan, num_segments=num_segments)
    return self._run(vjp.loss, plan, call, segment_ids)

  def tokens(self, call: Call, *, entropy: bool):
    return self._run(vjp.tokens, self.plan(call, entropy=entropy), call)

  def segments(self, call: Call, segment_ids, *, num_segments: int, reduction: str):
    """The per-token losses (one pass, per-token cotangents), summed by segment id."""
    tok = self.tokens(call, entropy=False)
    mask, weights = _core.mask_to_bool(call.span_mask), _core.mask_to_weights(call.span_mask)
    # Loud like segment_nll: a negative segment id inside the span makes its row NaN.
    return nll.reduce_segments(tok, weights, mask, segment_ids, num_segments, reduction)


class Auto(Fused):
  """``"auto"``: one plan per platform branch (:data:`jaxnll.fused.auto.BRANCHES`), chosen
  at lowering time by :func:`jax.lax.platform_dependent`."""

  def __init__(self, passes: Any, branches: dict[str, Passes]):
    # ``passes``: :mod:`jaxnll.fused.auto`, whose passes dispatch per platform to the
    # branches' (its planning is this class's).
    super().__init__("auto", passes)
    self.branches = branches

  def plan(self, call: Call, schedule: str | None = None, **fields) -> Plan:
    plans = tuple(
      plan_with(name, self.branches[name], call, schedule, **fields)
      for name in self.passes.BRANCHES
    )
    return self.passes.plan(plans, one_pass=schedule is not None)
