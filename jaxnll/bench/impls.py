"""What is compared: the problems (:class:`Op`) and the implementations of each (:class:`Impl`).

Every implementation is ``loss(*arrays, span_mask) -> f32[]``, the summed loss over the target
span, so one harness checks, compiles and times them all.

Head (:data:`HEAD`: ``hidden [B, T, D], weight [D, V], targets [B, T], mask``),
:func:`implementations`:

``naive``
  ``hidden @ weight``, a full float32 ``log_softmax``, the target log-probability gathered.
``optax``
  ``optax.softmax_cross_entropy_with_integer_labels`` on the head's logits, masked sum.
``tokamax``
  ``tokamax.linear_softmax_cross_entropy_loss`` where it imports and runs.  It takes no mask:
  it always computes every position, so it is checked against the all-positions loss and costs
  the same at every span fraction.
``jaxnll_logits``
  :func:`jaxnll.sequence_nll` on the head's logits (the memory-lean ``custom_vjp``).
``jaxnll_fused_xla``
  :func:`jaxnll.linear_sequence_nll` with ``implementation="xla"`` (materialised logits).
``jaxnll_fused``
  :func:`jaxnll.linear_sequence_nll` (per-sample entry, no ``[B, T, V]`` logits).
``jaxnll_fused_scalar``
  :func:`jaxnll.linear_nll_loss` (scalar training entry, gradients built in the forward).
``matmul``
  the plain head matmul: the roofline, not a loss.

Logits (:data:`LOGITS`: ``logits [B, T, V], targets, mask``), :func:`logits_implementations`;
distillation (:data:`DISTILL`: ``student [B, T, V], teacher [B, T, V], mask``),
:func:`distill_implementations`; fused distillation through both heads (:data:`FUSED_DISTILL`:
``student_hidden [B, T, Ds], student_weight [Ds, V], teacher_hidden [B, T, Dt],
teacher_weight [Dt, V], mask``), :func:`fused_distill_implementations`; the
vocabulary-parallel head, :func:`parallel_implementations`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxnll.bench.specs import Case

F32 = jnp.float32
Loss = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Impl:
  """``loss(*arrays, mask) -> f32[]``: the summed span loss."""

  name: str
  loss: Loss
  reference: Loss | None = None
  """What it is checked against (None: its :class:`Op`'s reference)."""
  differentiable: bool = True
  """False: forward only and unchecked (the matmul roofline)."""


@dataclasses.dataclass(frozen=True)
class Op:
  """A problem: its inputs at a case, its reference loss, the arguments differentiated."""

  name: str
  inputs: Callable[[Case, int], tuple]
  """``(case, seed) -> arrays`` (every argument but the trailing span mask)."""
  reference: Loss
  argnums: tuple[int, ...]
  flops: Callable[[str, str, Case, int], float] | None = None
  """``(impl, pass, case, target tokens) -> useful FLOPs`` (None: not a matmul problem)."""


# ----------------------------------------------------------------------------- the head


def make_inputs(case: Case, seed: int = 0):
  """``(hidden [B, T, D], weight [D, V], targets [B, T])`` with unit-scale logits."""
  k = jax.random.split(jax.random.key(seed), 3)
  dtype = jnp.dtype(case.dtype)
  d, v = case.hidden, case.vocab
  hidden = jax.random.normal(k[0], (case.batch, case.length, d), dtype)
  # Uniform with the variance of N(0, 1/D): several times cheaper to draw than a normal, which
  # matters for a [4096, 256000] weight on a CPU.
  bound = math.sqrt(3.0 / d)
  weight = jax.random.uniform(k[1], (d, v), dtype, -bound, bound)
  targets = jax.random.randint(k[2], (case.batch, case.length), 0, v, jnp.int32)
  return hidden, weight, targets


def reference_loss(hidden, weight, targets, mask):
  """The summed span NLL by :func:`jaxnll.reference.linear_sequence_nll`, in float32 at full
  matmul precision, one row at a time and rematerialised in the backward: the float32 logits
  of a full-size head (8 GiB at 8k tokens and V = 256000) would not fit next to the others."""
  from jaxnll import reference

  w32 = weight.astype(F32)  # the weight gradient is summed over rows in float32

  def row(total, xs):
    h, y, m = xs
    with jax.default_matmul_precision("highest"):
      nll = reference.linear_sequence_nll(h[None].astype(F32), w32, y[None], m[None])
    return total + jnp.sum(nll), None

  total, _ = jax.lax.scan(jax.checkpoint(row), jnp.zeros((), F32), (hidden, targets, mask))
  return total


def all_positions_reference(hidden, weight, targets, mask):
  """The reference of a loss that takes no mask: every position is a target."""
  return reference_loss(hidden, weight, targets, jnp.ones_like(mask))


def head_flops(impl: str, p: str, case: Case, targets: int) -> float:
  """Useful FLOPs: ``2·n·D·V`` forward, ``6·n·D·V`` forward + backward for ``n`` target
  tokens; a matmul (the roofline) computes every token, ``2·N·D·V``."""
  if impl.endswith("matmul"):
    return 2.0 * case.tokens * case.hidden * case.vocab
  return (2.0 if p == "fwd" else 6.0) * targets * case.hidden * case.vocab


HEAD = Op("linear_nll", make_inputs, reference_loss, (0, 1), head_flops)


def _logits(hidden, weight):
  """The head as a model computes it: in the inputs' dtype, f32 accumulation."""
  return jnp.einsum("btd,dv->btv", hidden, weight)


def _masked_sum(tok, mask):
  return jnp.sum(jnp.where(mask, tok, 0.0), dtype=F32)


def naive_loss(hidden, weight, targets, mask):
  logp = jax.nn.log_softmax(_logits(hidden, weight).astype(F32), axis=-1)
  tok = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return _masked_sum(tok, mask)


def optax_loss(hidden, weight, targets, mask):
  import optax

  tok = optax.softmax_cross_entropy_with_integer_labels(_logits(hidden, weight), targets)
  return _masked_sum(tok, mask)


def _import_tokamax():
  import tokamax
  from absl import flags

  # tokamax reads absl flags; unparsed, absl would parse *our* command line and reject it.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def tokamax_loss(hidden, weight, targets, mask):
  del mask  # no mask argument: every position counts
  tokamax = _import_tokamax()
  d = hidden.shape[-1]
  return tokamax.linear_softmax_cross_entropy_loss(
    hidden.reshape(-1, d), targets.reshape(-1), weight, reduction="sum"
  ).astype(F32)


def short(e: BaseException) -> str:
  """An exception as one short line (a record's note)."""
  return f"{type(e).__name__}: {e}".splitlines()[0][:300]


@functools.cache
def tokamax_unavailable() -> str | None:
  """``None`` if tokamax's op imports and runs on a tiny input here, else the reason."""
  try:
    tokamax = _import_tokamax()
    x = jnp.ones((4, 8), F32)
    out = tokamax.linear_softmax_cross_entropy_loss(
      x, jnp.zeros((4,), jnp.int32), jnp.ones((8, 16))
    )
    jax.block_until_ready(out)
  except Exception as e:  # noqa: BLE001 -- any failure means: not a peer here
    return short(e)
  return None


#: What ``jaxnll bench`` compares by default, in table order.
SUITE = (
  "naive",
  "optax",
  "tokamax",
  "jaxnll_logits",
  "jaxnll_fused",
  "jaxnll_fused_scalar",
  "matmul",
)


def implementations(case: Case, names: Sequence[str] = SUITE) -> dict[str, Impl]:
  """The head implementations ``names`` at ``case`` (the fused kernels at its token chunk)."""
  import jaxnll

  chunk = case.token_chunk

  def logits_path(h, w, y, m):
    return jnp.sum(jaxnll.sequence_nll(_logits(h, w), y, m))

  def fused_xla(h, w, y, m):
    return jnp.sum(jaxnll.linear_sequence_nll(h, w, y, m, implementation="xla"))

  def fused(h, w, y, m):
    return jnp.sum(jaxnll.linear_sequence_nll(h, w, y, m, token_chunk=chunk))

  def fused_scalar(h, w, y, m):
    return jaxnll.linear_nll_loss(h, w, y, m, normalize="sum", token_chunk=chunk)[0]

  every = (
    Impl("naive", naive_loss),
    Impl("optax", optax_loss),
    Impl("tokamax", tokamax_loss, reference=all_positions_reference),
    Impl("jaxnll_logits", logits_path),
    Impl("jaxnll_fused_xla", fused_xla),
    Impl("jaxnll_fused", fused),
    Impl("jaxnll_fused_scalar", fused_scalar),
    Impl("matmul", lambda h, w, y, m: _logits(h, w), differentiable=False),
  )
  by_name = {i.name: i for i in every}
  unknown = set(names) - set(by_name)
  if unknown:
    raise ValueError(f"unknown implementations {sorted(unknown)}; choose from {sorted(by_name)}")
  return {n: by_name[n] for n in names}


# ----------------------------------------------------------------------------- from logits


def logits_inputs(case: Case, seed: int = 0):
  """``(logits [B, T, V], targets [B, T])``, logits of standard deviation 2."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  shape = (case.batch, case.length, case.vocab)
  logits = (2.0 * jax.random.normal(k1, shape, F32)).astype(case.dtype)
  return logits, jax.random.randint(k2, shape[:2], 0, case.vocab, jnp.int32)


def logits_reference(logits, targets, mask):
  from jaxnll import reference

  return jnp.sum(reference.sequence_nll(logits, targets, mask))


LOGITS = Op("nll", logits_inputs, logits_reference, (0,))


def logits_implementations() -> dict[str, Impl]:
  """``optax`` on the logits as they come, ``optax_f32`` on ``logits.astype(float32)`` (what
  a careful bf16 user writes), ``token_nll`` (masked sum) and ``sequence_nll``."""
  import optax

  import jaxnll

  ce = optax.softmax_cross_entropy_with_integer_labels
  return {
    "optax": Impl("optax", lambda z, y, m: _masked_sum(ce(z, y), m)),
    "optax_f32": Impl("optax_f32", lambda z, y, m: _masked_sum(ce(z.astype(F32), y), m)),
    "token_nll": Impl("token_nll", lambda z, y, m: _masked_sum(jaxnll.token_nll(z, y), m)),
    "sequence_nll": Impl("sequence_nll", lambda z, y, m: jnp.sum(jaxnll.sequence_nll(z, y, m))),
  }


# ----------------------------------------------------------------------------- distillation

TEMPERATURE = 2.0


def distill_inputs(case: Case, seed: int = 0):
  """``(student [B, T, V], teacher [B, T, V])`` standard-normal logits."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  shape = (case.batch, case.length, case.vocab)
  return tuple(jax.random.normal(k, shape, F32).astype(case.dtype) for k in (k1, k2))


def _distill_reference(kind: str) -> Loss:
  from jaxnll import reference

  def loss(s, t, m):
    return jnp.sum(reference.distill_cross_entropy(s, t, m, temperature=TEMPERATURE, kind=kind))

  return loss


DISTILL = Op("distill", distill_inputs, _distill_reference("cross_entropy"), (0,))


def distill_implementations() -> dict[str, Impl]:
  """:func:`jaxnll.distill_cross_entropy` (``cross_entropy`` and ``kl``), and optax's
  ``softmax_cross_entropy(student / τ, softmax(teacher / τ))`` masked and summed."""
  import optax

  import jaxnll

  tau = TEMPERATURE

  def optax_path(s, t, m):
    ce = optax.softmax_cross_entropy(s / tau, jax.nn.softmax(jax.lax.stop_gradient(t) / tau))
    return _masked_sum(ce, m)

  def ours(kind):
    return lambda s, t, m: jnp.sum(
      jaxnll.distill_cross_entropy(s, t, m, temperature=tau, kind=kind)
    )

  return {
    "optax": Impl("optax", optax_path),
    "jaxnll_ce": Impl("jaxnll_ce", ours("cross_entropy")),
    "jaxnll_kl": Impl("jaxnll_kl", ours("kl"), reference=_distill_reference("kl")),
  }


# ----------------------------------------------------------------------------- fused distillation


def fused_distill_inputs(case: Case, seed: int = 0):
  """``(student_hidden, student_weight, teacher_hidden, teacher_weight)`` with unit-scale
  logits, the teacher's hidden size :attr:`Spec.teacher_hidden` (see
  :func:`jaxnll.bench.specs.distill_case`)."""
  student = make_inputs(case, seed)[:2]
  teacher_case = dataclasses.replace(
    case, spec=dataclasses.replace(case.spec, hidden=case.spec.teacher_hidden or 2 * case.hidden)
  )
  teacher = make_inputs(teacher_case, seed + 1)[:2]
  return (*student, *teacher)


def _distill_logits(hs, ws, ht, wt):
  return _logits(hs, ws), jax.lax.stop_gradient(_logits(ht, wt))


def fused_distill_reference(hs, ws, ht, wt, mask):
  """:func:`jaxnll.reference.linear_distill_loss` (``kind="ce"``, τ = :data:`TEMPERATURE`) in
  float32 at full matmul precision, summed."""
  from jaxnll import reference

  f32 = lambda x: x.astype(F32)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    out = reference.linear_distill_loss(
      f32(hs), f32(ws), f32(ht), f32(wt), mask, kind="ce", temperature=TEMPERATURE
    )
  return jnp.sum(out)


def fused_distill_flops(impl: str, p: str, case: Case, targets: int) -> float:
  """Useful FLOPs: both heads' logits ``2·n·(Ds + Dt)·V`` forward, plus the student's two
  gradient matmuls ``4·n·Ds·V`` backward (a recomputation is not useful work)."""
  ds, dt, v = case.hidden, case.spec.teacher_hidden or 2 * case.hidden, case.vocab
  fwd = 2.0 * targets * (ds + dt) * v
  return fwd if p == "fwd" else fwd + 4.0 * targets * ds * v


FUSED_DISTILL = Op(
  "fused_distill", fused_distill_inputs, fused_distill_reference, (0, 1), fused_distill_flops
)


#: What the fused distillation rows compare by default (``--quick``: the first and last).
FUSED_DISTILL_SUITE = ("optax", "jaxnll_logits", "jaxnll_fused")


def fused_distill_implementations(
  case: Case, names: Sequence[str] = FUSED_DISTILL_SUITE
) -> dict[str, Impl]:
  """The distillation cross-entropy (``kind="ce"``, τ = :data:`TEMPERATURE`) of a student head
  against a teacher head: ``optax`` (``softmax_cross_entropy`` on both materialised logits,
  the logits path and the ratios' baseline), ``jaxnll_logits``
  (:func:`jaxnll.distill_cross_entropy` on them) and ``jaxnll_fused``
  (:func:`jaxnll.linear_distill_loss` at ``case``'s token chunk, no logits of either; on a
  CPU its ``"chunked"`` kernel, the one ``"auto"`` runs there, compiled without the GPU
  branch)."""
  import optax

  import jaxnll
  from jaxnll.bench.specs import is_accelerator

  tau, chunk = TEMPERATURE, case.token_chunk
  impl = "auto" if is_accelerator() else "chunked"

  def optax_path(hs, ws, ht, wt, m):
    s, t = _distill_logits(hs, ws, ht, wt)
    return _masked_sum(optax.softmax_cross_entropy(s / tau, jax.nn.softmax(t / tau)), m)

  def logits_path(hs, ws, ht, wt, m):
    s, t = _distill_logits(hs, ws, ht, wt)
    return jnp.sum(jaxnll.distill_cross_entropy(s, t, m, temperature=tau))

  def fused(hs, ws, ht, wt, m):
    out = jaxnll.linear_distill_loss(
      hs, ws, ht, wt, m, temperature=tau, token_chunk=chunk, implementation=impl
    )
    return jnp.sum(out)

  every = {
    "optax": Impl("optax", optax_path),
    "jaxnll_logits": Impl("jaxnll_logits", logits_path),
    "jaxnll_fused": Impl("jaxnll_fused", fused),
  }
  return {n: every[n] for n in names}


# ----------------------------------------------------------------------------- vocabulary-parallel


def parallel_args(case: Case, mesh) -> tuple:
  """The shapes of :data:`HEAD`'s arguments at ``case`` placed on ``mesh``: the weight split
  along its (padded) vocabulary over ``model``, everything else replicated."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxnll import parallel

  vocab = parallel.padded_vocab(case.vocab, mesh.shape["model"])
  b, t, d, dtype = case.batch, case.length, case.hidden, jnp.dtype(case.dtype)
  shapes = (((b, t, d), dtype), ((d, vocab), dtype), ((b, t), jnp.int32), ((b, t), jnp.bool_))
  specs = (P(), P(None, "model"), P(), P())
  return tuple(
    jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
    for (shape, dt), spec in zip(shapes, specs, strict=True)
  )


def parallel_implementations(mesh, vocab: int) -> dict[str, Impl]:
  """The head split along the vocabulary over ``mesh``'s ``model`` axis (weight padded to a
  multiple of its size): ``fused`` (:func:`jaxnll.parallel.linear_nll_loss`, each device
  holding only logits blocks of its own columns) and ``logits`` (each device computes its
  ``[B, T, V/n]`` slice and calls :func:`jaxnll.sequence_nll` with ``vocab_axis="model"``)."""
  from jax.sharding import PartitionSpec as P

  from jaxnll import nll, parallel

  def fused(h, w, y, m):
    return parallel.linear_nll_loss(h, w, y, m, mesh=mesh, normalize="sum", vocab_size=vocab)[0]

  def local(h, w, y, m):
    return jnp.sum(nll.sequence_nll(h @ w, y, m, vocab_axis="model", vocab_size=vocab))

  logits = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P()), out_specs=P()
  )
  return {"fused": Impl("fused", fused), "logits": Impl("logits", logits)}
