"""The fused head + loss against the materialised-logits paths: memory against the
vocabulary, time against the span fraction.

* **memory** — compile-only temp bytes of forward + backward (gradients w.r.t. ``hidden`` and
  ``weight``) at a real head (default Llama-3 8B, 8 × 2048 tokens, bf16) for each vocabulary
  of the head table; nothing runs, so it fits a laptop CPU;
* **time** — forward and forward + backward at a CPU-sized head (default the Mistral-7B
  vocabulary at D = 256, 4 × 512 tokens) for several span fractions, checked against the
  reference first, as the median per-repetition ratio against optax over interleaved
  repetitions.

Implementations (:func:`jaxnll.bench.implementations`): ``optax``, ``jaxnll_fused_xla``
(materialised logits + ``jaxnll.sequence_nll``), ``jaxnll_fused`` (``linear_sequence_nll``),
``jaxnll_fused_scalar`` (``linear_nll_loss``) and, where it runs, ``tokamax`` (no mask: it
always computes every position).

    python bench/bench_fused.py [--quick] [--out bench/results]

Records are appended to ``OUT/fused.csv`` / ``OUT/fused.jsonl`` and plotted to
``OUT/fused.png``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll import bench  # noqa: E402

IMPLS = ("optax", "jaxnll_fused_xla", "jaxnll_fused", "jaxnll_fused_scalar", "tokamax")


def main(argv=None) -> int:
  p = bench.script_parser(__doc__, spec="llama3-8b", tokens=(8, 2048))
  p.add_argument("--vocabs", default=",".join(map(str, bench.VOCABS)), help="memory curve's V")
  p.add_argument("--time-spec", default="mistral-7b-d256", choices=sorted(bench.SPECS))
  p.add_argument("--time-tokens", type=bench.tokens_arg, default=(4, 512))
  p.add_argument("--fractions", default="1,0.5,0.25,0.125", help="span fractions to time")
  p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
  p.add_argument("--token-chunk", type=int, help="the fused kernels' token chunk")
  p.add_argument("--impl", action="append", choices=IMPLS, help="(repeatable; optax always)")
  p.add_argument("--quick", action="store_true", help="span fractions 1 and 0.25, 3 repetitions")
  p.add_argument("--skip-memory", action="store_true")
  p.add_argument("--skip-time", action="store_true")
  args = p.parse_args(argv)
  names = [n for n in IMPLS if n == "optax" or not args.impl or n in args.impl]
  env = bench.environment()
  rows = []
  if not args.skip_memory:
    for v in (int(x) for x in args.vocabs.split(",") if x):
      case = bench.case_of(args)
      case = dataclasses.replace(case, spec=bench.with_vocab(case.spec, v))
      impls = bench.implementations(case, names)
      rows += bench.memory_case(case, env, impls=impls, passes=("fwd_bwd",), bench="fused")
  if not args.skip_time:
    case = bench.resolve(bench.SPECS[args.time_spec], tokens=args.time_tokens)
    case = dataclasses.replace(case, token_chunk=args.token_chunk or case.token_chunk)
    quick = args.quick
    rows += bench.bench_case(
      case,
      env,
      fractions=bench.QUICK_FRACTIONS if quick else bench.fractions_arg(args.fractions, ()),
      repeats=3 if quick else args.repeats,
      impls=bench.implementations(case, names),
      bench="fused",
    )
  status = bench.finish(rows, args.out, "fused")
  bench.plot_curves(rows, os.path.join(args.out, "fused.png"))
  return status


if __name__ == "__main__":
  sys.exit(main())
