"""Roofline model of the ``pallas_tpu`` kernels, compiled for each TPU generation (no device).

For every generation × head × entry, forward + backward of the fused loss is traced with its
arguments placed on the generation's compile-only devices
(``jax.experimental.topologies.get_topology_desc``; the kernels read the generation, and so
their tiles, from that placement) and compiled by the real TPU compiler (``libtpu``).  From the
traced plan: each Mosaic kernel's grid, tiles, FLOPs (its body's matmuls × its grid, checked
against the ``pl.CostEstimate`` it declares), HBM bytes (blocks fetched when their index
changes, from the same estimate) and requested VMEM; from the compiled executable: the HBM
temp.  The model: each kernel takes ``max(FLOPs / peak, bytes / bandwidth)`` (dense bf16 peak
and HBM bandwidth of :data:`jaxnll.fused.pallas_tpu.CHIPS`), and the *fraction of the
materialise-once roofline* is ``6·N·D·V / peak`` over the kernels' sum (XLA's glue — gathers,
casts — left out).  It is a model of the compiled plan, not a timing: no TPU ran anything.

With ``--distill KIND ...`` the same for the fused distillation kernel pair
(:mod:`jaxnll.fused.pallas_tpu_distill`) at the Gemma-2 9B → 2B head pair: FLOPs in multiples
of ``N·V·(Ds + Dt)``, the fraction against the materialise-once roofline of distillation
(``2·N·V·(Ds + Dt)`` for both heads' logits, ``4·N·V·Ds`` for the student's two gradients),
and beside the kernels' HBM temp the ``"chunked"`` implementation's, compiled for the same
target (``--baseline``); written to ``roofline.distill.{md,jsonl}``.

Needs an environment with ``libtpu`` (``/work/venv-aot``)::

  JAX_PLATFORMS=cpu PYTHONPATH=$PWD /work/venv-aot/bin/python bench/roofline.py \\
      [--targets v4 v5e ...] [--heads gemma2-2b ...] [--batch 4] [--out bench/results]
  ... bench/roofline.py --distill kl jsd --targets v4 v5e [--baseline] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.extend import core  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxnll.fused import linear_distill_loss, linear_nll_loss, linear_sequence_nll  # noqa: E402
from jaxnll.fused import pallas_tpu as pt  # noqa: E402

#: Compile-only topologies, one per generation.
TARGETS = {
  "v4": "v4:2x2x1",
  "v5e": "v5e:2x2",
  "v5p": "v5p:2x2x1",
  "v6e": "v6e:2x2",
  "tpu7x": "tpu7x:2x2x1",
}
#: ``device_kind`` of each target (the key of ``pallas_tpu.CHIPS``).
KINDS = {
  "v4": "TPU v4",
  "v5e": "TPU v5 lite",
  "v5p": "TPU v5",
  "v6e": "TPU v6 lite",
  "tpu7x": "TPU7x",
}
#: ``(D, V)`` of real heads.
HEADS = {"gemma2-2b": (2304, 256000), "llama3-8b": (4096, 128256), "qwen3-8b": (4096, 151936)}
#: Entries: the scalar loss (``[D, V]`` and a ``[V, D]`` table) and the per-sample sums.
ENTRIES = ("loss", "loss-vd", "sequence")
#: A commonly quoted fixed cost of one Pallas TPU grid step (pipeline bookkeeping), for the
#: second fraction column; not measured here.
STEP_S = 0.35e-6


def devices(target: str):
  """Compile-only devices of a TPU generation (libtpu, no device attached)."""
  return topologies.get_topology_desc(topology_name=TARGETS[target], platform="tpu").devices


def fwd_bwd(entry: str):
  """Forward + backward (hidden and weight) of one entry, bf16, full span."""
  layout = "vd" if entry.endswith("vd") else "dv"

  def f(h, w, y, m):
    def fn(h, w):
      if entry.startswith("loss"):
        return linear_nll_loss(h, w, y, m, implementation="pallas_tpu", weight_layout=layout)[0]
      return jnp.sum(linear_sequence_nll(h, w, y, m, implementation="pallas_tpu"))

    return jax.value_and_grad(fn, (0, 1))(h, w)

  return f


def compile_for(target: str, entry: str, b: int, t: int, d: int, v: int):
  """``(traced, compiled)`` of :func:`fwd_bwd` for ``target`` on one compile-only device."""
  mesh = Mesh(np.array(devices(target)[:1]), ("x",))
  rep = NamedSharding(mesh, P())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
  wshape = (v, d) if entry.endswith("vd") else (d, v)
  args = (s((b, t, d), jnp.bfloat16), s(wshape, jnp.bfloat16), s((b, t), jnp.int32))
  args += (s((b, t), jnp.bool_),)
  traced = jax.jit(fwd_bwd(entry)).trace(*args)
  return traced, traced.lower().compile()


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for sub in v if isinstance(v, tuple | list) else (v,):
      if isinstance(sub, core.ClosedJaxpr):
        yield sub.jaxpr
      elif isinstance(sub, core.Jaxpr):
        yield sub


def pallas_calls(jaxpr):
  """The Mosaic (not interpreted) ``pallas_call`` equations of a traced program."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call" and eqn.params["interpret"] is False:
      yield eqn
    for sub in _subjaxprs(eqn):
      yield from pallas_calls(sub)


def dot_flops(jaxpr) -> int:
  """FLOPs of the ``dot_general``s of a kernel body (one grid step)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      depth = int(np.prod([lhs[k] for k in contract]))
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * depth
    for sub in _subjaxprs(eqn):
      total += dot_flops(sub)
  return total


def kernel_rows(eqn, chip):
  """One kernel's figures from its equation in the traced plan."""
  grid = tuple(int(g) for g in eqn.params["grid_mapping"].grid)
  flops = dot_flops(eqn.params["jaxpr"]) * int(np.prod(grid))
  cost = eqn.params["cost_estimate"]
  assert cost.flops == flops, (cost.flops, flops)
  blocks = [
    "x".join(str(getattr(x, "block_size", x)) for x in bm.block_shape)
    for bm in eqn.params["grid_mapping"].block_mappings
  ]
  params = eqn.params["compiler_params"]
  params = params["mosaic_tpu"] if isinstance(params, dict) else params
  seconds = max(flops / chip.peak, cost.bytes_accessed / chip.hbm)
  return {
    "kernel": str(eqn.params["name"]),
    "grid": grid,
    "blocks": blocks[:2],
    "flops": flops,
    "bytes": int(cost.bytes_accessed),
    "intensity": flops / cost.bytes_accessed,
    "vmem_limit_mib": params.vmem_limit_bytes / 2**20,
    "model_s": seconds,
    "steps": int(np.prod(grid)),
  }


def measure(target: str, head: str, entry: str, b: int, t: int) -> dict:
  d, v = HEADS[head]
  chip = pt.CHIPS[devices(target)[0].device_kind]
  start = time.perf_counter()
  row = {"target": target, "head": head, "entry": entry, "tokens": f"{b}x{t}"}
  try:
    traced, compiled = compile_for(target, entry, b, t, d, v)
  except Exception as e:  # the compiler's refusal is a result too
    return row | {"error": str(e).splitlines()[0][:300]}
  kernels = [kernel_rows(e, chip) for e in pallas_calls(traced.jaxpr.jaxpr)]
  ndv = b * t * d * v
  flops = sum(k["flops"] for k in kernels)
  model = sum(k["model_s"] for k in kernels)
  steps = sum(k["steps"] for k in kernels)
  mem = compiled.memory_analysis()
  return row | {
    "kernels": kernels,
    "flops_ndv": flops / ndv,
    "bytes": sum(k["bytes"] for k in kernels),
    "intensity": flops / sum(k["bytes"] for k in kernels),
    "ridge": chip.ridge,
    "fraction": 6 * ndv / chip.peak / model,
    "fraction_with_step_cost": 6 * ndv / chip.peak / (model + steps * STEP_S),
    "grid_steps": steps,
    "temp_mib": mem.temp_size_in_bytes / 2**20,
    "compile_s": time.perf_counter() - start,
  }


#: tokamax's ``mosaic_tpu`` linear softmax cross-entropy kernels at their default blocks
#: (batch 1024, hidden 512, vocabulary 2048), as published (openxla/tokamax,
#: ``pallas_mosaic_tpu_kernel.py``): not installed here, so modelled from that plan, not
#: compiled.
TOKAMAX_BLOCKS = (1024, 512, 2048)


def tokamax_model(target: str, head: str, b: int, t: int) -> dict:
  """tokamax's plan counted the same way: the forward's grid ``(B/b, V/v, H/h)`` fetches an
  ``[b, h]`` row block and an ``[h, v]`` weight block every step (the hidden index is the
  innermost) for one ``b·h·v`` matmul; the backward's grid ``(B/b, V/v, 2, H/h)`` recomputes
  the logits in stage 0 (same fetches) and in stage 1 fetches them again for two matmuls
  (both gradients) plus a read-modify-write of the f32 ``[b, h]`` and ``[h, v]`` gradient
  tiles in HBM (no read at the first visit).  bf16 operands."""
  d, v = HEADS[head]
  chip = pt.CHIPS[KINDS[target]]
  bb, hb, vb = TOKAMAX_BLOCKS
  n = b * t
  nb, nh, nv = -(-n // bb), -(-d // hb), -(-v // vb)
  steps = nb * nv * nh
  fetch = 2 * (bb * hb + hb * vb)  # bf16 row block + weight block
  mm = 2 * bb * hb * vb
  rmw = 4 * (bb * hb * (2 * nb * nv * nh - nb * nh) + hb * vb * (2 * nb * nv * nh - nv * nh))
  kernels = [
    ("fwd", steps * mm, steps * fetch),
    ("bwd stage 0", steps * mm, steps * fetch),
    ("bwd stage 1", steps * 2 * mm, steps * fetch + rmw),
  ]
  model = sum(max(f / chip.peak, by / chip.hbm) for _, f, by in kernels)
  flops = sum(f for _, f, _ in kernels)
  nbytes = sum(by for _, _, by in kernels)
  ndv = n * d * v
  vmem = 4 * bb * vb + 4 * bb * hb + 4 * hb * vb + 2 * fetch
  return {
    "target": target,
    "head": head,
    "entry": "tokamax (model)",
    "tokens": f"{b}x{t}",
    "flops_ndv": flops / ndv,
    "bytes": nbytes,
    "intensity": flops / nbytes,
    "ridge": chip.ridge,
    "fraction": 6 * ndv / chip.peak / model,
    "fraction_with_step_cost": 6 * ndv / chip.peak / (model + 3 * steps * STEP_S),
    "vmem_mib": vmem / 2**20,
    "kernels": [
      {"kernel": k, "flops": f, "bytes": by, "intensity": f / by} for k, f, by in kernels
    ],
  }


def vmem_used(target: str, head: str, entry: str, b: int, t: int) -> dict:
  """The VMEM each kernel really uses, as the compiler reports it: compiled once per kernel
  with that kernel's limit set to 1 MiB, the refusal names the scoped allocation's size."""
  d, v = HEADS[head]
  kinds = ("fused", "weight")  # every NLL entry: the forward carries the hidden gradient
  used = {}
  for kind in kinds:
    pt.VMEM_LIMIT[kind] = 2**20
    try:
      compile_for(target, entry, b, t, d, v)
      used[kind] = "fits 1 MiB"
    except Exception as e:
      found = re.search(r"(?:Used|allocation with size) ([0-9.]+[KMG]?)", str(e))
      used[kind] = found.group(1) if found else str(e).splitlines()[0][:120]
    finally:
      pt.VMEM_LIMIT.pop(kind)
  return {"target": target, "head": head, "entry": entry, "tokens": f"{b}x{t}", "vmem": used}


HEADER = """# pallas_tpu roofline per TPU generation (a model of the compiled plan, not a timing)

No TPU ran anything here.  Each row is forward + backward of one entry (bf16, full span),
traced with its arguments placed on a compile-only device of the generation and compiled by
libtpu (deviceless): the kernels' tiles are the ones `pallas_tpu` picks for that generation,
and every row compiled unless it says otherwise.  From the traced plan, per Mosaic kernel:
FLOPs = the kernel body's matmuls × its grid (equal to its declared `pl.CostEstimate`), HBM
bytes = blocks fetched when their index changes + outputs (its `pl.CostEstimate`); the model
gives each kernel `max(FLOPs / peak, bytes / bandwidth)` (dense bf16 peak, HBM bandwidth of
`pallas_tpu.CHIPS`) and **fraction** = `6·N·D·V / peak` over their sum — the share of the
materialise-once roofline.  8·N·D·V FLOPs bound it at 0.75; XLA's glue (row gather, casts,
the `W_y` gather) is left out.  **+ step cost** adds an assumed 0.35 µs per grid step (a
commonly quoted Pallas TPU figure, not measured here).  HBM temp: `memory_analysis()` of
the compiled executable.  VMEM limit: what each kernel asks of the compiler
(`vmem_limit_bytes`, within the chip's VMEM).  Tokamax rows: its `mosaic_tpu` kernels at
their default blocks, counted the same way from its published grids and blocks (a model of
its plan; not installed, not compiled).

Command: `ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu PYTHONPATH=$PWD
/work/venv-aot/bin/python {command}` (jax 0.10.2 + libtpu, `/work/venv-aot`).

"""


def table(rows) -> str:
  out = [
    "| target | head | entry | tokens | FLOPs / NDV | HBM GiB | FLOP/B (ridge) | fraction "
    "| + step cost | HBM temp MiB | kernels: grid, row & weight blocks, FLOP/B, VMEM limit MiB |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    head = f"| {r['target']} | {r['head']} | {r['entry']} | {r['tokens']} "
    if "error" in r:
      out.append(head + f"| does not compile: {r['error']} | | | | | | |")
      continue
    if r["entry"].startswith("tokamax"):
      out.append(
        head + f"| {r['flops_ndv']:.2f} | {r['bytes'] / 2**30:.2f} | "
        f"{r['intensity']:.0f} ({r['ridge']:.0f}) | {r['fraction']:.3f} | "
        f"{r['fraction_with_step_cost']:.3f} | (f32 [D, V] and [N, D] gradients) | "
        f"blocks 1024 x 512 x 2048, {r['vmem_mib']:.0f} MiB VMEM of buffers |"
      )
      continue
    ks = "; ".join(
      f"{k['kernel'].removeprefix('jaxnll_fused_nll_')} {k['grid']} "
      f"{' '.join(k['blocks'])} {k['intensity']:.0f} {k['vmem_limit_mib']:.0f}"
      for k in r["kernels"]
    )
    out.append(
      head + f"| {r['flops_ndv']:.2f} | {r['bytes'] / 2**30:.2f} | "
      f"{r['intensity']:.0f} ({r['ridge']:.0f}) | {r['fraction']:.3f} | "
      f"{r['fraction_with_step_cost']:.3f} | "
      f"{r['temp_mib']:.0f} | {ks} |"
    )
  return "\n".join(out)


#: Distillation head pairs: ``(Ds, Dt, V, soft-cap)`` of student and teacher.
PAIRS = {"gemma2-9b-2b": (2304, 3584, 256000, 30.0)}


def distill_fwd_bwd(kind: str, implementation: str, softcap):
  """Forward + backward (the student's hidden states and head) of the fused distillation."""

  def f(hs, ws, ht, wt, m):
    def fn(hs, ws):
      out = linear_distill_loss(hs, ws, ht, wt, m, kind=kind, logit_softcap=softcap,
                                implementation=implementation)  # fmt: skip
      return jnp.sum(out)

    return jax.value_and_grad(fn, (0, 1))(hs, ws)

  return f


def compile_distill_for(target: str, kind: str, implementation: str, b: int, t: int, pair: str):
  ds, dt, v, softcap = PAIRS[pair]
  mesh = Mesh(np.array(devices(target)[:1]), ("x",))
  rep = NamedSharding(mesh, P())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
  bf = jnp.bfloat16
  args = (s((b, t, ds), bf), s((ds, v), bf), s((b, t, dt), bf), s((dt, v), bf))
  args += (s((b, t), jnp.bool_),)
  traced = jax.jit(distill_fwd_bwd(kind, implementation, softcap)).trace(*args)
  return traced, traced.lower().compile()


def measure_distill(target: str, pair: str, kind: str, b: int, t: int, baseline: bool) -> dict:
  ds, dt, v, _ = PAIRS[pair]
  chip = pt.CHIPS[devices(target)[0].device_kind]
  start = time.perf_counter()
  row = {"target": target, "head": pair, "entry": f"distill {kind}", "tokens": f"{b}x{t}"}
  try:
    traced, compiled = compile_distill_for(target, kind, "pallas_tpu", b, t, pair)
  except Exception as e:
    return row | {"error": str(e).splitlines()[0][:300]}
  kernels = [kernel_rows(e, chip) for e in pallas_calls(traced.jaxpr.jaxpr)]
  n = b * t
  nv = n * v * (ds + dt)
  flops = sum(k["flops"] for k in kernels)
  model = sum(k["model_s"] for k in kernels)
  steps = sum(k["steps"] for k in kernels)
  ideal = (2 * n * v * (ds + dt) + 4 * n * v * ds) / chip.peak
  nbytes = sum(k["bytes"] for k in kernels)
  row |= {
    "kernels": kernels,
    "flops_nv": flops / nv,
    "bytes": nbytes,
    "intensity": flops / nbytes,
    "ridge": chip.ridge,
    "fraction": ideal / model,
    "fraction_with_step_cost": ideal / (model + steps * STEP_S),
    "grid_steps": steps,
    "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
  }
  if baseline:
    try:
      _, base = compile_distill_for(target, kind, "chunked", b, t, pair)
      row["chunked_temp_mib"] = base.memory_analysis().temp_size_in_bytes / 2**20
    except Exception as e:
      row["chunked_temp_mib"] = "does not compile: " + str(e).splitlines()[0][:120]
  return row | {"compile_s": time.perf_counter() - start}


DISTILL_HEADER = """# pallas_tpu distillation kernel pair per TPU generation

A model of the compiled plan, not a timing.

No TPU ran anything here.  Each row is forward + backward (the student's hidden states and
head) of `linear_distill_loss(..., implementation="pallas_tpu")` at the Gemma-2 9B → 2B head
pair (teacher D 3584, student D 2304, V 256,000, soft-cap 30), bf16, full span, traced with
its arguments placed on a compile-only device of the generation and compiled by libtpu
(deviceless).  Per Mosaic kernel, as in `roofline.md`: FLOPs = the body's matmuls × its grid
(equal to its `pl.CostEstimate`), HBM bytes from the same estimate, model time
`max(FLOPs / peak, bytes / bandwidth)`.  **FLOPs / NV(Ds+Dt)**: in multiples of
`N·V·(Ds + Dt)`.  **fraction** = `(2·N·V·(Ds + Dt) + 4·N·V·Ds) / peak` (both heads' logits
once, the student's two gradients: the materialise-once roofline of distillation) over the
kernels' model time; **+ step cost** adds an assumed 0.35 µs per grid step.  HBM temp:
`memory_analysis()` of the compiled executable, beside the `"chunked"` implementation's
compiled for the same target (same function, same arguments).

Command: `ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu PYTHONPATH=$PWD
/work/venv-aot/bin/python {command}` (jax 0.10.2 + libtpu, `/work/venv-aot`).

"""


def distill_table(rows) -> str:
  out = [
    "| target | pair | entry | tokens | FLOPs / NV(Ds+Dt) | HBM GiB | FLOP/B (ridge) | fraction "
    "| + step cost | HBM temp MiB (chunked) | kernels: grid, FLOP/B, VMEM limit MiB |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    head = f"| {r['target']} | {r['head']} | {r['entry']} | {r['tokens']} "
    if "error" in r:
      out.append(head + f"| does not compile: {r['error']} | | | | | | |")
      continue
    base = r.get("chunked_temp_mib")
    base = "" if base is None else f" ({base:.0f})" if isinstance(base, float) else f" ({base})"
    ks = "; ".join(
      f"{k['kernel'].removeprefix('jaxnll_fused_distill_')} {k['grid']} "
      f"{k['intensity']:.0f} {k['vmem_limit_mib']:.0f}"
      for k in r["kernels"]
    )
    out.append(
      head + f"| {r['flops_nv']:.2f} | {r['bytes'] / 2**30:.2f} | "
      f"{r['intensity']:.0f} ({r['ridge']:.0f}) | {r['fraction']:.3f} | "
      f"{r['fraction_with_step_cost']:.3f} | {r['temp_mib']:.0f}{base} | {ks} |"
    )
  return "\n".join(out)


def distill_main(args, argv) -> int:
  rows = []
  if args.render:  # the table again from saved roofline.distill.jsonl rows
    with open(args.render) as f:
      rows = [json.loads(line) for line in f if line.startswith("{")]
    order = {k: n for n, k in enumerate(TARGETS)}
    rows.sort(key=lambda r: (order[r["target"]], r["entry"]))
  for target in [] if args.render else args.targets:
    for kind in args.distill:
      row = measure_distill(target, "gemma2-9b-2b", kind, args.batch[0], args.tokens,
                            args.baseline)  # fmt: skip
      rows.append(row)
      print(json.dumps(row, default=str), file=sys.stderr, flush=True)
  text = distill_table(rows)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "roofline.distill.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(r, default=str) + "\n")
    with open(os.path.join(args.out, "roofline.distill.md"), "w") as f:
      command = " ".join(["bench/roofline.py", *(argv or sys.argv[1:])])
      f.write(DISTILL_HEADER.format(command=command))
      f.write(text + "\n")
  return 0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--targets", nargs="+", default=list(TARGETS))
  ap.add_argument("--heads", nargs="+", default=list(HEADS))
  ap.add_argument("--entries", nargs="+", default=list(ENTRIES))
  ap.add_argument("--batch", type=int, nargs="+", default=[4])
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--render", default=None, help="only re-render a roofline.jsonl")
  ap.add_argument("--vmem", action="store_true", help="only each kernel's real VMEM use")
  ap.add_argument("--tokamax", action="store_true", help="add tokamax's modelled plan")
  ap.add_argument("--out", default=None, help="folder for roofline.md / roofline.jsonl")
  ap.add_argument("--distill", nargs="+", default=None, choices=("ce", "kl", "reverse_kl", "jsd"),
                  help="the distillation kernel pair instead, for these kinds")  # fmt: skip
  ap.add_argument("--baseline", action="store_true", help="with --distill: chunked's temp too")
  args = ap.parse_args(argv)
  if args.distill:
    return distill_main(args, argv)
  if args.vmem:
    for target in args.targets:
      for head in args.heads:
        for entry in args.entries:
          print(json.dumps(vmem_used(target, head, entry, args.batch[0], args.tokens)), flush=True)
    return 0
  rows = []
  if args.render:  # the table again from a saved roofline.jsonl
    with open(args.render) as f:
      rows = [json.loads(line) for line in f if line.startswith("{")]
    if args.tokamax:
      pairs = {(r["target"], r["head"], r["tokens"]) for r in rows}
      for target, head, tokens in sorted(pairs):
        b, t = (int(x) for x in tokens.split("x"))
        rows.append(tokamax_model(target, head, b, t))
    order = {k: n for n, k in enumerate([*TARGETS, *HEADS, *ENTRIES, "tokamax (model)"])}
    rows.sort(key=lambda r: (order[r["target"]], order[r["head"]], r["tokens"], order[r["entry"]]))
  for target in [] if args.render else args.targets:
    for head in args.heads:
      for b in args.batch:
        for entry in args.entries:
          row = measure(target, head, entry, b, args.tokens)
          rows.append(row)
          print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        if args.tokamax:
          rows.append(tokamax_model(target, head, b, args.tokens))
  text = table(rows)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "roofline.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(r, default=str) + "\n")
    with open(os.path.join(args.out, "roofline.md"), "w") as f:
      f.write(HEADER.format(command=" ".join(["bench/roofline.py", *(argv or sys.argv[1:])])))
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
