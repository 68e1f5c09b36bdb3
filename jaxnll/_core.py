"""Shared per-token cross-entropy math and trace-time argument checks.

Every loss in jaxnll (from logits, fused with the head, vocabulary-parallel) reduces a row of
logits ``z`` (already soft-capped, float32) to a handful of statistics and builds the
per-token loss and its gradient from them.  Keeping the formulas here means the options
(``z_loss``, ``label_smoothing``, ``logit_softcap``) mean the same thing on every path.

With ``lse = logsumexp(z)``, ``α = label_smoothing`` and ``ζ = z_loss``:

.. math::

   \\ell = \\mathrm{lse} - (1 - α) z_y - α \\bar z + ζ\\,\\mathrm{lse}^2,
   \\qquad
   \\frac{\\partial \\ell}{\\partial z_v} = p_v (1 + 2ζ\\,\\mathrm{lse}) - (1-α)[v = y] - α / V,

where ``p = softmax(z)`` and ``z̄`` is the mean logit.  With a soft-cap ``c`` and a temperature
``τ`` the raw logit ``x`` maps to ``z = c·tanh(x / c) / τ`` and the chain rule adds
``dz/dx = (1 - (τz / c)²) / τ``.  Every backward rebuilds ``p`` from the row max ``m`` and
``s = Σ exp(z - m)`` as ``exp(z - m) / s`` (never ``exp(z - lse)`` with a rounded ``lse``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TokenOptions:
  """Per-token loss options shared by every loss (hashable: usable as a static argument)."""

  z_loss: float = 0.0
  label_smoothing: float = 0.0
  logit_softcap: float | None = None
  vocab_axis: str | None = None
  """Mesh axis name over which the vocabulary is sharded (inside ``shard_map``), or None."""
  vocab_size: int | None = None
  """The true vocabulary when the (sharded) vocabulary axis is padded; columns at or beyond
  it are padding and never count.  None: every column is a real token."""
  temperature: float = 1.0
  """``τ``: the loss scores ``logits / τ`` (after the soft-cap), as sampling at ``τ`` does."""

  def __post_init__(self):
    for name in ("z_loss", "label_smoothing"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
      object.__setattr__(self, name, float(value))
    if self.z_loss < 0.0:
      raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    cap = self.logit_softcap
    if cap is not None:
      if not isinstance(cap, (int, float)) or isinstance(cap, bool):
        raise TypeError(f"logit_softcap must be a Python float or None, got {type(cap).__name__}")
      if not cap > 0.0:
        raise ValueError(f"logit_softcap must be > 0, got {cap}")
      object.__setattr__(self, "logit_softcap", float(cap))
    tau = self.temperature
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
      raise TypeError(f"temperature must be a Python float, got {type(tau).__name__}")
    if not (np.isfinite(tau) and tau > 0.0):
      raise ValueError(f"temperature must be finite and > 0, got {tau}")
    object.__setattr__(self, "temperature", float(tau))
    if self.vocab_axis is not None and not isinstance(self.vocab_axis, str):
      raise TypeError(f"vocab_axis must be a mesh axis name (str), got {self.vocab_axis!r}")
    if self.vocab_size is not None and (
      not isinstance(self.vocab_size, int) or self.vocab_size < 1
    ):
      raise ValueError(f"vocab_size must be a positive Python int, got {self.vocab_size!r}")


# ----------------------------------------------------------------------------- vocabulary shards
#
# With ``vocab_axis`` set, each device holds a contiguous slice of the vocabulary (shard ``i``
# holds ids ``[i·Vs, (i+1)·Vs)``).  Row statistics are computed on the local slice and
# combined with one collective each (max, then sums), as Megatron-style vocabulary-parallel
# cross-entropy does; without it the collectives are the identity.


def vocab_layout(shard_size: int, opts: "TokenOptions"):
  """``(offset, vocab, padded)``: first id of the local slice, true vocabulary size, and
  whether some local columns may be padding (then use :func:`real_columns`)."""
  if opts.vocab_axis is None:
    offset, total = 0, shard_size
  else:
    offset = jax.lax.axis_index(opts.vocab_axis) * shard_size
    total = shard_size * jax.lax.axis_size(opts.vocab_axis)
  vocab = total if opts.vocab_size is None else opts.vocab_size
  if vocab > total:
    raise ValueError(
      f"vocab_size {vocab} is larger than the {total} vocabulary columns of the logits"
    )
  return offset, vocab, vocab < total


def real_columns(shard_size: int, offset, vocab: int) -> jax.Array:
  """bool ``[shard_size]``: which local columns are real tokens (not padding)."""
  return offset + jnp.arange(shard_size, dtype=jnp.int32) < vocab


def all_max(x: jax.Array, opts: "TokenOptions") -> jax.Array:
  return x if opts.vocab_axis is None else jax.lax.pmax(x, opts.vocab_axis)


def all_sum(x: jax.Array, opts: "TokenOptions") -> jax.Array:
  return x if opts.vocab_axis is None else jax.lax.psum(x, opts.vocab_axis)


def softcap(x: jax.Array, opts: TokenOptions) -> jax.Array:
  """The scored logits ``z = c·tanh(x / c) / τ`` in float32 (no cap: ``x / τ``; ``τ = 1``:
  no division).  Monotonic in ``x``, so a row maximum can be taken before it."""
  x = x.astype(F32)
  if opts.logit_softcap is not None:
    c = opts.logit_softcap
    x = c * jnp.tanh(x / c)
  if opts.temperature != 1.0:
    x = x / opts.temperature
  return x


def softcap_grad(z: jax.Array, opts: TokenOptions) -> jax.Array | float:
  """``dz/dx`` of :func:`softcap`, written with the scored value ``z``."""
  tau = opts.temperature
  if opts.logit_softcap is None:
    return 1.0 if tau == 1.0 else 1.0 / tau
  capped = z if tau == 1.0 else z * tau
  g = 1.0 - jnp.square(capped / opts.logit_softcap)
  return g if tau == 1.0 else g / tau


def loss_from_stats(
  lse: jax.Array,
  target_logit: jax.Array,
  logit_sum: jax.Array | None,
  vocab_size: int,
  opts: TokenOptions,
) -> jax.Array:
  """Per-token loss from the row statistics (all float32).

  ``logit_sum`` (the sum of the capped logits over the vocabulary) is only read when
  label smoothing is on; pass ``None`` otherwise.
  """
  alpha = opts.label_smoothing
  loss = lse - (1.0 - alpha) * target_logit if alpha else lse - target_logit
  if alpha:
    loss = loss - alpha * logit_sum / vocab_size
  if opts.z_loss:
    loss = loss + opts.z_loss * jnp.square(lse)
  return loss


def grad_logits(
  z: jax.Array,
  m: jax.Array,
  s: jax.Array,
  targets: jax.Array,
  vocab_offset: int | jax.Array,
  vocab_size: int,
  opts: TokenOptions,
  *,
  scale: jax.Array | None = None,
  entropy: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """``scale·∂ℓ/∂x`` for a block of scored logits ``z[..., v]`` holding vocabulary ids
  ``vocab_offset + v`` (``vocab_size`` is the full vocabulary).  Float32.

  The softmax is rebuilt from the row's running max ``m`` and sum ``s = Σ exp(z - m)`` as
  ``p = exp(z - m) / s``, never as ``exp(z - lse)``: a rounded float32 ``lse = m + log s``
  loses ``log s`` next to a large ``m`` (at bf16-max logits ``exp(z - lse)`` is 1, not 1/3;
  at logits near 1e4 its error is ~1e-4).  ``entropy = (nu, scale_h)`` adds
  ``scale_h · ∂H/∂z = -scale_h · p (z - m - nu)`` with ``nu = Σ p (z - m)`` (the entropy
  gradient ``-p (log p + H)``, written relative to ``m`` so nothing of size ``m`` rounds).
  """
  p = jnp.exp(z - m[..., None]) * (1.0 / s)[..., None]
  q = p
  if opts.z_loss:
    lse = m + jnp.log(s)
    q = p * (1.0 + 2.0 * opts.z_loss * lse)[..., None]
  ids = vocab_offset + jnp.arange(z.shape[-1], dtype=jnp.int32)
  hit = ids == targets[..., None]
  alpha = opts.label_smoothing
  g = q - jnp.where(hit, 1.0 - alpha, 0.0)
  if alpha:
    g = g - alpha / vocab_size
  if scale is not None:
    g = g * scale[..., None]
  if entropy is not None:
    nu, scale_h = entropy
    # p = 0 at a -inf logit (a masked vocabulary entry): no (0 · inf) NaN.
    dh = jnp.where(p > 0, p * ((z - m[..., None]) - nu[..., None]), 0.0)
    g = g - scale_h[..., None] * dh
  return g * softcap_grad(z, opts)


def target_in_range(targets: jax.Array, vocab_size: int) -> jax.Array:
  return (targets >= 0) & (targets < vocab_size)


# ----------------------------------------------------------------------------- argument checks


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_floating(name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array (bf16, f16, f32), got dtype {dtype}")


def check_integer(name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array of token ids, got dtype {dtype}")


def check_mask(name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{name} must be a bool mask or float weights, got dtype {dtype}")


def check_rank(name: str, x, ranks: Sequence[int], what: str) -> None:
  if np.ndim(x) not in ranks:
    raise ValueError(f"{name} must have shape {what}, got shape {_shape(x)}")


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
  if _shape(a) != _shape(b):
    raise ValueError(
      f"{name_a} and {name_b} must have the same shape, got {_shape(a)} and {_shape(b)}"
    )


def check_choice(name: str, value, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_span_values(name: str, rows, targets, span_mask, vocab: int) -> None:
  """Run-time checks for ``checkify``: every target id inside the span lies in ``[0, vocab)``
  and ``rows[..., :]`` (the logits or hidden states) is finite at every position inside it.

  Positions outside every span are not checked: they never reach values or gradients.
  """
  from jax.experimental import checkify

  inside = mask_to_bool(jnp.asarray(span_mask)).reshape(-1)
  targets = jnp.asarray(targets).reshape(-1)
  bad_target = inside & ~target_in_range(targets, vocab)
  first = jnp.argmax(bad_target)
  checkify.check(
    ~jnp.any(bad_target),
    "targets hold {value} at flat position {pos} inside the span, outside [0, {vocab})",
    value=targets[first],
    pos=first,
    vocab=jnp.asarray(vocab),
  )
  finite = jnp.all(jnp.isfinite(rows), axis=-1).reshape(-1)
  bad_rows = inside & ~finite
  checkify.check(
    ~jnp.any(bad_rows),
    name + " is not finite at flat position {pos} inside the span",
    pos=jnp.argmax(bad_rows),
  )


def check_segments(segment_ids, num_segments, like_name: str, like) -> None:
  """``segment_ids`` is an integer array shaped like ``like``; ``num_segments`` a positive int."""
  if not isinstance(num_segments, int) or isinstance(num_segments, bool) or num_segments < 1:
    raise ValueError(f"num_segments must be a positive Python int, got {num_segments!r}")
  check_integer("segment_ids", segment_ids)
  if np.shape(segment_ids) != np.shape(like):
    raise ValueError(
      f"segment_ids must have the shape of {like_name}, got {like_name} {np.shape(like)} "
      f"and segment_ids {np.shape(segment_ids)}"
    )


def reduce_segments(tok, weights, mask, segment_ids, num_segments: int, reduction: str):
  """Per-segment sum (or weighted mean, 0 when empty) of token losses ``[B, T]`` -> ``[B, S]``.

  Segment ``s`` (ids ``1..num_segments``; 0 is padding) lands in column ``s - 1``.
  """
  onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(F32)
  mask = mask & (segment_ids > 0)
  contrib = jnp.where(mask, tok * weights, 0.0)
  sums = jnp.einsum("bt,bts->bs", contrib, onehot, precision="highest")
  if reduction == "sum":
    return sums
  counts = jnp.einsum("bt,bts->bs", jnp.where(mask, weights, 0.0), onehot, precision="highest")
  nonzero = counts != 0
  return jnp.where(nonzero, sums / jnp.where(nonzero, counts, 1.0), 0.0)


def mask_to_weights(span_mask: jax.Array) -> jax.Array:
  """A bool mask or float weights as float32 weights."""
  return span_mask.astype(F32)


def mask_to_bool(span_mask: jax.Array) -> jax.Array:
  """Which positions count: ``True`` where the mask (or weight) is non-zero."""
  if span_mask.dtype == jnp.bool_:
    return span_mask
  return span_mask != 0
