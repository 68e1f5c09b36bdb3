"""Compiled temp memory of the distillation loss, forward and forward + backward: jaxnll
against optax.

Compile only (``memory_analysis()``), at the Mistral-7B vocabulary, 8 × 512 tokens, bf16
logits by default; before that, every path is checked against
:func:`jaxnll.reference.distill_cross_entropy` at 2 × 16 tokens.  Implementations
(:func:`jaxnll.bench.distill_implementations`, τ = 2): ``optax``
(``softmax_cross_entropy(student / τ, softmax(teacher / τ))`` masked and summed),
``jaxnll_ce`` and ``jaxnll_kl`` (:func:`jaxnll.distill_cross_entropy`).

    python bench/distill_memory.py [--spec mistral-7b --tokens 8x512 --dtype bfloat16]

Records are appended to ``OUT/distill.csv`` / ``OUT/distill.jsonl``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll import bench  # noqa: E402


def main(argv=None) -> int:
  p = bench.script_parser(__doc__, spec="mistral-7b", tokens=(8, 512))
  args = p.parse_args(argv)
  env, case = bench.environment(), bench.case_of(args)
  impls = bench.distill_implementations()
  small = bench.Case(case.spec, 2, 16, "float32")
  rows = bench.check_case(small, env, impls=impls, op=bench.DISTILL, bench="distill")
  rows += bench.memory_case(case, env, impls=impls, op=bench.DISTILL, bench="distill")
  return bench.finish(rows, args.out, "distill")


if __name__ == "__main__":
  sys.exit(main())
