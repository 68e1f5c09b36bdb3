"""Building ``[x, y]`` samples, shifting targets, span masks and packing.

Dimension letters used in the annotations: ``B`` batch, ``T`` sequence length, ``S`` spans
per row, ``L`` packed row length.

The coordinate convention of every loss: ``logits[b, t]`` predicts ``targets[b, t]``.  A row
of tokens becomes targets by a left shift (``targets[t] = tokens[t + 1]``), so the *first*
token of a target span is predicted from the last context position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxnll import _core


def concat_sample(
  x_ids: Int[Array, "... Tx"], y_ids: Int[Array, "... Ty"]
) -> tuple[Int[Array, "... T"], Bool[Array, "... T"]]:
  """Builds the sample ``[x, y]`` (context first, target after) and its target-span mask.

  Args:
    x_ids: context token ids ``[..., Tx]``.
    y_ids: target token ids ``[..., Ty]`` (same leading dimensions).

  Returns:
    ``(tokens, span_mask)`` of shape ``[..., Tx + Ty]``; the mask is ``True`` on ``y``.

  Examples:
    >>> import jax.numpy as jnp
    >>> tokens, span = concat_sample(jnp.array([9, 4, 6, 1]), jnp.array([3, 9, 1]))
    >>> tokens.tolist(), span.astype(int).tolist()
    ([9, 4, 6, 1, 3, 9, 1], [0, 0, 0, 0, 1, 1, 1])
  """
  x_ids, y_ids = _core.as_array("x_ids", x_ids), _core.as_array("y_ids", y_ids)
  _core.check_integer("x_ids", x_ids)
  _core.check_integer("y_ids", y_ids)
  x_ids, y_ids = jnp.asarray(x_ids), jnp.asarray(y_ids)
  if x_ids.ndim < 1 or x_ids.shape[:-1] != y_ids.shape[:-1]:
    raise ValueError(
      "x_ids and y_ids must be [..., Tx] and [..., Ty] with the same leading dimensions, "
      f"got shapes {x_ids.shape} and {y_ids.shape}"
    )
  dtype = jnp.promote_types(x_ids.dtype, y_ids.dtype)
  tokens = jnp.concatenate([x_ids.astype(dtype), y_ids.astype(dtype)], axis=-1)
  span = jnp.concatenate(
    [jnp.zeros(x_ids.shape, jnp.bool_), jnp.ones(y_ids.shape, jnp.bool_)], axis=-1
  )
  return tokens, span


def shift_targets(
  tokens: Int[ArrayLike, "... T"],
  span_mask: Bool[ArrayLike, "... T"] | Float[ArrayLike, "... T"],
  segment_ids: Int[ArrayLike, "... T"] | None = None,
) -> tuple[Int[Array, "... T"], Bool[Array, "... T"] | Float[Array, "... T"]]:
  """Turns a token row and its span mask into ``(targets, loss_mask)`` of the same length.

  ``targets[t] = tokens[t + 1]`` and ``loss_mask[t] = span_mask[t + 1]``: position ``t``
  is trained to predict the next token when that next token lies in a target span.  The last
  position predicts nothing (masked, target ``0``).  With packing (``segment_ids``, 0 for
  padding) a position whose next token belongs to another segment, or to padding, is masked.

  Args:
    tokens: token ids ``[..., T]``.
    span_mask: bool ``[..., T]`` (or float weights), ``True`` on target tokens.
    segment_ids: optional int ``[..., T]``; ``0`` marks padding.

  Returns:
    ``(targets, loss_mask)``, both ``[..., T]``; ``loss_mask`` keeps ``span_mask``'s dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> tokens = jnp.array([9, 4, 6, 1, 3, 9, 1])
    >>> span = jnp.array([0, 0, 0, 0, 1, 1, 1], bool)
    >>> targets, mask = shift_targets(tokens, span)
    >>> targets[:-1].tolist(), mask.astype(int).tolist()
    ([4, 6, 1, 3, 9, 1], [0, 0, 0, 1, 1, 1, 0])
  """
  tokens, span_mask = _core.as_array("tokens", tokens), _core.as_array("span_mask", span_mask)
  _core.check_integer("tokens", tokens)
  _core.check_mask("span_mask", span_mask)
  tokens, span_mask = jnp.asarray(tokens), jnp.asarray(span_mask)
  _core.check_rank("tokens", tokens, range(1, 8), "[..., T]")
  _core.check_same_shape("tokens", tokens, "span_mask", span_mask)
  # T = 0 stays T = 0 (nothing to shift, nothing to pad).
  pad = [(0, 0)] * (tokens.ndim - 1) + [(0, min(1, tokens.shape[-1]))]
  targets = jnp.pad(tokens[..., 1:], pad)
  loss_mask = jnp.pad(span_mask[..., 1:], pad)
  if segment_ids is not None:
    segment_ids = _core.as_array("segment_ids", segment_ids)
    _core.check_integer("segment_ids", segment_ids)
    segment_ids = jnp.asarray(segment_ids)
    _core.check_same_shape("tokens", tokens, "segment_ids", segment_ids)
    nxt = jnp.pad(segment_ids[..., 1:], pad)
    same = (nxt == segment_ids) & (nxt != 0)
    loss_mask = jnp.where(same, loss_mask, jnp.zeros((), loss_mask.dtype))
  return targets, loss_mask


def _first(bad: np.ndarray) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(bad)[0])


def _check_span_bounds(starts, ends, length: int) -> None:
  """On concrete spans: ``0 <= start <= end <= length`` (under ``jax.jit`` they cannot be
  read; a span outside the row is then clipped to it)."""
  if isinstance(starts, jax.core.Tracer) or isinstance(ends, jax.core.Tracer):
    return
  lo, hi = np.asarray(starts), np.asarray(ends)
  for bad, what in (
    (lo < 0, "starts must be >= 0"),
    (hi > length, f"ends must be <= length {length}"),
    (lo > hi, "starts must be <= ends"),
  ):
    if bad.any():
      at = _first(bad)
      raise ValueError(f"{what}, got starts {lo[at]} and ends {hi[at]} at index {list(at)}")


def spans_to_mask(
  starts: Int[Array, " B"] | Int[Array, "B S"],
  ends: Int[Array, " B"] | Int[Array, "B S"],
  length: int,
) -> Bool[Array, "B L"]:
  """Half-open spans ``[start, end)`` as a bool mask ``[B, length]``.

  ``starts`` and ``ends`` are ``[B]`` (one span a row) or ``[B, S]`` (several spans a row; an
  empty span ``start == end`` adds nothing, so rows can have different span counts).

  Examples:
    >>> import jax.numpy as jnp
    >>> spans_to_mask(jnp.array([[1, 4]]), jnp.array([[2, 6]]), 7).astype(int).tolist()
    [[0, 1, 0, 0, 1, 1, 0]]
  """
  starts, ends = _core.as_array("starts", starts), _core.as_array("ends", ends)
  _core.check_integer("starts", starts)
  _core.check_integer("ends", ends)
  starts, ends = jnp.asarray(starts), jnp.asarray(ends)
  _core.check_same_shape("starts", starts, "ends", ends)
  _core.check_rank("starts", starts, (1, 2), "[B] or [B, S]")
  if not isinstance(length, (int, np.integer)) or length < 0:
    raise ValueError(f"length must be a non-negative Python int, got {length!r}")
  _check_span_bounds(starts, ends, length)
  if starts.ndim == 1:
    starts, ends = starts[:, None], ends[:, None]
  t = jnp.arange(length).reshape(1, 1, length)
  inside = (t >= starts[..., None]) & (t < ends[..., None])  # [B, S, L]
  return jnp.any(inside, axis=1)


def from_ignore_index(
  labels: Int[Array, "..."], ignore_index: int = -100
) -> tuple[Int[Array, "..."], Bool[Array, "..."]]:
  """Hugging Face style labels (``ignore_index`` where no loss) to ``(targets, mask)``.

  The ignored positions get target ``0`` (never read by the losses) and mask ``False``.

  Examples:
    >>> import jax.numpy as jnp
    >>> targets, mask = from_ignore_index(jnp.array([-100, -100, 5, 7]))
    >>> targets.tolist(), mask.tolist()
    ([0, 0, 5, 7], [False, False, True, True])
  """
  if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
    raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
  labels = _core.as_array("labels", labels)
  _core.check_integer("labels", labels)
  labels = jnp.asarray(labels)
  mask = labels != ignore_index
  return jnp.where(mask, labels, 0), mask


def stop_gradient_outside(
  x: Float[Array, "B T ..."], span_mask: Bool[Array, "B T"] | Float[Array, "B T"]
) -> Float[Array, "B T ..."]:
  """``x`` unchanged in the forward pass; no gradient flows at positions outside the span.

  The model-level reading of selective gradient propagation: applied to activations at the
  context positions, it keeps gradients out of the context's part of the network.  The mask is
  broadcast over ``x``'s trailing feature dimensions.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> span = jnp.array([False, True])
    >>> jax.grad(lambda x: stop_gradient_outside(x, span).sum())(jnp.ones(2)).tolist()
    [0.0, 1.0]
  """
  x, span_mask = _core.as_array("x", x), _core.as_array("span_mask", span_mask)
  _core.check_mask("span_mask", span_mask)
  x, span_mask = jnp.asarray(x), jnp.asarray(span_mask)
  if x.shape[: span_mask.ndim] != span_mask.shape:
    raise ValueError(
      "span_mask must match the leading dimensions of x, got shapes "
      f"x {x.shape} and span_mask {span_mask.shape}"
    )
  keep = _core.mask_to_bool(span_mask).reshape(span_mask.shape + (1,) * (x.ndim - span_mask.ndim))
  return jnp.where(keep, x, jax.lax.stop_gradient(x))


def _pack_sample(i: int, tok, span) -> tuple[np.ndarray, np.ndarray]:
  """Sample ``i`` as (int32 token ids, bool span or float32 weights), refusing what would
  change meaning on the way: a float or bool token, an id outside ``[0, 2**31)``, a span that
  is not bool, 0/1 integers or finite float weights."""
  tok, span = np.asarray(tok), np.asarray(span)
  if tok.ndim != 1 or span.ndim != 1:
    raise ValueError(
      f"sample {i}: tokens and span_mask must be 1-D, got shapes {tok.shape} and {span.shape}"
    )
  if tok.size and (tok.dtype.kind not in "iu"):
    raise ValueError(f"sample {i}: tokens must be integer ids, got dtype {tok.dtype}")
  if tok.size and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
    bad = tok[(tok < 0) | (tok > np.iinfo(np.int32).max)][0]
    raise ValueError(f"sample {i}: tokens must be ids in [0, 2**31), got {bad}")
  if span.size and span.dtype.kind == "f":
    if not np.all(np.isfinite(span)):
      raise ValueError(f"sample {i}: span_mask weights must be finite")
    return tok.astype(np.int32), span.astype(np.float32)
  if span.size and (span.dtype.kind not in "biu" or not np.isin(span, (0, 1)).all()):
    raise ValueError(
      f"sample {i}: span_mask must be bools, 0/1 or float weights, got {span.tolist()[:8]}"
    )
  return tok.astype(np.int32), span.astype(np.bool_)


class Packed(NamedTuple):
  """Rows of packed samples (NumPy arrays, all ``[R, L]``)."""

  tokens: np.ndarray
  span_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  sample_index: list[list[int]]
  """``sample_index[r]`` lists the input samples in row ``r``, by segment id ``1, 2, ...``."""


def pack_samples(
  samples: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
  length: int,
  *,
  pad_id: int = 0,
) -> Packed:
  """Lays ``[x, y]`` samples into fixed-length rows, first-fit, with segment ids.

  Each sample is ``(tokens, span_mask)``.  Samples keep their input order inside a row and
  get segment ids ``1, 2, ...`` in that row; ``0`` marks padding.  Positions restart at 0 in
  every segment.  Use :func:`shift_targets` with the segment ids to build targets: nothing is
  predicted across a segment boundary.

  ``span_mask`` is bool, or float32 weights (kept as given) when any sample's span holds float
  weights.

  Raises:
    ValueError: naming the sample, if it is longer than ``length``, its tokens are not integer
      ids in ``[0, 2**31)`` or its span is not bools / 0-1 integers / finite float weights;
      naming ``pad_id`` or ``length`` when they are not such an id / a positive int.

  Examples:
    >>> p = pack_samples([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6], [1])], 4)
    >>> p.segment_ids.tolist()
    [[1, 1, 1, 2], [1, 1, 0, 0]]
    >>> p.tokens.tolist()
    [[1, 2, 3, 6], [4, 5, 0, 0]]
  """
  if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length <= 0:
    raise ValueError(f"length must be a positive int, got {length!r}")
  if (
    not isinstance(pad_id, (int, np.integer))
    or isinstance(pad_id, bool)
    or not 0 <= pad_id <= np.iinfo(np.int32).max
  ):
    raise ValueError(f"pad_id must be a token id, an int in [0, 2**31), got {pad_id!r}")
  samples = [_pack_sample(i, tok, span) for i, (tok, span) in enumerate(samples)]
  weighted = any(span.dtype.kind == "f" for _, span in samples)
  rows: list[list[int]] = []  # sample indices per row
  free: list[int] = []
  for i, (tok, span) in enumerate(samples):
    n = len(tok)
    if len(span) != n:
      raise ValueError(
        f"sample {i}: tokens and span_mask must have the same length, got {n} and {len(span)}"
      )
    if n > length:
      raise ValueError(f"sample {i} has {n} tokens, longer than the row length {length}")
    for r, room in enumerate(free):
      if n <= room:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(length - n)
  shape = (len(rows), length)
  tokens = np.full(shape, pad_id, np.int32)
  span_mask = np.zeros(shape, np.float32 if weighted else np.bool_)
  segment_ids = np.zeros(shape, np.int32)
  positions = np.zeros(shape, np.int32)
  for r, members in enumerate(rows):
    at = 0
    for seg, i in enumerate(members, start=1):
      tok, span = samples[i]
      n = len(tok)
      tokens[r, at : at + n] = tok
      span_mask[r, at : at + n] = span
      segment_ids[r, at : at + n] = seg
      positions[r, at : at + n] = np.arange(n)
      at += n
  return Packed(tokens, span_mask, segment_ids, positions, rows)
