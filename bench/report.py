"""Markdown table and PNG plots from the benchmark records (:func:`jaxnll.bench.report`).

python bench/report.py --out bench/results     # writes bench.md and bench_*.png there
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll.bench import report  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="bench/results", help="directory holding bench.jsonl")
  p.add_argument("--print", action="store_true", help="also print the table")
  args = p.parse_args(argv)
  md, pngs = report(args.out)
  print(f"table: {md}")
  for path in pngs:
    print(f"plot: {path}")
  if args.print:
    with open(md) as f:
      print(f.read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
