"""Compiled temp memory of fused distillation against the same loss on materialised logits.

Compile only (``jax.jit(f).lower(...).compile().memory_analysis()``), forward + backward
(gradients for the student's hidden states and head) of
:func:`jaxnll.fused.linear_distill_loss` at the Gemma-2 9B → 2B head pair: teacher
``D = 3584``, student ``D = 2304``, ``V = 256000``, Gemma-2's final-logit soft-cap 30,
``4 × 2048`` target tokens, bf16.  ``implementation="auto"`` against ``"xla"`` (both
``[B, T, V]`` logits materialised, the divergence from them), same kind, same options.  Before
that, both are checked against :func:`jaxnll.reference.linear_distill_loss` at a small shape.

    python bench/fused_distill_memory.py [--kind kl] [--target cpu|h100|tpu-v5e]
        [--gpu-target-config PATH]  [--out bench/results]

``--target h100`` / ``tpu-v5e`` compile with the real XLA:GPU / libtpu compiler and no device
(run it with ``JAX_PLATFORMS=cpu`` in an environment with libtpu / the CUDA plugin, see
DESIGN.md "Deviceless compilation"); their figures are "compiled for TARGET, not run".
Prints one line per implementation and appends the records to ``OUT/fused_distill_memory.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxnll import reference  # noqa: E402
from jaxnll.fused import linear_distill_loss  # noqa: E402

GIB = 2**30
#: Gemma-2 9B (teacher) and 2B (student): hidden sizes, shared vocabulary, final soft-cap.
TEACHER_D, STUDENT_D, VOCAB, SOFTCAP = 3584, 2304, 256000, 30.0
TPU_TOPOLOGIES = {"tpu-v5e": "v5e:2x2", "tpu-v5p": "v5p:2x2x1"}
DEFAULT_GPU_CONFIG = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "jaxnll", "bench", "gpu_targets", "h100.txtpb"
)


def loss_fn(impl: str, kind: str, temperature: float):
  def f(hs, ws, ht, wt, mask):
    return linear_distill_loss(
      hs, ws, ht, wt, mask, kind=kind, temperature=temperature, logit_softcap=SOFTCAP,
      implementation=impl,
    ).sum()  # fmt: skip

  return f


def check(kind: str, temperature: float) -> None:
  """Both implementations against the float32 reference at 2 × 24 tokens (values and the
  student's gradients) before anything is measured."""
  k = jax.random.split(jax.random.key(0), 4)
  hs = jax.random.normal(k[0], (2, 24, 16))
  ws = jax.random.normal(k[1], (16, 300)) / 4
  ht = jax.random.normal(k[2], (2, 24, 24))
  wt = jax.random.normal(k[3], (24, 300)) / 5
  mask = jnp.arange(24)[None, :] >= jnp.array([[4], [20]])

  def ref(hs, ws, ht, wt, mask):
    opts = dict(kind=kind, temperature=temperature, logit_softcap=SOFTCAP)
    return reference.linear_distill_loss(hs, ws, ht, wt, mask, **opts).sum()

  want = jax.value_and_grad(ref, argnums=(0, 1))(hs, ws, ht, wt, mask)
  for impl in ("xla", "auto"):
    got = jax.jit(jax.value_and_grad(loss_fn(impl, kind, temperature), argnums=(0, 1)))(
      hs, ws, ht, wt, mask
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-5)


def device_for(target: str, gpu_config: str):
  if target == "cpu":
    return jax.devices("cpu")[0]
  from jax.experimental import topologies

  if target in TPU_TOPOLOGIES:
    topo = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[target], platform="tpu")
  else:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    with open(gpu_config) as f:
      topo = topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology="1x1x1")
  return topo.devices[0]


def measure(impl: str, args, device, kind: str, temperature: float) -> dict:
  """Compiled memory of forward + backward (student hidden and head) on ``device``."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  f = jax.value_and_grad(loss_fn(impl, kind, temperature), argnums=(0, 1))
  start = time.perf_counter()
  try:
    compiled = jax.jit(f).lower(*specs).compile()
  except jax.errors.JaxRuntimeError as e:  # e.g. the target's HBM is too small
    return {"impl": impl, "error": str(e).strip().splitlines()[0][:400]}
  m = compiled.memory_analysis()
  return {
    "impl": impl,
    "temp_bytes": int(m.temp_size_in_bytes),
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "compile_s": round(time.perf_counter() - start, 1),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--kind", default="kl", choices=("ce", "kl", "reverse_kl", "jsd"))
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--tokens", default="4x2048", help="B x T (default 4x2048)")
  p.add_argument("--target", default="cpu", choices=("cpu", "h100", *TPU_TOPOLOGIES))
  p.add_argument("--gpu-target-config", default=DEFAULT_GPU_CONFIG)
  p.add_argument("--out", default=os.path.join("bench", "results"))
  args = p.parse_args(argv)
  b, t = (int(x) for x in args.tokens.lower().split("x"))
  check(args.kind, args.temperature)
  device = device_for(args.target, args.gpu_target_config)
  bf16 = jnp.bfloat16
  shapes = [
    jax.ShapeDtypeStruct((b, t, STUDENT_D), bf16),
    jax.ShapeDtypeStruct((STUDENT_D, VOCAB), bf16),
    jax.ShapeDtypeStruct((b, t, TEACHER_D), bf16),
    jax.ShapeDtypeStruct((TEACHER_D, VOCAB), bf16),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
  ]
  rows = [measure(impl, shapes, device, args.kind, args.temperature) for impl in ("xla", "auto")]
  plain, fused = rows
  ratio = None
  if "error" not in plain and "error" not in fused:
    ratio = fused["temp_bytes"] / plain["temp_bytes"]
  where = "CPU (XLA:CPU)" if args.target == "cpu" else f"compiled for {args.target}, not run"
  common = {
    "bench": "fused_distill_memory",
    "target": args.target,
    "device": str(getattr(device, "device_kind", device)),
    "host": platform.processor() or platform.machine(),
    "jax": jax.__version__,
    "kind": args.kind,
    "temperature": args.temperature,
    "tokens": [b, t],
    "teacher_d": TEACHER_D,
    "student_d": STUDENT_D,
    "vocab": VOCAB,
    "dtype": "bfloat16",
    "logit_softcap": SOFTCAP,
    "fused_over_logits": None if ratio is None else round(ratio, 5),
  }
  print(
    f"Gemma-2 9B -> 2B head pair, {b}x{t} tokens bf16, kind={args.kind}, forward+backward, {where}"
  )
  for r in rows:
    if "error" in r:
      print(f"  {r['impl']:5s} does not compile: {r['error']}")
      continue
    print(
      f"  {r['impl']:5s} temp {r['temp_bytes'] / GIB:8.3f} GiB   arguments "
      f"{r['argument_bytes'] / GIB:6.3f} GiB   outputs {r['output_bytes'] / GIB:6.3f} GiB   "
      f"(compile {r['compile_s']} s)"
    )
  if ratio is not None:
    print(f"  fused auto / materialised logits temp: {ratio:.4f} (1/{1 / ratio:.1f})")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fused_distill_memory.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps({**common, **r}) + "\n")
  if "error" in fused:
    return 1
  return 0 if ratio is None or ratio <= 1 / 20 else 1


if __name__ == "__main__":
  sys.exit(main())
