"""Every extra installs what its command imports.

How: an install holding only the base requirements and one extra exposes exactly the
distributions of that requirement closure.  Each command runs ``--help`` in a subprocess whose
import system refuses every module of a distribution outside the closure (resolved from the
installed metadata of this environment) — what a fresh venv with only that extra would answer —
and the imports its code may run later (inside functions: ``tqdm`` when a bench runs) are
checked statically against the same closure.  A real ``pip install`` into fresh venvs was not
used: jax, jaxlib, flax and orbax per extra take minutes to install, well over the two minutes
a test may take here, and need the network; the closure check answers the same question.
"""

import ast
import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest
import tomllib
from conftest import MODULES, ROOT
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: Each extra that brings a command, and the command it brings.
COMMANDS = {"train": ["train"], "bench": ["bench"]}


def _name(dist: str) -> str:
  return re.sub(r"[-_.]+", "-", dist).lower()


def closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
  """Normalised names of the distributions that installing ``requirements`` brings in."""
  seen: set[str] = set()
  todo = [(Requirement(r), extras) for r in requirements]
  while todo:
    req, active = todo.pop()
    if req.marker is not None and not any(
      req.marker.evaluate({"extra": e}) for e in (active or ("",))
    ):
      continue
    name = _name(req.name)
    try:
      dist = md.distribution(req.name)
    except md.PackageNotFoundError:
      continue  # not installed here (an optional peer for another Python): nothing to import
    key = (name, tuple(sorted(req.extras)))
    if key in seen:
      continue
    seen.add(key)
    todo.extend((Requirement(r), tuple(req.extras)) for r in dist.requires or [])
  return {n for n, _ in seen}


def allowed(extra: str | None) -> set[str]:
  reqs = list(PROJECT["dependencies"])
  if extra is not None:
    reqs += PROJECT["optional-dependencies"][extra]
  return closure(reqs) | {"jaxnll"}


def site_with_only(extra: str | None, where: pathlib.Path) -> pathlib.Path:
  """A site directory holding links to the files of exactly the distributions that the base
  requirements and ``extra`` install (found in this environment's metadata)."""
  site = where / f"site-{extra or 'base'}"
  site.mkdir()
  for name in sorted(allowed(extra) - {"jaxnll"}):
    dist = md.distribution(name)
    base = pathlib.Path(dist.locate_file(""))
    for top in sorted({pathlib.PurePath(f).parts[0] for f in dist.files or []}):
      if top.endswith(".pth") or top == ".." or top == "__pycache__" or (site / top).exists():
        continue
      if (base / top).exists():
        (site / top).symlink_to(base / top)
  return site


def run_with_only(extra, argv, where: pathlib.Path) -> subprocess.CompletedProcess:
  """``jaxnll ARGV`` in a Python that sees the standard library, this checkout and the
  distributions of ``extra`` only (``-S``: no site-packages), as a fresh venv would."""
  site = site_with_only(extra, where)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
    [sys.executable, "-S", "-m", "jaxnll.cli", *argv],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


CATCH = ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")


def third_party_imports(module: str, seen: set[str]) -> set[str]:
  """Top-level names of everything the module and the jaxnll modules it reaches may import,
  at any depth (functions included), except inside ``try: ... except ImportError``."""
  if module in seen or module not in MODULES:
    return set()
  seen.add(module)
  found: set[str] = set()
  tree = ast.parse(MODULES[module].read_text())

  def guarded(node) -> bool:
    return isinstance(node, ast.Try) and any(
      h.type is None
      or getattr(h.type, "id", "") in CATCH
      or isinstance(h.type, ast.Tuple)
      and any(getattr(e, "id", "") in CATCH for e in h.type.elts)
      for h in node.handlers
    )

  # A name imported inside a guarded ``try`` is an optional peer in the whole module (later
  # imports of it run only once the guarded one succeeded).
  optional, optional_jaxnll = set(), set()
  for node in ast.walk(tree):
    if guarded(node):
      for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
        if isinstance(inner, ast.Import):
          optional.update(a.name.partition(".")[0] for a in inner.names)
        elif isinstance(inner, ast.ImportFrom) and inner.module and not inner.level:
          optional.add(inner.module.partition(".")[0])
          # A guarded import of a jaxnll module (an application part another extra brings)
          # is not followed: its own imports are that extra's.
          optional_jaxnll.add(inner.module)
          optional_jaxnll.update(f"{inner.module}.{a.name}" for a in inner.names)

  def visit(node):
    for child in ast.iter_child_nodes(node):
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
        names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
      for n in names:
        if n.partition(".")[0] == "jaxnll":
          if n not in optional_jaxnll:
            found.update(third_party_imports(n, seen))
        elif n.partition(".")[0] not in sys.stdlib_module_names | optional:
          found.add(n.partition(".")[0])
      visit(child)

  visit(tree)
  return found


@pytest.mark.parametrize("extra", sorted(COMMANDS))
def test_each_extra_brings_what_its_command_imports(extra, tmp_path):
  owners = md.packages_distributions()
  # Imported modules come from requirements declared directly, not from whatever another
  # requirement happens to pull in (tokamax brought tqdm where it installs, not on every Python).
  direct = {_name(Requirement(r).name) for r in PROJECT["dependencies"]}
  direct |= {_name(Requirement(r).name) for r in PROJECT["optional-dependencies"][extra]}
  for command in COMMANDS[extra]:
    # What the command runs: its package (the command line itself runs below).
    entry = [m for m in MODULES if m == f"jaxnll.{command}" or m.startswith(f"jaxnll.{command}.")]
    names = set().union(*(third_party_imports(m, set()) for m in entry))
    missing = sorted(n for n in names if {_name(d) for d in owners.get(n, [n])}.isdisjoint(direct))
    assert not missing, f"[{extra}] lacks what `jaxnll {command}` imports: {missing}"
    done = run_with_only(extra, [command, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: jaxnll " + command in done.stdout
    assert "pip install" not in done.stdout + done.stderr  # not the missing-extra message


def test_requires_python_is_what_jaxlib_ships_wheels_for():
  # jaxlib >= 0.8.2 publishes wheels for CPython 3.11 and later only.
  assert PROJECT["requires-python"] == ">=3.11"
  readme = (ROOT / "README.md").read_text()
  assert "3.10" not in readme and "Python 3.11+" in readme


def test_the_license_file_is_apache_2_and_goes_into_the_wheel():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert PROJECT["license"] == "Apache-2.0"
  assert PROJECT["license-files"] == ["LICENSE"]


def test_readme_points_to_no_missing_file():
  readme = (ROOT / "README.md").read_text()
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
    assert (ROOT / target).exists(), f"README links to {target}, which the repository lacks"
  assert "DESIGN.md" not in readme


def test_the_wheel_carries_the_license(tmp_path):
  # The build backend comes from the package index (pip's build isolation; cached after once).
  done = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  (wheel,) = tmp_path.glob("jaxnll-*.whl")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    license_file = next(n for n in names if n.endswith("/LICENSE"))
    assert z.read(license_file).decode() == (ROOT / "LICENSE").read_text()
  assert "License-Expression: Apache-2.0" in meta and "Requires-Python: >=3.11" in meta
