"""Scaling out on JAX's own SPMD runtime: meshes, the vocabulary-parallel loss, sharded state.

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary,
``n`` shards of the vocabulary (size of the ``model`` mesh axis).

Everything here is a thin layer over :class:`jax.sharding.Mesh`, :func:`jax.shard_map` and
:func:`jax.distributed.initialize` — the multi-controller runtime TPU pods and GPU clusters
already use:

* **Vocabulary-parallel loss.** :func:`linear_nll_loss`, :func:`linear_sequence_nll`,
  :func:`linear_segment_nll`, :func:`linear_token_nll` and :func:`sequence_nll` take the
  single-device arguments plus a ``mesh`` and run the loss of :mod:`jaxnll.fused` /
  :mod:`jaxnll.nll` inside a ``shard_map`` with the head weight (or the
  logits) split along the vocabulary over the ``model`` axis and the batch over ``data``.
  Each device computes only its ``V / n`` columns; per-token statistics (max, sum of
  exponentials, target logit) are combined with one collective each, as in Megatron-style
  vocabulary-parallel cross-entropy, so per-device loss memory falls as ``1/n``.  A vocabulary
  the shard count does not divide is padded with columns that never count.  Values and
  gradients equal the single-device ones, and the batch loss is normalised over the *global*
  batch (``Σ sums / Σ counts`` across devices, exactly).
* **Meshes.** :func:`parse_mesh` / :func:`make_mesh` turn ``"data=4,model=2"`` into a mesh.
* **Training state and processes** (sharding the parameters by Flax partitioning metadata,
  feeding each process its slice of a batch, :func:`jax.distributed.initialize`) belong to
  the application: :mod:`jaxnll.train.runtime`.

Inside your own ``shard_map``, call :func:`jaxnll.fused.linear_nll_loss` (or
:func:`jaxnll.sequence_nll`) with ``vocab_axis="model", vocab_size=V`` directly: values and
gradients are exact with ``check_vma`` on (the default) or off — with it off JAX hands each
shard a part of a replicated result's cotangent, and the backward sums the parts over the
vocabulary axis first — under ``jax.jit`` or eagerly (the fused kernels then run as one
jitted call each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core
from jaxnll import fused as fused_lib
from jaxnll import nll as nll_lib

DATA = "data"
MODEL = "model"
#: Layout of a micro-batched batch ``[K, B/K, ...]``: rows split over ``data``.
BATCH_SPEC = P(None, DATA)

# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str) -> dict[str, int]:
  """``"data=4,model=2"`` as ``{"data": 4, "model": 2}`` (order kept; one size may be ``-1``:
  all remaining devices).

  Examples:
    >>> parse_mesh("data=4,model=2")
    {'data': 4, 'model': 2}
    >>> parse_mesh("model=8")
    {'model': 8}
  """
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.strip().partition("=")
    name = name.strip()
    try:
      value = int(size)
    except ValueError:
      value = 0
    if not sep or not name.isidentifier() or value == 0 or value < -1:
      raise ValueError(
        f"mesh must look like 'data=4,model=2' (axis=size, comma separated), got {spec!r}"
      )
    if name in axes:
      raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
    axes[name] = value
  if sum(v == -1 for v in axes.values()) > 1:
    raise ValueError(f"at most one mesh axis may have size -1, got {spec!r}")
  return axes


def make_mesh(axes: str | dict[str, int] | None = None, *, devices=None) -> Mesh:
  """A mesh over ``devices`` (default: every device of every process).

  Args:
    axes: ``"data=4,model=2"``, a dict of axis sizes, or None for ``data`` over all devices.
      The sizes must multiply to the device count (one may be ``-1``: the rest).
    devices: the devices to use (default ``jax.devices()``).

  Returns:
    A :class:`jax.sharding.Mesh` with ``Auto`` axes (usable by ``jax.jit`` and ``shard_map``
    with unsharded inputs).
  """
  devices = jax.devices() if devices is None else list(devices)
  if axes is None:
    axes = {DATA: -1}
  elif isinstance(axes, str):
    axes = parse_mesh(axes)
  axes = dict(axes)
  known = math.prod(v for v in axes.values() if v != -1)
  for name, size in axes.items():
    if size == -1:
      if len(devices) % known:
        raise ValueError(f"mesh {axes} does not divide the {len(devices)} devices")
      axes[name] = len(devices) // known
  if math.prod(axes.values()) != len(devices):
    raise ValueError(
      f"mesh {axes} has {math.prod(axes.values())} devices, but there are {len(devices)}: "
      "the axis sizes must multiply to the device count (one size may be -1: the rest)"
    )
  return jax.make_mesh(
    tuple(axes.values()),
    tuple(axes),
    axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
    devices=devices,
  )


def axis_size(mesh: Mesh, name: str | Sequence[str] | None) -> int:
  """Number of shards along mesh axis ``name`` (a tuple: the product; None or absent: 1)."""
  if name is None:
    return 1
  names = (name,) if isinstance(name, str) else tuple(name)
  return math.prod(mesh.shape[n] for n in names if n in mesh.shape)


def _axes(mesh: Mesh, data_axis, model_axis):
  """Checked ``(data_axis, model_axis)``: ``data_axis=None`` means ``"data"`` if the mesh has
  it; a name the mesh lacks is an error."""
  if data_axis is None:
    data_axis = DATA if DATA in mesh.axis_names else None
  names = () if data_axis is None else (data_axis,) if isinstance(data_axis, str) else data_axis
  for name in (*names, model_axis):
    if name not in mesh.axis_names:
      raise ValueError(f"mesh axis {name!r} is not in the mesh {dict(mesh.shape)}")
  if model_axis in names:
    raise ValueError(f"the batch and the vocabulary cannot both be split over {model_axis!r}")
  return data_axis, model_axis


def _check_batch(mesh, data_axis, rows):
  shards = axis_size(mesh, data_axis)
  if rows % shards:
    raise ValueError(
      f"the batch of {rows} rows does not split over the {shards} shards of mesh axis "
      f"{data_axis!r}; use a multiple of {shards}"
    )


# ----------------------------------------------------------------------------- vocabulary-parallel


def padded_vocab(vocab: int, shards: int) -> int:
  """``vocab`` rounded up to a multiple of ``shards``.

  Examples:
    >>> padded_vocab(128256, 8), padded_vocab(264, 5)
    (128256, 265)
  """
  return -(-vocab // shards) * shards


def pad_vocab(x: Array, shards: int, *, axis: int = -1) -> Array:
  """``x`` with its vocabulary ``axis`` zero-padded to a multiple of ``shards`` (no copy when
  it already is one).  Pass the true size as ``vocab_size`` so the padding never counts; its
  gradient is sliced back off by autodiff."""
  vocab = x.shape[axis]
  extra = padded_vocab(vocab, shards) - vocab
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _scalar_loss(loss, sums, counts, normalize, data_axis):
  """The global batch loss from each batch shard's ``linear_nll_loss`` value.

  The local value is ``num / den`` of the local :func:`jaxnll.loss_terms`; multiplying back
  by the (constant) local denominator and dividing the summed numerators by the summed
  denominators gives the full-batch value — and its exact gradient — whatever each shard's
  token count.
  """
  if data_axis is None:
    return loss
  if normalize == "sum":
    return jax.lax.psum(loss, data_axis)
  _, den = nll_lib.loss_terms(jax.lax.stop_gradient(sums), counts, normalize=normalize)
  num = jax.lax.psum(loss * den, data_axis)
  return nll_lib.finish_loss(num, jax.lax.psum(den, data_axis), normalize=normalize)


def linear_nll_loss(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  mesh: Mesh,
  normalize: str = "tokens",
  bias: Float[Array, " V"] | None = None,
  data_axis: str | Sequence[str] | None = None,
  model_axis: str = MODEL,
  **options,
) -> tuple[Float[Array, ""], Float[Array, " B"]]:
  """:func:`jaxnll.linear_nll_loss` with the head split along the vocabulary over ``mesh``.

  The batch is split over ``data_axis`` and the vocabulary over ``model_axis``; each device
  runs the fused kernel on its ``[B/d, T, D] × [D, V/n]`` block and the statistics are
  combined with collectives.  The batch loss is normalised over the whole batch (as on one
  device, not a mean of per-device means):

  .. math::

     L = \\frac{\\sum_{\\text{devices}} N_k}{\\sum_{\\text{devices}} D_k}
     \\quad\\text{(}N, D\\text{ from :func:`jaxnll.loss_terms`)}.

  A vocabulary that ``n`` does not divide is zero-padded (:func:`pad_vocab`) and the padding
  masked; pass an already padded head with ``vocab_size=`` to avoid that copy.

  Args:
    hidden, weight, targets, span_mask, bias, normalize: as in :func:`jaxnll.linear_nll_loss`
      (global arrays; any sharding, resharded as needed).
    mesh: a :class:`jax.sharding.Mesh` with a ``model_axis`` (use :func:`make_mesh`).
    data_axis: mesh axis (or axes) the batch is split over; default ``"data"`` if the mesh
      has it, else none.
    model_axis: mesh axis the vocabulary is split over (default ``"model"``).
    **options: ``z_loss``, ``label_smoothing``, ``logit_softcap``, ``vocab_size``,
      ``schedule``, ``token_chunk``, ``vocab_chunk``, ``implementation`` of
      :func:`jaxnll.linear_nll_loss`.

  Returns:
    ``(loss, sums)``: float32 scalar (replicated) and float32 ``[B]`` per-sample sums (split
    over ``data_axis``).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxnll
    >>> mesh = make_mesh({"model": 1}, devices=jax.devices()[:1])
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((2, 5), int), jnp.ones((2, 5), bool)
    >>> loss, sums = linear_nll_loss(h, w, y, span, mesh=mesh)
    >>> bool(jnp.isclose(loss, jaxnll.linear_nll_loss(h, w, y, span)[0]))
    True
  """
  return _fused_entry(
    "loss",
    hidden,
    weight,
    targets,
    span_mask,
    mesh,
    bias,
    data_axis,
    model_axis,
    dict(options, normalize=normalize),
  )


def linear_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  mesh: Mesh,
  bias: Float[Array, " V"] | None = None,
  data_axis: str | Sequence[str] | None = None,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, " B"]:
  """:func:`jaxnll.linear_sequence_nll` with the head split along the vocabulary over ``mesh``.

  Per-sample values and gradients equal the single-device ones; see :func:`linear_nll_loss`
  for the mesh arguments.  ``**options``: ``reduction`` and the options of
  :func:`jaxnll.linear_sequence_nll`.

  Returns:
    float32 ``[B]`` (split over ``data_axis``).
  """
  return _fused_entry(
    "sequence", hidden, weight, targets, span_mask, mesh, bias, data_axis, model_axis, options
  )


def linear_segment_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[Array, "B T"],
  *,
  mesh: Mesh,
  num_segments: int,
  bias: Float[Array, " V"] | None = None,
  data_axis: str | Sequence[str] | None = None,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, "B S"]:
  """:func:`jaxnll.linear_segment_nll` with the head split along the vocabulary over ``mesh``.

  .. math::

     L_{b,s} = \\sum_t [\\mathrm{seg}_{b,t} = s]\\, w_{b,t}\\, \\ell_{b,t},
     \\quad \\ell \\text{ from per-shard statistics combined with collectives.}

  Args:
    hidden, weight, targets, span_mask, segment_ids, num_segments, bias: as in
      :func:`jaxnll.linear_segment_nll` (global arrays).
    mesh, data_axis, model_axis: as in :func:`linear_nll_loss`.
    **options: ``reduction`` and the other options of :func:`jaxnll.linear_segment_nll`.

  Returns:
    float32 ``[B, num_segments]`` (split over ``data_axis``).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxnll
    >>> mesh = make_mesh({"model": 1}, devices=jax.devices()[:1])
    >>> h = jax.random.normal(jax.random.key(0), (1, 4, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span, seg = jnp.ones((1, 4), int), jnp.ones((1, 4), bool), jnp.array([[1, 1, 2, 2]])
    >>> got = linear_segment_nll(h, w, y, span, seg, mesh=mesh, num_segments=2)
    >>> bool(jnp.allclose(got, jaxnll.linear_segment_nll(h, w, y, span, seg, num_segments=2)))
    True
  """
  options = dict(options, num_segments=num_segments)
  return _fused_entry(
    "segment", hidden, weight, targets, span_mask, mesh, bias, data_axis, model_axis, options,
    extra=segment_ids,
  )  # fmt: skip


def linear_token_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  mesh: Mesh,
  bias: Float[Array, " V"] | None = None,
  data_axis: str | Sequence[str] | None = None,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], Float[Array, "B T"]]:
  """:func:`jaxnll.linear_token_nll` with the head split along the vocabulary over ``mesh``.

  .. math::

     \\ell_{b,t} = \\mathrm{lse}(z_{b,t}) - z_{b,t,y}, \\qquad H_{b,t} = \\mathrm{lse}(z_{b,t})
     - \\textstyle\\sum_v p_v z_v,

  with the row max, sum of exponentials and ``Σ e^{z - m} z`` of each shard combined with one
  collective each.

  Args:
    hidden, weight, targets, span_mask, bias: as in :func:`jaxnll.linear_token_nll`.
    mesh, data_axis, model_axis: as in :func:`linear_nll_loss`.
    **options: ``temperature``, ``return_entropy`` and the other options of
      :func:`jaxnll.linear_token_nll`.

  Returns:
    float32 ``[B, T]`` (or ``(nll, entropy)``), split over ``data_axis``.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxnll
    >>> mesh = make_mesh({"model": 1}, devices=jax.devices()[:1])
    >>> h = jax.random.normal(jax.random.key(0), (2, 4, 8))
    >>> w = jax.random.normal(jax.random.key(1), (8, 11))
    >>> y, span = jnp.ones((2, 4), int), jnp.ones((2, 4), bool)
    >>> got = linear_token_nll(h, w, y, span, mesh=mesh)
    >>> bool(jnp.allclose(got, jaxnll.linear_token_nll(h, w, y, span)))
    True
  """
  return _fused_entry(
    "token", hidden, weight, targets, span_mask, mesh, bias, data_axis, model_axis, options
  )


def _fused_entry(
  kind, hidden, weight, targets, span_mask, mesh, bias, data_axis, model_axis, options, extra=None
):
  layout = options.get("weight_layout", "dv")
  # The checked ids: int32, a 64-bit NumPy id outside [0, 2**31) at -1 (never wrapped).
  targets = _core.check_fused_arrays(hidden, weight, targets, span_mask, bias, layout)[2]
  data_axis, model_axis = _axes(mesh, data_axis, model_axis)
  _check_batch(mesh, data_axis, np.shape(hidden)[0])
  shards = axis_size(mesh, model_axis)
  vocab_axis = 0 if layout == "vd" else 1
  vocab = np.shape(weight)[vocab_axis]
  vocab_size = options.pop("vocab_size", None)
  vocab_size = vocab if vocab_size is None else vocab_size
  weight = pad_vocab(jnp.asarray(weight), shards, axis=vocab_axis)
  bias = None if bias is None else pad_vocab(jnp.asarray(bias), shards)
  rows = P(data_axis)
  cols = P(model_axis, None) if layout == "vd" else P(None, model_axis)
  normalize = options.get("normalize")
  if kind == "loss" and options.get("segment_ids") is not None:
    extra = options.pop("segment_ids")  # split over the batch like the rows it labels

  def local(h, w, b, y, m, *more):
    kw = dict(options, bias=b, vocab_axis=model_axis, vocab_size=vocab_size)
    if kind == "sequence":
      return fused_lib.linear_sequence_nll(h, w, y, m, **kw)
    if kind == "segment":
      return fused_lib.linear_segment_nll(h, w, y, m, *more, **kw)
    if kind == "token":
      return fused_lib.linear_token_nll(h, w, y, m, **kw)
    if more:
      kw["segment_ids"] = more[0]
    loss, sums = fused_lib.linear_nll_loss(h, w, y, m, **kw)
    counts = nll_lib.span_counts(m)
    # The denominator reads the counts alone (per-segment sums have another shape).
    rows_sums = jnp.zeros_like(counts) if more else sums
    return _scalar_loss(loss, rows_sums, counts, normalize, data_axis), sums

  if kind == "loss":
    out_specs = (P(), rows)
  elif kind == "token" and options.get("return_entropy"):
    out_specs = (rows, rows)
  else:
    out_specs = rows
  args = (hidden, weight, bias, targets, span_mask) + (() if extra is None else (extra,))
  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(rows, cols, None if bias is None else P(model_axis), rows, rows)
    + (() if extra is None else (rows,)),
    out_specs=out_specs,
  )
  # jit: shard_map's eager mode cannot run the kernels' custom_vjp; inside an outer jit this
  # is inlined.
  return jax.jit(sharded)(*args)


def sequence_nll(
  logits: Float[Array, "B T V"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  mesh: Mesh,
  data_axis: str | Sequence[str] | None = None,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, " B"]:
  """:func:`jaxnll.sequence_nll` with the logits split along the vocabulary over ``mesh``.

  ``**options``: ``reduction``, ``z_loss``, ``label_smoothing``, ``logit_softcap``,
  ``vocab_size``.  A vocabulary ``n`` does not divide is padded and masked.

  Returns:
    float32 ``[B]`` (split over ``data_axis``).
  """
  _core.check_rank("logits", logits, (3,), "[B, T, V]")
  data_axis, model_axis = _axes(mesh, data_axis, model_axis)
  _check_batch(mesh, data_axis, np.shape(logits)[0])
  vocab = np.shape(logits)[-1]
  options.setdefault("vocab_size", vocab)
  targets = _core.int32_ids(targets)  # before jit narrows a 64-bit NumPy id (no wrap)
  logits = pad_vocab(jnp.asarray(logits), axis_size(mesh, model_axis))
  rows = P(data_axis)

  def local(x, y, m):
    return nll_lib.sequence_nll(x, y, m, vocab_axis=model_axis, **options)

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(P(data_axis, None, model_axis), rows, rows), out_specs=rows
  )
  return jax.jit(sharded)(logits, targets, span_mask)


def _context_mesh(model_axis: str):
  """The mesh set with :func:`jax.set_mesh` if it splits ``model_axis`` (size > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(model_axis, 1) < 2:
    return None
  return mesh


def head_loss(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  model_axis: str = MODEL,
  **options,
) -> tuple[Float[Array, ""], Float[Array, " B"]]:
  """:func:`jaxnll.linear_nll_loss`, vocabulary-parallel when the context mesh asks for it.

  Inside ``with jax.set_mesh(mesh):`` with a ``model_axis`` of size > 1 this is
  :func:`linear_nll_loss` on that mesh (the head split along the vocabulary, the batch over
  ``data``); otherwise the single-device kernel.  This lets one train step serve one device,
  data parallelism and data × model meshes.
  """
  mesh = _context_mesh(model_axis)
  if mesh is None:
    return fused_lib.linear_nll_loss(hidden, weight, targets, span_mask, **options)
  return linear_nll_loss(
    hidden, weight, targets, span_mask, mesh=mesh, model_axis=model_axis, **options
  )


def head_sequence_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, " B"]:
  """:func:`jaxnll.linear_sequence_nll`, vocabulary-parallel when the context mesh asks for it
  (see :func:`head_loss`)."""
  mesh = _context_mesh(model_axis)
  if mesh is None:
    return fused_lib.linear_sequence_nll(hidden, weight, targets, span_mask, **options)
  return linear_sequence_nll(
    hidden, weight, targets, span_mask, mesh=mesh, model_axis=model_axis, **options
  )


def head_segment_nll(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  segment_ids: Int[Array, "B T"],
  *,
  num_segments: int,
  model_axis: str = MODEL,
  **options,
) -> Float[Array, "B S"]:
  """:func:`jaxnll.linear_segment_nll`, vocabulary-parallel when the context mesh asks for it
  (see :func:`head_loss`)."""
  mesh = _context_mesh(model_axis)
  if mesh is None:
    return fused_lib.linear_segment_nll(
      hidden, weight, targets, span_mask, segment_ids, num_segments=num_segments, **options
    )
  return linear_segment_nll(
    hidden,
    weight,
    targets,
    span_mask,
    segment_ids,
    mesh=mesh,
    num_segments=num_segments,
    model_axis=model_axis,
    **options,
  )
