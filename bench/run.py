"""Runs the benchmark suite (thin wrapper of :func:`jaxnll.bench.main`; same as ``jaxnll bench``).

python bench/run.py --quick --out bench/results
python bench/run.py --spec llama3-8b --spec mistral-7b --repeats 7
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnll.bench import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
