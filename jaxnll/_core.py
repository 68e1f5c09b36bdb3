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
from jax._src import config as jax_config  # the shard_map body's check_vma (no public accessor)

#: The accumulation dtype of every loss (defined here only; every module imports it).
F32 = jnp.float32
#: ``reduction=`` of the per-sample and per-segment entries.
REDUCTIONS = ("sum", "mean")
#: ``normalize=`` of the batch-loss terms (:func:`jaxnll.nll.loss_terms`).
NORMALIZATIONS = ("tokens", "samples", "sum")
#: ``weight_layout=`` of the fused entries: the head as ``[D, V]`` or ``[V, D]``.
LAYOUTS = ("dv", "vd")


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
    check_token_options(self)


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


def real_columns(shard_size: int, offset, vocab: int, *, ndim: int = 1) -> jax.Array:
  """bool ``[1, ..., 1, shard_size]`` (``ndim`` axes, to select in a block of that rank
  without rank promotion): which local columns are real tokens (not padding)."""
  real = offset + jnp.arange(shard_size, dtype=jnp.int32) < vocab
  return real.reshape((1,) * (ndim - 1) + (shard_size,))


def all_max(x: jax.Array, opts: "TokenOptions") -> jax.Array:
  return x if opts.vocab_axis is None else jax.lax.pmax(x, opts.vocab_axis)


def all_sum(x: jax.Array, opts: "TokenOptions") -> jax.Array:
  return x if opts.vocab_axis is None else jax.lax.psum(x, opts.vocab_axis)


def cotangents_split(opts: "TokenOptions") -> bool:
  """Whether, inside ``shard_map(..., check_vma=False)``, a result replicated over the
  vocabulary axis gets its cotangent in parts: JAX then hands each shard ``1/n`` of it (and
  sums the shards' input cotangents), so a backward that reads the cotangent as the whole
  one must first sum it over the axis — what autodiff of a ``psum`` does there.  With
  ``check_vma`` on (the default) the cotangent of a replicated result is already whole."""
  if opts.vocab_axis is None:
    return False
  return not jax_config._check_vma.value


def whole_cotangent(ct: jax.Array, opts: "TokenOptions", split: bool | None = None) -> jax.Array:
  """The cotangent of a result replicated over the vocabulary axis, summed over the axis when
  it arrives in parts (:func:`cotangents_split`; ``split`` as decided at trace time of the
  forward, else now)."""
  split = cotangents_split(opts) if split is None else split
  return jax.lax.psum(ct, opts.vocab_axis) if split else ct


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
  ids = vocab_offset + jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
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
  """bool: which ids lie in ``[0, vocab_size)``, compared in ``targets``' own integer type
  (no cast first: an int64 id ``2**32 + 3`` is out of range, not ``3``)."""
  targets = jnp.asarray(targets)
  info = jnp.iinfo(targets.dtype)
  ok = targets >= 0 if info.min < 0 else jnp.ones(targets.shape, jnp.bool_)
  if info.max >= vocab_size:
    ok = ok & (targets < jnp.asarray(vocab_size, targets.dtype))
  return ok


def int32_ids(targets: jax.Array) -> jax.Array:
  """Token ids of any integer type as int32, every id outside ``[0, 2**31)`` mapped to ``-1``.

  Narrowing first would wrap ``2**32 + 3`` to the valid id ``3``; ``-1`` stays out of range for
  every later ``[0, V)`` test, so the loss there is NaN as for any other bad id.  This holds
  for int64 NumPy input with ``jax_enable_x64`` off too (JAX's default, where JAX itself would
  narrow first): such ids are range-checked in NumPy before the cast — the contract's NaN
  rather than a trace-time error, so a batch with a bad id behaves the same whether it
  arrives as a NumPy array, a JAX array or inside ``jit`` (``jaxnll.checked`` names it).
  """
  if isinstance(targets, (np.ndarray, np.generic)) and np.dtype(targets.dtype).itemsize > 4:
    # Concrete 64-bit NumPy ids: tested in NumPy, before JAX narrows them (with x64 off, as
    # by default, ``jnp.asarray`` would wrap ``2**32 + 3`` to the valid id ``3``).
    targets = np.asarray(targets)
    if np.issubdtype(targets.dtype, np.integer):
      ok = (targets >= 0) & (targets <= np.iinfo(np.int32).max)
      return jnp.asarray(np.where(ok, targets, -1).astype(np.int32))
  targets = jnp.asarray(targets)
  if targets.dtype == jnp.int32:
    return targets
  ok = target_in_range(targets, int(jnp.iinfo(jnp.int32).max) + 1)
  return jnp.where(ok, targets.astype(jnp.int32), jnp.int32(-1))


def poison_bad_targets(grad: jax.Array, targets: jax.Array, vocab_size: int, scale) -> jax.Array:
  """NaN for the whole gradient row ``grad[..., :]`` of a target outside ``[0, V)`` whose loss
  is differentiated (``scale != 0``): the loss there is NaN, and its gradient must say so too
  rather than be the finite ``softmax`` of a token that does not exist.  A row whose
  cotangent is exactly 0 (another sample's loss, a context position) stays as it is."""
  bad = ~target_in_range(targets, vocab_size) & (scale != 0)
  return jnp.where(bad[..., None], jnp.nan, grad)


# ----------------------------------------------------------------------------- argument checks


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


#: The smallest ``temperature`` accepted.  Logits are divided by it: at ``1e-6`` logits of
#: ``1e4`` become ``1e10``, squares of log-sum-exps (``z_loss``) ``1e20`` — far from the float32
#: overflow at ``3.4e38`` — while below it nothing is gained (the softmax is already one-hot)
#: and a tiny enough value makes ``logits / τ`` infinite and the loss NaN.
MIN_TEMPERATURE = 1e-6


def check_float_option(
  name: str,
  value,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
) -> float | None:
  """``value`` as a finite Python float in ``[low, high]`` (either end open with ``low_open`` /
  ``high_open``), or a ``TypeError`` / ``ValueError`` naming the option and the value seen."""
  if value is None and allow_none:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    kind = "a Python float or None" if allow_none else "a Python float"
    raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
  value = float(value)
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if not np.isfinite(value) or below or above:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = (
      ("(" if low_open or low is None else "[")
      + f"{lo}, {hi}"
      + ("]" if high is not None and not high_open else ")")
    )
    raise ValueError(f"{name} must be a finite float in {interval}, got {value!r}")
  return value


def check_temperature(temperature) -> float:
  """``temperature`` as a float in ``[MIN_TEMPERATURE, inf)``: finite, and not so small that
  ``logits / τ`` overflows."""
  return check_float_option("temperature", temperature, low=MIN_TEMPERATURE)


def check_token_options(opts) -> None:
  """Validates (and normalises to Python floats) the per-token options of a
  :class:`TokenOptions`-like object in place; any ``temperature`` attribute too."""

  def put(name, value):
    object.__setattr__(opts, name, value)

  put("z_loss", check_float_option("z_loss", opts.z_loss, low=0.0))
  # 1 is allowed: the target is then the uniform distribution (as optax's ``smooth_labels``).
  put(
    "label_smoothing",
    check_float_option("label_smoothing", opts.label_smoothing, low=0.0, high=1.0),
  )
  put(
    "logit_softcap",
    check_float_option(
      "logit_softcap", opts.logit_softcap, low=0.0, low_open=True, allow_none=True
    ),
  )
  if hasattr(opts, "temperature"):
    put("temperature", check_temperature(opts.temperature))
  if opts.vocab_axis is not None and not isinstance(opts.vocab_axis, str):
    raise TypeError(f"vocab_axis must be a mesh axis name (str), got {opts.vocab_axis!r}")
  size = opts.vocab_size
  if size is not None and (
    isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1
  ):
    raise ValueError(f"vocab_size must be a positive Python int, got {size!r}")
  if size is not None:
    put("vocab_size", int(size))


def as_array(name: str, x):
  """Python lists / tuples / scalars as arrays (arrays and tracers unchanged); an error naming
  the argument when they do not form one."""
  if isinstance(x, (list, tuple, int, float, bool)):
    try:
      return jnp.asarray(x)
    except (TypeError, ValueError) as e:
      raise TypeError(f"{name} must be an array (or a rectangular nested list), got {x!r}") from e
  return x


def check_vocab(name: str, size: int, shape) -> None:
  if size < 1:
    raise ValueError(f"{name} must have a vocabulary axis of size V >= 1, got shape {tuple(shape)}")


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
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a Python bool, got {type(value).__name__} {value!r}")
  return bool(value)


def check_int(name: str, value, *, low: int | None = None) -> int:
  """``value`` as a Python int ``>= low``, or an error naming the option."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def check_together(name_a: str, a, name_b: str, b) -> None:
  """Two optional arguments that only mean something as a pair."""
  if (a is None) != (b is None):
    raise ValueError(f"{name_a} and {name_b} must be given together (or neither)")


def check_like(name: str, x, like_name: str, like_shape) -> None:
  """``x`` has the shape of the argument ``like_name`` (``like_shape``)."""
  if _shape(x) != tuple(like_shape):
    raise ValueError(
      f"{name} must have the shape of {like_name} {tuple(like_shape)}, got {_shape(x)}"
    )


def check_per_sample(what: str, **arrays) -> tuple[int, ...]:
  """Real-valued ``[P]`` arrays of one shape (None entries skipped); ``what`` says what the
  one axis counts (``"one value per pair"``).  Returns the shape."""
  shape = first = None
  for name, x in arrays.items():
    if x is None:
      continue
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"{name} must be a float array of per-sample values, got dtype {dtype}")
    check_rank(name, x, (1,), f"[P] ({what})")
    if shape is None:
      first, shape = name, _shape(x)
    else:
      check_same_shape(first, arrays[first], name, x)
  return shape


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


def check_fused_arrays(hidden, weight, targets, span_mask, bias, weight_layout="dv"):
  """The arguments of a fused entry (``hidden @ weight + bias``) checked at trace time and
  returned as arrays (Python lists converted; targets as int32 with every id outside
  ``[0, 2**31)`` at ``-1``, so no wider id wraps to a valid one)."""
  check_choice("weight_layout", weight_layout, LAYOUTS)
  hidden, weight = as_array("hidden", hidden), as_array("weight", weight)
  targets, span_mask = as_array("targets", targets), as_array("span_mask", span_mask)
  bias = None if bias is None else as_array("bias", bias)
  vd = weight_layout == "vd"
  spec = "[V, D]" if vd else "[D, V]"
  check_floating("hidden", hidden)
  check_floating("weight", weight)
  check_integer("targets", targets)
  check_mask("span_mask", span_mask)
  check_rank("hidden", hidden, (3,), "[B, T, D]")
  check_rank("weight", weight, (2,), spec)
  hs, ws = _shape(hidden), _shape(weight)
  d, v = (ws[1], ws[0]) if vd else ws
  if hs[2] != d:
    raise ValueError(
      f"weight must have shape {spec} with D = hidden.shape[-1] = {hs[2]}, "
      f"got hidden {hs} and weight {ws} (weight_layout={weight_layout!r})"
    )
  for name, x in (("targets", targets), ("span_mask", span_mask)):
    if _shape(x) != hs[:2]:
      raise ValueError(f"{name} must have shape [B, T] = {hs[:2]}, got shape {_shape(x)}")
  if bias is not None:
    check_floating("bias", bias)
    if _shape(bias) != (v,):
      raise ValueError(f"bias must have shape [V] = {(v,)}, got shape {_shape(bias)}")
  check_vocab("weight", v, ws)
  hidden, weight, span_mask = map(jnp.asarray, (hidden, weight, span_mask))
  bias = None if bias is None else jnp.asarray(bias)
  return hidden, weight, int32_ids(targets), span_mask, bias


def reduce_segments(tok, weights, mask, segment_ids, num_segments: int, reduction: str):
  """Per-segment sum (or weighted mean, 0 when empty) of token losses ``[B, T]`` -> ``[B, S]``.

  Segment ``s`` (ids ``1..num_segments``; 0 is padding) lands in column ``s - 1``.
  """
  ids = jnp.arange(1, num_segments + 1).reshape(1, 1, num_segments)
  onehot = (segment_ids[..., None] == ids).astype(F32)
  mask = mask & (segment_ids > 0)
  contrib = jnp.where(mask, tok * weights, 0.0)
  sums = jnp.einsum("bt,bts->bs", contrib, onehot, precision="highest")
  if reduction == "sum":
    return sums
  counts = jnp.einsum("bt,bts->bs", jnp.where(mask, weights, 0.0), onehot, precision="highest")
  return safe_divide(sums, counts)


def safe_divide(num, den) -> jax.Array:
  """``num / den``, exactly 0 where ``den`` is 0, with a finite gradient there (the double
  ``where`` of the JAX FAQ): an empty span or an all-masked batch costs 0, never NaN."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def mask_to_weights(span_mask: jax.Array) -> jax.Array:
  """A bool mask or float weights as float32 weights."""
  return span_mask.astype(F32)


def mask_to_bool(span_mask: jax.Array) -> jax.Array:
  """Which positions count: ``True`` where the mask (or weight) is non-zero."""
  if span_mask.dtype == jnp.bool_:
    return span_mask
  return span_mask != 0
