"""Print ``name==floor`` pins for the lowest versions ``pyproject.toml`` allows.

``make test-min`` installs these into a separate environment and runs the library tests there,
so the declared floors are versions that were actually tested. Each requirement of the chosen
groups (the core ``dependencies`` by default, or ``--extra NAME`` groups) must carry a ``>=``
floor; anything else is an error, so a new dependency cannot slip in untested.

  python tools/min_requirements.py                # core dependencies
  python tools/min_requirements.py --extra test   # and an extra's
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10
  import tomli as tomllib

_REQ = re.compile(
  r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(?:,\s*<[^,;]*)?\s*(;.*)?$"
)


def floors(requirements: list[str]) -> list[str]:
  """``name>=x`` (optionally ``; marker``) -> ``name==x`` (marker kept)."""
  pins = []
  for req in requirements:
    m = _REQ.match(req)
    if m is None:
      raise SystemExit(f"min_requirements: {req!r} has no single '>=' floor")
    name, extras, version, marker = m.groups()
    pins.append(f"{name}{extras or ''}=={version}{marker or ''}")
  return pins


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pyproject", default=pathlib.Path(__file__).parents[1] / "pyproject.toml")
  parser.add_argument("--extra", action="append", default=[], help="also pin this extra's floors")
  args = parser.parse_args(argv)
  project = tomllib.loads(pathlib.Path(args.pyproject).read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in args.extra:
    reqs += project["optional-dependencies"][extra]
  print("\n".join(floors(reqs)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
