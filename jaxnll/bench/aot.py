"""Deviceless compiles: a function through the real TPU and GPU compilers, on a CPU.

``libtpu`` compiles for TPU generations from a named topology, and XLA:GPU (the
``jax-cuda12-plugin``, with ``nvidia-cuda-nvcc-cu12``'s ptxas) compiles for an NVIDIA GPU from
a target config, with no accelerator attached (``pip install "jaxnll[aot]"``; run with
``JAX_PLATFORMS=cpu``).  The executables are real: their memory analysis is the target's
device memory, their optimised HLO shows the plan (Mosaic kernels as ``tpu_custom_call`` with
the VMEM they asked for and used, while loops, the largest values).  Nothing runs: figures
from here are "compiled for TARGET, not run", never a time.  Autotuning is skipped (default
tiles), and XLA's cost analysis counts no FLOPs inside Pallas calls or across loop trips.

>>> import jax, jax.numpy as jnp                                # doctest: +SKIP
>>> from jaxnll.bench import aot                                 # doctest: +SKIP
>>> x = aot.abstract((8, 128), jnp.bfloat16, "tpu-v5e")          # doctest: +SKIP
>>> aot.compile_for(lambda x: (x * 2).sum(), x, target="tpu-v5e").ok  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Where the GPU target configs live (``GpuTargetConfigProto`` text, one file per target).
GPU_TARGETS_DIR = Path(__file__).with_name("gpu_targets")
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile-only target: ``platform`` ``"tpu"`` (``topology``: a libtpu topology with at
  least 8 devices) or ``"cuda"`` (``topology``: the stem of a file in :data:`GPU_TARGETS_DIR`)."""

  name: str
  platform: str
  topology: str
  description: str

  @property
  def is_tpu(self) -> bool:
    return self.platform == "tpu"


TARGETS: dict[str, Target] = {
  t.name: t
  for t in (
    Target("h100", "cuda", "h100", "NVIDIA H100 SXM 80GB (XLA:GPU, sm_90a)"),
    Target("a100", "cuda", "a100", "NVIDIA A100 SXM4 80GB (XLA:GPU, sm_80)"),
    Target("b200", "cuda", "b200", "NVIDIA B200 (XLA:GPU, sm_100a)"),
    Target("tpu-v4", "tpu", "v4:2x2x1", "TPU v4 (16 MiB VMEM per core)"),
    Target("tpu-v5e", "tpu", "v5e:2x4", "TPU v5e"),
    Target("tpu-v5p", "tpu", "v5p:2x2x2", "TPU v5p"),
    Target("tpu-v6e", "tpu", "v6e:2x4", "TPU v6e"),
    Target("tpu7x", "tpu", "tpu7x:2x2x1", "TPU7x"),
  )
}
GPU_TARGETS = tuple(n for n, t in TARGETS.items() if not t.is_tpu)
TPU_TARGETS = tuple(n for n, t in TARGETS.items() if t.is_tpu)


def get_target(name: str | Target) -> Target:
  """The :class:`Target` called ``name`` (one of :data:`TARGETS`)."""
  if isinstance(name, Target):
    return name
  if name not in TARGETS:
    raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
  return TARGETS[name]


def _quiet_env() -> None:
  # The CUDA plugin checks the local CUDA installation unless told not to (there is none);
  # libtpu takes a machine-wide lock unless told that other processes may load it too (a
  # compile-only client holds no chip).
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.cache
def _all_devices(name: str) -> tuple:
  from jax.experimental import topologies

  _quiet_env()
  t = TARGETS[name]
  if t.is_tpu:
    topo = topologies.get_topology_desc(topology_name=t.topology, platform="tpu")
  else:
    config = (GPU_TARGETS_DIR / f"{t.topology}.txtpb").read_text()
    topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x8")
  return tuple(topo.devices)


def devices(name: str | Target, count: int = 1) -> list:
  """``count`` (1 or 8) compile-only devices of target ``name``."""
  t = get_target(name)
  if count not in (1, 8):
    raise ValueError(f"count must be 1 or 8, got {count}")
  return list(_all_devices(t.name)[:count])


def mesh(name: str | Target, shape: Sequence[int] = (1,), axes: Sequence[str] = ("x",)) -> Mesh:
  """A :class:`~jax.sharding.Mesh` of ``shape`` over compile-only devices of ``name``."""
  count = int(np.prod(shape))
  return Mesh(np.array(devices(name, count)).reshape(tuple(shape)), tuple(axes))


def abstract(shape, dtype, where, spec: PartitionSpec | None = None) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct`` placed on ``where``: a target name (one device, replicated) or a
  :class:`~jax.sharding.Mesh` (sharded as ``spec``, replicated if None)."""
  m = where if isinstance(where, Mesh) else mesh(where)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(m, spec or PartitionSpec()))


@dataclasses.dataclass
class Report:
  """What the compiler said about one function on one target (bytes are per device)."""

  target: str
  ok: bool
  compile_s: float
  error: str | None = None
  temp_bytes: int | None = None
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  mosaic: list[dict] = dataclasses.field(default_factory=list)
  """Per ``tpu_custom_call``: ``name``, ``vmem_limit`` and ``vmem_used`` (bytes)."""
  while_loops: int = 0
  largest: list[tuple[str, int]] = dataclasses.field(default_factory=list)
  """The largest values of the optimised HLO: ``(dtype[shape], bytes)``, distinct, largest first."""
  hlo: str | None = dataclasses.field(default=None, repr=False)

  @property
  def total_bytes(self) -> int | None:
    """Temp + arguments + outputs - aliased: the device memory the executable needs."""
    if not self.ok:
      return None
    return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes

  def has_value(self, *dims: int) -> bool:
    """Whether some HLO value has every one of ``dims`` among its dimensions."""
    return any(all(d in _dims(s) for d in dims) for s in _values(self.hlo or ""))

  def row(self) -> dict:
    """A JSON-ready summary (no HLO)."""
    out = dataclasses.asdict(self)
    out.pop("hlo")
    out["largest"] = [list(x) for x in self.largest[:5]]
    out["total_bytes"] = self.total_bytes
    return out


_ITEM = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4}
_ITEM |= {"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_VALUE = re.compile(r"= (\w+)\[([\d,]*)\]")


def _values(hlo: str) -> set[str]:
  return {f"{t}[{d}]" for t, d in _VALUE.findall(hlo) if t in _ITEM}


def _dims(value: str) -> list[int]:
  inner = value[value.index("[") + 1 : -1]
  return [int(d) for d in inner.split(",") if d]


def _nbytes(value: str) -> int:
  return _ITEM[value[: value.index("[")]] * int(np.prod(_dims(value), dtype=np.int64))


def _mosaic(hlo: str) -> list[dict]:
  out = []
  for line in hlo.splitlines():
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    name = re.search(r"%([\w.\-]+) = ", line)
    op = re.search(r'op_name="([^"]*)"', line)

    def vmem(key, line=line):
      m = re.search(rf'"{key}":\[\{{"memory_space":"1","offset":"\d+","size":"(\d+)"', line)
      return int(m.group(1)) if m else None

    out.append(
      {
        "name": name.group(1) if name else "?",
        "op": op.group(1).rsplit("/", 2)[-2] if op and "/" in op.group(1) else None,
        "vmem_limit": vmem("scoped_memory_configs"),
        "vmem_used": vmem("used_scoped_memory_configs"),
      }
    )
  return out


def _placed(args, where):
  def place(a):
    if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None:
      return abstract(a.shape, a.dtype, where)
    return a

  return jax.tree.map(place, args)


def compile_for(
  f: Callable,
  *args,
  target: str | Target,
  static_argnums: Sequence[int] = (),
  keep_hlo: bool = True,
  top: int = 8,
) -> Report:
  """Compile ``f(*args)`` for ``target`` and report the executable's figures.

  ``args`` are ``jax.ShapeDtypeStruct`` pytrees; one without a sharding is placed on the
  target's first device (give shardings on :func:`mesh` for a multi-device compile).  A
  compile error is caught and returned as ``Report(ok=False, error=...)``.
  """
  t = get_target(target)
  args = _placed(args, t.name)
  start = time.perf_counter()
  try:
    compiled = jax.jit(f, static_argnums=tuple(static_argnums)).lower(*args).compile()
  except Exception as e:  # the compiler's verdict is the result
    return Report(t.name, False, time.perf_counter() - start, error=_first_line(e))
  seconds = time.perf_counter() - start
  ma = compiled.memory_analysis()
  hlo = compiled.as_text()
  values = sorted(_values(hlo), key=_nbytes, reverse=True)[:top]
  return Report(
    t.name,
    True,
    seconds,
    temp_bytes=int(ma.temp_size_in_bytes),
    argument_bytes=int(ma.argument_size_in_bytes),
    output_bytes=int(ma.output_size_in_bytes),
    alias_bytes=int(ma.alias_size_in_bytes),
    mosaic=_mosaic(hlo),
    while_loops=len(re.findall(r" while\([^)]*\), condition=", hlo)),
    largest=[(v, _nbytes(v)) for v in values],
    hlo=hlo if keep_hlo else None,
  )


def _first_line(e: Exception) -> str:
  """The compiler's message, shortened to its informative part."""
  text = str(e).strip()
  m = re.search(r"Ran out of memory in memory space (\w+)\. Used ([\d.]+\w) of ([\d.]+\w)", text)
  if m:
    return f"out of {m.group(1)}: used {m.group(2)} of {m.group(3)}"
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return (" ".join(lines[:3]) if lines else type(e).__name__)[:300]


# -- the head table: implementations x entries x heads x targets ---------------------------

#: The fused head's implementations compiled by :func:`table` (``pallas_tpu``: TPU targets only).
IMPLEMENTATIONS = ("auto", "xla", "chunked", "token_chunked", "pallas_tpu")
#: The entry points: ``scalar`` (:func:`jaxnll.linear_nll_loss`), ``per-sample``
#: (:func:`jaxnll.linear_sequence_nll`), ``per-token`` (:func:`jaxnll.linear_token_nll`) and
#: ``segment`` (:func:`jaxnll.linear_segment_nll`, 4 segments a row); each forward + backward
#: for the hidden states and the weight.
ENTRIES = ("scalar", "per-sample", "per-token", "segment")
TOKENS = ((4, 2048), (8, 2048))
SEGMENTS = 4
#: The head's layout (``weight_layout=``): ``"vd"`` a ``[V, D]`` table read in place (a tied
#: embedding, as Gemma-2 and most checkpoints store the head), ``"dv"`` a ``[D, V]`` kernel.
LAYOUTS = ("vd", "dv")


def head_step(entry: str, implementation: str, layout: str = "dv") -> Callable:
  """``f(hidden, weight, targets, mask[, segment_ids]) -> (loss, (dhidden, dweight))``."""
  import jax.numpy as jnp

  import jaxnll

  kw = {"implementation": implementation, "weight_layout": layout}

  def scalar(h, w, y, m):
    return jaxnll.linear_nll_loss(h, w, y, m, **kw)[0]

  def per_sample(h, w, y, m):
    return jnp.sum(jaxnll.linear_sequence_nll(h, w, y, m, **kw))

  def per_token(h, w, y, m):
    return jnp.sum(jaxnll.linear_token_nll(h, w, y, m, **kw))

  def segment(h, w, y, m, seg):
    return jnp.sum(jaxnll.linear_segment_nll(h, w, y, m, seg, num_segments=SEGMENTS, **kw))

  loss = {"scalar": scalar, "per-sample": per_sample, "per-token": per_token}.get(entry, segment)
  if entry not in ENTRIES:
    raise ValueError(f"entry must be one of {ENTRIES}, got {entry!r}")

  def step(h, w, *rest):
    return jax.value_and_grad(loss, argnums=(0, 1))(h, w, *rest)

  return step


def head_args(
  entry: str, hidden: int, vocab: int, batch: int, length: int, dtype="bfloat16", layout="dv"
):
  """The ``ShapeDtypeStruct`` arguments of :func:`head_step` for a ``[hidden, vocab]`` head
  (``[vocab, hidden]`` with ``layout="vd"``)."""
  import jax.numpy as jnp

  sds = jax.ShapeDtypeStruct
  args = [
    sds((batch, length, hidden), jnp.dtype(dtype)),
    sds((vocab, hidden) if layout == "vd" else (hidden, vocab), jnp.dtype(dtype)),
    sds((batch, length), jnp.int32),
    sds((batch, length), jnp.bool_),
  ]
  if entry == "segment":
    args.append(sds((batch, length), jnp.int32))
  return tuple(args)


def table(
  specs: Sequence,
  targets: Sequence[str],
  *,
  implementations: Sequence[str] = IMPLEMENTATIONS,
  entries: Sequence[str] = ENTRIES,
  tokens: Sequence[tuple[int, int]] = TOKENS,
  layout: str = "vd",
  log: Callable[[str], None] = print,
  on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
  """One row per (target, head, tokens, entry, implementation): compiled or the compiler's
  error, and the memory (``specs``: :class:`jaxnll.bench.specs.Spec`; the head stored as
  ``layout``).  ``on_row`` sees each row as soon as it is compiled (to save it)."""
  rows = []
  for name in targets:
    t = get_target(name)
    for spec in specs:
      for batch, length in tokens:
        for entry in entries:
          args = head_args(entry, spec.hidden, spec.vocab, batch, length, layout=layout)
          for impl in implementations:
            row = {
              "target": t.name,
              "spec": spec.name,
              "tokens": f"{batch}x{length}",
              "layout": layout,
              "entry": entry,
              "impl": impl,
            }
            if impl == "pallas_tpu" and not t.is_tpu:
              row.update(ok=None, error="TPU kernel (interpreted elsewhere): not compiled")
            else:
              step = head_step(entry, impl, layout)
              r = compile_for(step, *args, target=t, keep_hlo=False)
              row.update(r.row())
              row.pop("largest", None)
              row["largest"] = r.largest[0][0] if r.largest else None
            rows.append(row)
            log(_line(row))
            if on_row is not None:
              on_row(row)
  return rows


def _mib(x) -> str:
  return "" if x is None else f"{x / MIB:,.0f}"


def _layout(row: dict) -> str:
  """The head's shape as a reader writes it (rows written before the layout was a column:
  ``[D, V]``)."""
  return "[V, D]" if row.get("layout") == "vd" else "[D, V]"


def _line(row: dict) -> str:
  head = f"{row['target']:8} {row['spec']:11} {row['tokens']:7} {_layout(row)} {row['entry']:10}"
  head += f" {row['impl']:13}"
  if not row.get("ok"):
    return f"{head} {row.get('error')}"
  vmem = max((c["vmem_used"] or 0 for c in row["mosaic"]), default=0)
  return (
    f"{head} temp {_mib(row['temp_bytes'])} MiB, total {_mib(row['total_bytes'])} MiB, "
    f"{len(row['mosaic'])} Mosaic (VMEM {_mib(vmem)} MiB), {row['while_loops']} loops, "
    f"{row['compile_s']:.0f} s"
  )


def save(rows: Sequence[dict], out: str, env: dict | None = None) -> tuple[str, str]:
  """Appends ``rows`` to ``out/aot.jsonl`` and rewrites ``out/aot.md`` from every row there
  (the latest of each target, head, tokens, entry and implementation)."""
  import json

  path = Path(out)
  path.mkdir(parents=True, exist_ok=True)
  jsonl, md = path / "aot.jsonl", path / "aot.md"
  with jsonl.open("a") as f:
    for row in rows:
      f.write(json.dumps({**(env or {}), **row}, default=str) + "\n")
  latest = {}
  for line in jsonl.read_text().splitlines():
    r = json.loads(line)
    latest[(r["target"], r["spec"], r["tokens"], _layout(r), r["entry"], r["impl"])] = r
  md.write_text(markdown(list(latest.values())))
  return str(md), str(jsonl)


def markdown(rows: Sequence[dict]) -> str:
  """The table of :func:`save`: device memory per device, compiled for each target, not run."""
  out = [
    "# Compiled for each target, not run",
    "",
    "Forward + backward (hidden and weight gradients) of each fused implementation and entry,",
    "bf16, compiled on a CPU host by the target's own compiler (`jaxnll bench --aot`, see",
    "`jaxnll/bench/aot.py`): libtpu for the TPUs, XLA:GPU (CUDA plugin, ptxas) for the GPUs.",
    "Memory is the executable's memory analysis per device, in MiB: **temp** (what the program",
    "holds besides its arguments and outputs) and **total** (temp + arguments + outputs).",
    "*VMEM* is the largest Mosaic kernel's scoped VMEM use; *loops*, the HLO while loops.",
    "No time is claimed: nothing here ran on an accelerator.",
    "",
    "| target | head | tokens | weight | entry | implementation | compiled | temp | total | VMEM |"
    " loops | largest value |",
    "|---|---|---|---|---|---|---|---:|---:|---:|---:|---|",
  ]
  order = {n: i for i, n in enumerate(TARGETS)}
  key = lambda r: (
    order.get(r["target"], 99),
    r["spec"],
    r["tokens"],
    _layout(r),
    r["entry"],
    r["impl"],
  )
  for r in sorted(rows, key=key):
    if r.get("ok"):
      vmem = max((c["vmem_used"] or 0 for c in r.get("mosaic", [])), default=0)
      cells = [
        "yes",
        _mib(r["temp_bytes"]),
        _mib(r["total_bytes"]),
        _mib(vmem) if r.get("mosaic") else "",
        str(r["while_loops"]),
        f"`{r.get('largest')}`",
      ]
    else:
      state = "n/a" if r.get("ok") is None else "**no**"
      cells = [f"{state}: {r.get('error')}", "", "", "", "", ""]
    out.append(
      "| "
      + " | ".join([r["target"], r["spec"], r["tokens"], _layout(r), r["entry"], r["impl"], *cells])
      + " |"
    )
  env = next((r for r in rows if "jax_version" in r), {})
  if env:
    out += ["", f"jax {env.get('jax_version')}, libtpu {env.get('libtpu_version')}."]
  commits = sorted({str(r["git_commit"]) for r in rows if r.get("git_commit")})
  if commits:
    out += [f"Compiled at jaxnll commit {', '.join(commits)}."]
  return "\n".join(out) + "\n"


def environment() -> dict:
  """Versions of the compilers behind the table."""
  from importlib import metadata

  def version(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return None

  return {
    "jax_version": jax.__version__,
    "libtpu_version": version("libtpu"),
    "cuda_plugin_version": version("jax-cuda12-plugin"),
  }


# -- the Flax NNX train step, sharded --------------------------------------------------------

#: A Llama-shaped model for :func:`train_step`: Llama-3 8B's width, heads, MLP and vocabulary
#: with a tied ``[V, D]`` head, two blocks (the head and loss are what is measured).
LLAMA_SHAPED = {
  "vocab_size": 128256,
  "d_model": 4096,
  "num_layers": 2,
  "num_heads": 32,
  "d_ff": 14336,
  "tie_embeddings": True,
}


def train_step(
  name: str | Target,
  *,
  model: dict | None = None,
  rows: int = 32,
  length: int = 128,
  segments: int = 16,
  accum: int = 1,
  fused: bool = True,
  mesh_shape: Sequence[int] = (8,),
) -> Report:
  """Compiles :func:`jaxnll.train.step.train_step_fn` (the demo model, or ``model``'s
  overrides of it, with ``fused`` head + loss) for ``name`` over ``mesh_shape`` devices,
  batch rows split over ``data``.  ``(n,)``: a ``("data",)`` mesh, the state replicated (the
  sharding of :mod:`jaxnll.train.step`); ``(d, m)``: a ``("data", "model")`` mesh with the
  state laid out by :func:`jaxnll.train.runtime.annotate_partitioning` (FSDP over ``data``,
  the head's vocabulary over ``model``: the loss runs vocabulary-parallel, its collectives
  inside).  Nothing is allocated: the state comes from ``nnx.eval_shape``.  Needs the
  ``[train]`` extra (the model and the step), which ``.venv-aot`` has."""
  try:
    from flax import nnx

    from jaxnll.train import model as model_lib
    from jaxnll.train import runtime
    from jaxnll.train import step as step_lib
  except ImportError as e:
    raise ImportError(
      f"compiling the train step needs the training application: pip install 'jaxnll[train]' ({e})"
    ) from None

  config = model_lib.default_config(**(model or {}))
  train_config = step_lib.TrainConfig(fused=fused, accum=accum)
  two_d = len(mesh_shape) == 2
  m = mesh(name, tuple(mesh_shape), ("data", "model") if two_d else ("data",))

  def build():
    t = step_lib.Trainer(
      model_lib.make_model(config, seed=0), step_lib.make_optimizer(train_config, 100)
    )
    return runtime.annotate_partitioning(t, m, min_size=256) if two_d else t

  graphdef, state = nnx.split(nnx.eval_shape(build))
  if two_d:
    shardings = runtime.state_shardings(state, m)
  else:
    shardings = jax.tree.map(lambda _: NamedSharding(m, PartitionSpec()), state)
  state = runtime.abstract(state, shardings)
  split = NamedSharding(m, PartitionSpec(None, "data"))
  per = (accum, rows // accum)
  batch = {
    key: jax.ShapeDtypeStruct(per + (width,), dtype, sharding=split)
    for key, width, dtype in (
      ("tokens", length, np.int32),
      ("span_mask", length, np.bool_),
      ("segment_ids", length, np.int32),
      ("positions", length, np.int32),
      ("sample_ids", segments, np.int32),
    )
  }
  objective = train_config.objective()
  step = lambda state, batch: step_lib.train_step_fn(graphdef, state, batch, objective=objective)
  with jax.set_mesh(m):
    return compile_for(step, state, batch, target=name)
