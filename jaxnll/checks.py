"""Run-time checks of a loss's inputs: one :func:`checked` for every loss of the API.

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary.

Shape, dtype and option mistakes are refused at trace time by every loss.  What only exists at
run time — a target id outside ``[0, V)`` or in a padding column past ``vocab_size``, a NaN or
``+inf`` logit or hidden state, an infinite loss — the fast losses turn into a NaN for that
sample, in its value and in the gradient that flows from it: loud, but it says nothing of where.
:func:`checked` wraps any loss and raises
:class:`jax.experimental.checkify.JaxRuntimeError` naming the first offending position.  Only
positions that reach the value are checked (the span; for
:func:`jaxnll.selective_sequence_nll` also ``valid_mask``; for packed rows, segments
``1..num_segments``): anything outside them is legitimate, and so are ``-inf`` logits (or
bias entries) that mask vocabulary entries, as long as the loss stays finite.

The ``check_*_inputs`` functions are the checks themselves, for use inside a function you
transform with :func:`jax.experimental.checkify.checkify` yourself (under your own
``jax.jit``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, Bool, Float, Int

from jaxnll import _core


def host_ids(x):
  """NumPy ids wider than 32 bits as int32 NumPy ids, every id that does not fit mapped to
  ``-1`` (:func:`jaxnll._core.int32_ids`: never wrapped to a valid id, ``2**32 + 3`` does not
  become ``3``), kept concrete for ``checkify`` to report.  Anything else is unchanged."""
  if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize == 8:
    return np.asarray(_core.int32_ids(x))
  return x


def _inside(mask, shape) -> jax.Array:
  """bool ``shape``: the positions a mask counts (every position when ``mask`` is None)."""
  if mask is None:
    return jnp.ones(shape, jnp.bool_)
  return _core.mask_to_bool(jnp.asarray(mask))


def _check_at(bad: jax.Array, message: str, **values) -> None:
  """``checkify.check`` that no element of ``bad`` holds; the message gets the first bad
  position as ``[i, j, ...] (flat position n)`` and ``values`` read at that position."""
  flat = bad.reshape(-1)
  pos = jnp.argmax(flat)
  index = jnp.unravel_index(pos, bad.shape) if bad.ndim else ()
  names = {f"i{k}": i for k, i in enumerate(index)}
  where = "[" + ", ".join("{" + n + "}" for n in names) + "] (flat position {pos})"
  if not names:
    where = "the scalar result"
  picked = {k: jnp.asarray(v).reshape(-1)[pos] for k, v in values.items()}
  checkify.check(~jnp.any(flat), message.replace("{where}", where), pos=pos, **names, **picked)


def _check_segment_ids(seg, inside) -> None:
  _check_at(
    inside & (seg < 0),
    "segment_ids hold {value} at {where} inside the span: a negative id is in no sample",
    value=seg,
  )


def _check_targets(targets, inside, columns: int, vocab_size: int | None) -> None:
  targets = jnp.asarray(targets)
  vocab = columns if vocab_size is None else vocab_size
  outside = inside & ~_core.target_in_range(targets, columns)
  _check_at(
    outside,
    "targets hold {value} at {where} inside the span, outside [0, " + f"{columns})",
    value=targets,
  )
  if vocab < columns:
    padding = (
      inside & _core.target_in_range(targets, columns) & ~_core.target_in_range(targets, vocab)
    )
    _check_at(
      padding,
      "targets hold {value} at {where} inside the span, a padding column "
      f"(vocab_size={vocab} of {columns} columns)",
      value=targets,
    )


def _check_row_values(name, x, inside, real, target_value, *, logit_softcap, label_smoothing):
  """Rows ``x[..., V]`` at ``inside`` positions: no NaN or ``+inf`` in a real column; ``-inf``
  only where it leaves the loss finite (not at the target, none at all with label smoothing),
  unless a soft-cap maps it to ``-c``."""
  x = jnp.asarray(x)
  nan_or_inf = jnp.isnan(x) | (x == jnp.inf)
  _check_at(
    inside & jnp.any(nan_or_inf & real, axis=-1),
    name + " hold NaN or +inf at {where} inside the span",
  )
  if logit_softcap is not None:
    return
  _check_at(
    inside & (target_value == -jnp.inf),
    name + " are -inf at the target id at {where} inside the span (infinite loss)",
  )
  if label_smoothing:
    _check_at(
      inside & jnp.any((x == -jnp.inf) & real, axis=-1),
      name + " hold -inf at {where} inside the span: with label_smoothing > 0 every entry of "
      "the vocabulary counts (infinite loss)",
    )


def check_logits_inputs(
  logits: Float[Array, "... V"],
  targets: Int[Array, "..."],
  span_mask: Bool[Array, "..."] | Float[Array, "..."] | None = None,
  *,
  valid_mask: Bool[Array, "..."] | Float[Array, "..."] | None = None,
  segment_ids: Int[Array, "..."] | None = None,
  num_segments: int | None = None,
  vocab_size: int | None = None,
  logit_softcap: float | None = None,
  label_smoothing: float = 0.0,
) -> None:
  """Run-time checks of a loss from logits, for use under ``checkify.checkify``.

  At every position that reaches the value (``span_mask``, all positions when None; also
  ``valid_mask`` when given; only segments ``1..num_segments`` of packed rows) it flags a
  target outside ``[0, V)`` or in a padding column at or past ``vocab_size``, and logits
  that make the loss non-finite: NaN or ``+inf`` in a real column, ``-inf`` at the target (or
  anywhere, with label smoothing; never with a soft-cap).  ``-inf`` elsewhere is a
  legitimate vocabulary mask.
  """
  logits, targets = jnp.asarray(logits), jnp.asarray(targets)
  inside = _inside(span_mask, targets.shape)
  if valid_mask is not None:
    inside = inside | _inside(valid_mask, targets.shape)
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    _check_segment_ids(seg, inside)
    inside = inside & (seg > 0) & (True if num_segments is None else seg <= num_segments)
  columns = logits.shape[-1]
  vocab = columns if vocab_size is None else vocab_size
  _check_targets(targets, inside, columns, vocab_size)
  real = jnp.arange(columns) < vocab
  safe = jnp.where(_core.target_in_range(targets, columns), targets, 0)
  target_value = jnp.take_along_axis(logits, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
  _check_row_values(
    "logits",
    logits,
    inside,
    real,
    target_value,
    logit_softcap=logit_softcap,
    label_smoothing=label_smoothing,
  )


def check_fused_inputs(
  hidden: Float[Array, "B T D"],
  weight: Float[Array, "D V"] | Float[Array, "V D"],
  targets: Int[Array, "B T"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  bias: Float[Array, " V"] | None = None,
  segment_ids: Int[Array, "B T"] | None = None,
  num_segments: int | None = None,
  vocab_size: int | None = None,
  weight_layout: str = "dv",
  logit_softcap: float | None = None,
  label_smoothing: float = 0.0,
) -> None:
  """Run-time checks of a fused loss (``hidden @ weight + bias``), under ``checkify.checkify``.

  Flags a target outside ``[0, V)`` (``V`` the weight's vocabulary columns) or in a padding
  column past ``vocab_size``, and a non-finite hidden state, at a position inside the span;
  a non-finite weight entry in a real column (it reaches every token); a NaN or ``+inf`` bias
  entry, and a ``-inf`` one at a target (or anywhere, with label smoothing), as for logits.
  """
  hidden, weight, targets = map(jnp.asarray, (hidden, weight, targets))
  inside = _inside(span_mask, targets.shape)
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    _check_segment_ids(seg, inside)
    inside = inside & (seg > 0) & (True if num_segments is None else seg <= num_segments)
  w = weight.T if weight_layout == "vd" else weight  # [D, V]
  columns = w.shape[-1]
  vocab = columns if vocab_size is None else vocab_size
  real = jnp.arange(columns) < vocab
  _check_targets(targets, inside, columns, vocab_size)
  _check_at(
    inside & ~jnp.all(jnp.isfinite(hidden), axis=-1),
    "hidden is not finite at {where} inside the span",
  )
  _check_at(~jnp.isfinite(w) & real, "weight is not finite at [d, v] = {where}")
  if bias is not None:
    bias = jnp.asarray(bias)
    safe = jnp.where(_core.target_in_range(targets, columns), targets, 0).astype(jnp.int32)
    rows = jnp.broadcast_to(bias, (*targets.shape, columns))
    _check_row_values(
      "bias",
      rows,
      inside,
      real,
      jnp.take(bias, safe),
      logit_softcap=logit_softcap,
      label_smoothing=label_smoothing,
    )


def check_distill_inputs(
  student_logits: Float[Array, "B T V"],
  teacher_logits: Float[Array, "B T V"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  segment_ids: Int[Array, "B T"] | None = None,
  num_segments: int | None = None,
) -> None:
  """Run-time checks of a distillation loss, for use under ``checkify.checkify``.

  Flags, at positions inside the span, exactly what makes the loss non-finite: NaN or
  ``+inf`` logits, a teacher row that is all ``-inf``, and a student logit of ``-inf`` where
  the teacher's probability is not zero.  Positions outside the span are not checked.
  """
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  inside = _inside(span_mask, s.shape[:-1])
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids)
    _check_segment_ids(seg, inside)
    inside = inside & (seg > 0) & (True if num_segments is None else seg <= num_segments)
  for name, x in (("student_logits", s), ("teacher_logits", t)):
    _check_at(
      inside & jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=-1),
      name + " hold NaN or +inf at {where} inside the span",
    )
  _check_at(
    inside & jnp.all(t == -jnp.inf, axis=-1),
    "teacher_logits are all -inf at {where} inside the span",
  )
  _check_at(
    inside & jnp.any((s == -jnp.inf) & (t != -jnp.inf), axis=-1),
    "student_logits are -inf where the teacher's probability is not 0, at {where} inside the "
    "span (infinite cross-entropy)",
  )


def check_fused_distill_inputs(
  student_hidden: Float[Array, "B T Ds"],
  student_weight: Float[Array, "Ds V"] | Float[Array, "V Ds"],
  teacher_hidden: Float[Array, "B T Dt"],
  teacher_weight: Float[Array, "Dt V"] | Float[Array, "V Dt"],
  span_mask: Bool[Array, "B T"] | Float[Array, "B T"],
  *,
  student_bias: Float[Array, " V"] | None = None,
  teacher_bias: Float[Array, " V"] | None = None,
) -> None:
  """Run-time checks of the fused distillation (both heads), under ``checkify.checkify``.

  Flags a non-finite hidden state of either model at a position inside the span, and a
  non-finite entry of either head or bias (it reaches every position).
  """
  sh, th = jnp.asarray(student_hidden), jnp.asarray(teacher_hidden)
  inside = _inside(span_mask, sh.shape[:-1])
  for name, h in (("student_hidden", sh), ("teacher_hidden", th)):
    bad = inside & ~jnp.all(jnp.isfinite(h), axis=-1)
    _check_at(bad, name + " is not finite at {where} inside the span")
  named = (
    ("student_weight", student_weight),
    ("teacher_weight", teacher_weight),
    ("student_bias", student_bias),
    ("teacher_bias", teacher_bias),
  )
  for name, x in named:
    if x is not None:
      _check_at(~jnp.isfinite(jnp.asarray(x)), name + " is not finite at {where}")


# ----------------------------------------------------------------------------- one wrapper

#: The array arguments of each family of losses, in positional order.
_ROLES = {
  "logits": ("logits", "targets", "span_mask"),
  "fused": ("hidden", "weight", "targets", "span_mask"),
  "distill": ("student_logits", "teacher_logits", "span_mask"),
  "fused_distill": (
    "student_hidden",
    "student_weight",
    "teacher_hidden",
    "teacher_weight",
    "span_mask",
  ),
}
_OPTIONS = ("vocab_size", "logit_softcap", "label_smoothing", "num_segments", "weight_layout")


def _named_arguments(fn, args, kwargs) -> dict:
  """Every argument of the call by parameter name (defaults and ``partial`` keywords
  included; ``**token_opts`` flattened), or just ``kwargs`` when the signature is unknown."""
  try:
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
  except (TypeError, ValueError):
    return dict(kwargs)
  bound.apply_defaults()
  named = dict(bound.arguments)
  for p in sig.parameters.values():
    if p.kind is inspect.Parameter.VAR_KEYWORD:
      named.update(named.pop(p.name, {}))
    elif p.kind is inspect.Parameter.VAR_POSITIONAL:
      named.pop(p.name, None)
  return {**named, **kwargs}


def _is_integer(x) -> bool:
  try:
    return jnp.issubdtype(jnp.result_type(jnp.asarray(x)), jnp.integer)
  except (TypeError, ValueError):
    return False


def _family(args, named) -> str:
  for family, roles in _ROLES.items():
    if roles[0] in named:
      return family
  if len(args) < 2 or _is_integer(args[1]):
    return "logits"
  return "fused" if np.ndim(args[1]) == 2 else "distill"


def check_call(args: tuple, kwargs: dict, loss_fn: Callable | None = None) -> None:
  """The run-time checks of one call ``loss_fn(*args, **kwargs)`` of any jaxnll loss.

  The kind of loss is read from its parameter names (``logits`` / ``hidden`` /
  ``student_logits``) or, for a function with other names, from the arguments: integer
  second argument — logits; a ``[D, V]`` second argument — fused; else distillation.  A
  fourth positional argument is ``segment_ids`` when integer, else ``valid_mask``.
  """
  named = _named_arguments(loss_fn, args, kwargs) if loss_fn is not None else dict(kwargs)
  family = _family(args, named)
  roles = _ROLES[family]
  arrays = {r: args[k] for k, r in enumerate(roles) if k < len(args)}
  arrays.update({r: named[r] for r in roles if r in named})
  extra = args[len(roles)] if len(args) > len(roles) else None
  key = "segment_ids" if extra is not None and _is_integer(extra) else "valid_mask"
  extras = {key: extra} if extra is not None else {}
  for name in ("segment_ids", "valid_mask", "bias"):
    if named.get(name) is not None:
      extras[name] = named[name]
  if family == "logits" and "valid_mask" in named and named["valid_mask"] is None:
    # selective_sequence_nll's default: the value reports every position.
    extras["valid_mask"] = jnp.ones(jnp.shape(arrays["targets"]), jnp.bool_)
  options = {k: named[k] for k in _OPTIONS if named.get(k) is not None}
  if family == "logits":
    extras.pop("bias", None)
    options.pop("weight_layout", None)
    check_logits_inputs(*(arrays.get(r) for r in roles), **extras, **options)
  elif family == "fused":
    extras.pop("valid_mask", None)
    check_fused_inputs(*(arrays.get(r) for r in roles), **extras, **options)
  elif family == "fused_distill":
    biases = {k: named[k] for k in ("student_bias", "teacher_bias") if named.get(k) is not None}
    check_fused_distill_inputs(*(arrays.get(r) for r in roles), **biases)
  else:
    seg = {k: v for k, v in {**extras, **options}.items() if k in ("segment_ids", "num_segments")}
    check_distill_inputs(*(arrays.get(r) for r in roles), **seg)


def _check_output(out) -> None:
  """Every floating result finite: catches what no input check names (an overflow)."""
  for k, leaf in enumerate(jax.tree.leaves(out)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      _check_at(
        ~jnp.isfinite(leaf),
        f"result {k} of the loss is not finite" + " ({value}) at {where}, although its inputs "
        "passed every check",
        value=leaf,
      )


def _staged(x) -> bool:
  """Whether ``x`` is traced for staging (``jax.jit``), under any eager transformations
  (``grad``'s and ``vmap``'s tracers wrap the value they transform)."""
  for _ in range(64):
    if not isinstance(x, jax.core.Tracer):
      return False
    if type(x).__name__ == "DynamicJaxprTracer":
      return True
    inner = next((getattr(x, a) for a in ("primal", "val") if hasattr(x, a)), None)
    if inner is None:
      return True  # a tracer of an unknown kind: not known to be concrete
    x = inner
  return True


def checked(loss_fn: Callable) -> Callable:
  """Wraps any jaxnll loss with run-time checks that name the first offending position.

  One wrapper for every loss of the API: from logits (:func:`jaxnll.token_nll`,
  :func:`jaxnll.sequence_nll`, :func:`jaxnll.selective_sequence_nll`,
  :func:`jaxnll.segment_nll`), fused (:func:`jaxnll.linear_sequence_nll`,
  :func:`jaxnll.linear_nll_loss` and any ``linear_*`` entry taking ``(hidden, weight,
  targets, span_mask, ...)``) and distillation (:func:`jaxnll.distill_cross_entropy`), or a
  function of yours with the same leading arguments.  The fast losses make a sample with a
  bad value NaN; the checked one raises :class:`jax.experimental.checkify.JaxRuntimeError`
  instead, naming the position (see :func:`check_logits_inputs`,
  :func:`check_fused_inputs`, :func:`check_distill_inputs`), and also if a result is not
  finite for a reason no input check names.  It runs ``checkify`` itself, so call it outside
  ``jax.jit``; inside your own ``jit``, call a ``check_*_inputs`` function in a function you
  transform with ``checkify.checkify``.

  Args:
    loss_fn: the loss to wrap.

  Returns:
    A function with ``loss_fn``'s signature and results.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxnll
    >>> safe = checked(jaxnll.sequence_nll)
    >>> logits, span = jnp.zeros((1, 3, 4)), jnp.ones((1, 3), bool)
    >>> safe(logits, jnp.array([[0, 9, 1]]), span)
    Traceback (most recent call last):
    ...
    jax._src.checkify.JaxRuntimeError: targets hold 9 at [0, 1] (flat position 1) inside ...
  """

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    # Arrays are traced; everything else (options, Python lists) is closed over as it is.
    leaves, tree = jax.tree.flatten((args, kwargs))
    leaves = [host_ids(x) for x in leaves]
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def run(arrays):
      it = iter(arrays)
      a, k = jax.tree.unflatten(
        tree, [next(it) if t else x for x, t in zip(leaves, is_array, strict=True)]
      )
      check_call(a, k, loss_fn)
      out = loss_fn(*a, **k)
      _check_output(out)
      return out

    arrays = [x for x, t in zip(leaves, is_array, strict=True) if t]
    if any(_staged(x) for x in arrays):
      # An error of the call itself (a shape, an option) is raised as the loss raises it.
      jax.eval_shape(functools.partial(loss_fn, **kwargs), *args)
      name = getattr(loss_fn, "__name__", "loss_fn")
      raise RuntimeError(
        f"jaxnll.checked({name}) runs checkify and raises at once, so it cannot be called "
        "inside jax.jit (or a jit of grad): call it outside jit (eagerly; grad and vmap work), "
        "or call jaxnll.checks.check_*_inputs under your own checkify.checkify inside jit"
      )
    err, out = checkify.checkify(run)(arrays)
    err.throw()
    return out

  return wrapped
