"""The ``"auto"`` implementation: the kernel for each platform, chosen when lowering.

Each pass calls :func:`jax.lax.platform_dependent` over the passes of
:mod:`~jaxnll.fused.pallas_tpu` (TPU), :mod:`~jaxnll.fused.token_chunked` (CUDA / ROCm) and
:mod:`~jaxnll.fused.chunked` (anything else), so one jitted or exported function carries the
right kernel for every backend; only the branch of the platform being lowered is lowered.

The TPU branch is ``pallas_tpu``, whose tiles follow the TPU generation the arrays are
placed on (:mod:`~jaxnll.fused.pallas_tpu` reads it from their sharding, so a deviceless
compile for a named TPU gets that chip's tiles, v4's 16 MiB of VMEM included).  It is
``chunked`` when the arrays are split over a mesh axis that XLA partitions automatically (a
``jit`` over sharded arguments: libtpu refuses with "Mosaic kernels cannot be automatically
partitioned"); inside ``shard_map``, where every axis is manual, it is ``pallas_tpu``.  A
``shard_map`` cannot be put around the kernel here, per pass: the compaction is global (one
sort over every ``B·T`` position; the passes gather hidden rows by that global order), so a
pass has no data-parallel slice of its own.  It belongs around the whole entry, compaction and
custom VJP included, as :mod:`jaxnll.parallel` does for a mesh the caller names.

The branches must agree on every shape: they share one compaction (one sort) with the
``chunked`` kernel's padded row count, so that ``"auto"`` costs on a CPU what ``"chunked"``
does; ``token_chunked`` reads a last block that would reach past it shifted back, and
``pallas_tpu`` pads its own rows to its block.
The per-token residual is the tuple ``(m, s[, nu])`` of every kernel (row maximum, sum of
``exp(z - m)``, with the entropy the mean of ``z - m``), float32 ``[rows]`` each.  Gradients
leave each branch in the inputs' dtypes.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxnll._core import F32
from jaxnll.fused import chunked, pallas_tpu, token_chunked
from jaxnll.fused.compact import Compacted, Plan

#: Branch order of :attr:`Plan.branches`.
BRANCHES = ("pallas_tpu", "token_chunked", "chunked")
_MODULES = {"pallas_tpu": pallas_tpu, "token_chunked": token_chunked, "chunked": chunked}
#: ``platform_dependent`` keyword of each branch (``default`` for the rest).
_PLATFORMS = {"pallas_tpu": ("tpu",), "token_chunked": ("cuda", "rocm"), "chunked": ("default",)}


def auto_partitioned(*arrays) -> bool:
  """Whether ``arrays`` (or the context mesh) span a mesh axis of more than one device that
  is not manual: XLA would partition a kernel over it."""
  meshes = [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None) for a in arrays]
  meshes.append(jax.sharding.get_abstract_mesh())
  for mesh in meshes:
    names, types = getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ())
    for name, kind in zip(names, types, strict=False):
      if mesh.shape[name] > 1 and kind != jax.sharding.AxisType.Manual:
        return True
  return False


def tpu_branch(*arrays) -> str:
  """The kernel of the TPU branch for ``arrays``: ``"chunked"`` under automatic partitioning
  (:func:`auto_partitioned`: libtpu cannot partition a Mosaic call), else ``"pallas_tpu"``."""
  return "chunked" if auto_partitioned(*arrays) else "pallas_tpu"


def plan(branches: tuple[Plan, ...], *, one_pass: bool) -> Plan:
  """The ``"auto"`` plan over the per-platform ``branches`` (in :data:`BRANCHES` order)."""
  rows = branches[-1].padded_rows  # the CPU kernel's
  branches = tuple(dataclasses.replace(p, padded_rows=rows) for p in branches)
  return dataclasses.replace(
    branches[-1], implementation="auto", one_pass=one_pass, padded_rows=rows, branches=branches
  )


def _view(bt: Compacted, name: str, p: Plan) -> Compacted:
  """``bt`` (same compaction) as seen by the kernel ``name`` of plan ``p``: its own block
  (for ``token_chunked`` at most the compacted rows; ``pallas_tpu`` pads its own)."""
  del name
  rows = bt.valid.shape[0]
  chunk = min(p.token_chunk, rows) if p.implementation == "token_chunked" else p.token_chunk
  p = dataclasses.replace(p, token_chunk=chunk)
  sub = copy.copy(bt)
  sub.plan, sub.opts, sub.chunk = p, p.opts, chunk
  count = jnp.sum(bt.valid, dtype=jnp.int32)
  # The default integer type, as in Compacted (int64 under ``jax_enable_x64``).
  sub.num_chunks = jnp.asarray((count + chunk - 1) // chunk, dtype=int)
  return sub


def _cast(bt: Compacted, dh_c, dw, db):
  return (
    None if dh_c is None else dh_c.astype(F32),
    None if dw is None else dw.astype(bt.weight.dtype),
    None if db is None else db.astype(bt.bias.dtype),
  )


def _dispatch(bt: Compacted, run):
  """``lax.platform_dependent`` over ``run(module, view)`` for every branch."""
  per_platform = {}
  plans = dict(zip(BRANCHES, bt.plan.branches, strict=True))
  if tpu_branch(bt.weight, bt.hidden) == "chunked":
    plans["pallas_tpu"] = plans["chunked"]
  for name, p in plans.items():
    module = _MODULES[p.implementation]
    branch = lambda module=module, name=name, p=p: run(module, _view(bt, name, p))
    for platform in _PLATFORMS[name]:
      per_platform[platform] = branch
  return lax.platform_dependent(**per_platform)


def stats_pass(bt: Compacted):
  def run(module, sub):
    stats, loss = module.stats_pass(sub)
    return tuple(stats), loss

  return _dispatch(bt, run)


def grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None):
  def run(module, sub):
    grads = module.grad_pass(sub, scale_c, stats_c, need, entropy_scale_c)
    return _cast(bt, *grads)

  return _dispatch(bt, run)


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  def run(module, sub):
    if sub.plan.one_pass:
      stats, loss, *grads = module.one_pass(sub, scale_c, need)
    else:
      stats, loss = module.stats_pass(sub)
      grads = module.grad_pass(sub, scale_c, stats, need)
    return (tuple(stats), loss, *_cast(bt, *grads))

  return _dispatch(bt, run)
