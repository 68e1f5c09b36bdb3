"""``python -m jaxnll.bench``: the same as ``jaxnll bench``."""

import sys

from jaxnll.bench.cli import main

sys.exit(main())
