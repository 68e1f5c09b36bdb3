"""PyTorch peers of ``jaxnll bench`` (:mod:`jaxnll.bench.torch_peers`): Liger, Cut
Cross-Entropy and torch's own ``linear_cross_entropy`` at the suite's accelerator shapes.

Records go to the suite's ``OUT/bench.csv`` / ``OUT/bench.jsonl``, so ``bench/report.py`` puts
them in the same tables (their "× optax" is a ratio of medians across two processes, marked
†).  Anything missing — torch, a CUDA device, a peer package — is reported and skipped; the
script then exits 0 (``bench/gpu.sh`` calls it unconditionally).

    python bench/torch_peers.py --out bench/results [--spec llama3-8b] [--budget-s 90]
"""

from __future__ import annotations

import argparse
import os
import sys

# JAX is imported only for the shape table and file helpers: keep it off the GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll import bench  # noqa: E402
from jaxnll.bench import harness, torch_peers  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="bench/results")
  p.add_argument("--spec", action="append", choices=sorted(bench.SPECS))
  p.add_argument("--fractions", help="span fractions, comma separated (default: 1,0.5,0.25)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--budget-s", type=float, help="start no new head after this many seconds")
  args = p.parse_args(argv)
  torch, why = torch_peers.import_torch()
  if torch is None:
    print(f"torch peers skipped: {why}")
    return 0
  names = args.spec or [n for n, s in bench.SPECS.items() if s.accel is not None]
  env = bench.environment(backend="gpu", device=torch.cuda.get_device_name())
  for name in harness.within_budget(names, args.budget_s):
    case = bench.resolve(bench.SPECS[name], backend="gpu", dtype=args.dtype)
    rows = torch_peers.bench_case(
      torch,
      case,
      env,
      fractions=bench.fractions_arg(args.fractions, bench.FRACTIONS),
      repeats=args.repeats,
      warmup=args.warmup,
    )
    bench.finish(rows, args.out, "bench")  # a failed peer is in the records, not the status
    torch.cuda.empty_cache()
  return 0


if __name__ == "__main__":
  sys.exit(main())
