"""The loss from logits against optax: ``token_nll`` / ``sequence_nll`` forward + backward.

At the Mistral-7B vocabulary (V = 32768), 8 × 512 tokens, bfloat16 logits by default, side by
side in one process: compile-only temp memory of the value-and-gradient (with respect to the
logits), and time as the median per-repetition ratio against optax over interleaved
repetitions, every path checked against ``jaxnll.reference.sequence_nll`` first.

Implementations (:func:`jaxnll.bench.logits_implementations`): ``optax`` on the logits as
they come, ``optax_f32`` on ``logits.astype(float32)`` (what a careful bf16 user writes),
``token_nll`` (masked sum) and ``sequence_nll``.

    python bench/bench_token.py [--spec mistral-7b --tokens 8x512 --dtype bfloat16]
        [--fractions 1] [--repeats 7] [--out bench/results]

Records are appended to ``OUT/token.csv`` / ``OUT/token.jsonl``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll import bench  # noqa: E402


def main(argv=None) -> int:
  p = bench.script_parser(__doc__, spec="mistral-7b", tokens=(8, 512))
  p.add_argument("--fractions", default="1", help="span fractions (the tail of each row)")
  p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions")
  args = p.parse_args(argv)
  rows = bench.bench_case(
    bench.case_of(args),
    bench.environment(),
    fractions=bench.fractions_arg(args.fractions, ()),
    repeats=args.repeats,
    impls=bench.logits_implementations(),
    op=bench.LOGITS,
    passes=("fwd_bwd",),
    bench="token",
  )
  return bench.finish(rows, args.out, "token")


if __name__ == "__main__":
  sys.exit(main())
