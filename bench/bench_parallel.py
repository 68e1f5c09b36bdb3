"""Per-device memory of the vocabulary-parallel loss at a real model head, for 1, 2, 4, 8 shards.

For each shard count ``n`` the head weight ``[D, V]`` is split along the vocabulary over a
``model`` mesh axis of ``n`` devices and forward + backward (gradients w.r.t. ``hidden`` and
``weight``) is lowered and compiled — never run — so ``memory_analysis()`` reports the bytes
one device needs (temp, arguments, outputs).  Implementations
(:func:`jaxnll.bench.parallel_implementations`): ``fused``
(:func:`jaxnll.parallel.linear_nll_loss`) and ``logits`` (each device's ``[B, T, V/n]`` logits
slice into :func:`jaxnll.sequence_nll` with ``vocab_axis="model"``).  Both are first checked
against the reference on the same mesh at a small head (``--check-spec``, 2 × 16 tokens).

On CPU the ``n`` devices are faked (``--xla_force_host_platform_device_count``); on an
accelerator host the real devices are used.

    python bench/bench_parallel.py            # Llama-3-8B head, 8 x 2048 tokens, bf16

Records are appended to ``OUT/parallel.csv`` / ``OUT/parallel.jsonl``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll import bench  # noqa: E402

MEMORY = ("temp_bytes", "argument_bytes", "output_bytes")


def main(argv=None) -> int:
  p = bench.script_parser(__doc__, spec="llama3-8b", tokens=(8, 2048))
  p.add_argument("--shards", default="1,2,4,8", help="model shard counts")
  p.add_argument("--check-spec", default="mistral-7b-d256", choices=sorted(bench.SPECS))
  args = p.parse_args(argv)
  counts = [int(x) for x in args.shards.split(",")]
  flag = "--xla_force_host_platform_device_count"  # before JAX starts its backends
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={max(counts)}".strip()
  import jax

  from jaxnll import parallel

  if max(counts) > len(jax.devices()):
    raise SystemExit(f"need {max(counts)} devices, have {len(jax.devices())}")
  env, case = bench.environment(), bench.case_of(args)
  small = bench.Case(bench.SPECS[args.check_spec], 2, 16, "float32")
  rows = []
  for n in counts:
    mesh = parallel.make_mesh({"model": n}, devices=jax.devices()[:n])
    impls = bench.parallel_implementations(mesh, small.vocab)
    rows += bench.check_case(small, env, impls=impls, bench="parallel", shards=n)
    rows += bench.memory_case(
      case,
      env,
      impls=bench.parallel_implementations(mesh, case.vocab),
      args=bench.parallel_args(case, mesh),
      passes=("fwd_bwd",),
      metrics=MEMORY,
      bench="parallel",
      shards=n,
    )
  return bench.finish(rows, args.out, "parallel")


if __name__ == "__main__":
  sys.exit(main())
