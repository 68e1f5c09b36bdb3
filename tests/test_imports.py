"""The layers of the package: ``import jaxnll`` stays light, the library imports no
application package, and no two jaxnll modules import each other (``DESIGN.md``,
"Architecture")."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import LIBRARY, MODULES, ROOT, is_application, module_name

# What only the application, the benchmarks or the tests may load.
HEAVY = ("flax", "optax", "orbax", "matplotlib", "tqdm", "chex", "hypothesis", "tokamax", "torch")
# Never imported at module level by a library module.
APPLICATION_DEPS = ("flax", "optax", "orbax", "matplotlib", "tqdm")


#: Calls that import a module named by a string: the scan reads their first argument.
DYNAMIC_IMPORTS = ("importlib.import_module", "import_module", "__import__", "importlib.__import__")


def resolve(name: str, path: pathlib.Path, module: str | None, level: int) -> str:
  """The absolute module of ``from <level dots><module> import ...`` inside ``name``."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  base = module or ""
  if level:
    anchor = package.split(".")[: len(package.split(".")) - (level - 1)]
    base = ".".join([*anchor, base] if base else anchor)
  return base


def imports(
  path: pathlib.Path, *, module_level_only: bool, source: str | None = None, name: str | None = None
) -> list[tuple[str, int]]:
  """``(imported module, line)`` for every import in the file, ``importlib.import_module("x")``
  and ``__import__("x")`` with a literal name included; with ``module_level_only``, only those
  that run when the module is imported (not inside a function).  ``source`` / ``name`` scan
  text as if it were the module ``name`` at ``path``."""
  name = module_name(path) if name is None else name
  found = []

  def visit(node):
    for child in ast.iter_child_nodes(node):
      if module_level_only and isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
      ):
        continue
      if isinstance(child, ast.Import):
        found.extend((a.name, child.lineno) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = resolve(name, path, child.module, child.level)
        for a in child.names:
          sub = f"{base}.{a.name}"
          # `from jaxnll import nll` imports the module jaxnll.nll, not (only) the package.
          found.append((sub if sub in MODULES else base, child.lineno))
      elif (
        isinstance(child, ast.Call)
        and ast.unparse(child.func) in DYNAMIC_IMPORTS
        and child.args
        and isinstance(child.args[0], ast.Constant)
        and isinstance(child.args[0].value, str)
      ):
        found.append((child.args[0].value, child.lineno))
      visit(child)

  text = path.read_text() if source is None else source
  visit(ast.parse(text, filename=str(path)))
  return found


def hidden_imports(path: pathlib.Path, *, source: str | None = None) -> list[str]:
  """Imports a reader of the module's head does not see: an ``import`` inside a function or
  class (lazy), and any ``importlib`` / ``__import__`` call (literal name or not)."""
  tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
  found = []

  def visit(node, nested):
    for child in ast.iter_child_nodes(node):
      inner = nested or isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
      )
      if isinstance(child, (ast.Import, ast.ImportFrom)) and nested:
        found.append(f"{path.name}:{child.lineno} lazy `{ast.unparse(child)}`")
      elif isinstance(child, ast.Call) and (
        ast.unparse(child.func) in DYNAMIC_IMPORTS or "importlib" in ast.unparse(child.func)
      ):
        found.append(f"{path.name}:{child.lineno} dynamic `{ast.unparse(child)}`")
      visit(child, inner)

  visit(tree, False)
  return found


def private_names(
  path: pathlib.Path, *, source: str | None = None, name: str | None = None
) -> list[str]:
  """Private names (``_x``, not dunder) of another jaxnll module that a module reads:
  ``from jaxnll.m import _x`` and ``m._x`` for an imported jaxnll module ``m``.  A private
  *module* (``jaxnll._core``, the library's shared internals) may be imported; its private
  names may not."""
  name = module_name(path) if name is None else name
  tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
  aliases, found = {}, []

  def private(attr):
    return attr.startswith("_") and not attr.startswith("__")

  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      base = resolve(name, path, node.module, node.level)
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
          aliases[a.asname or a.name] = sub
        elif base.split(".")[0] == "jaxnll" and base != name and private(a.name):
          found.append(f"{path.name}:{node.lineno} from {base} import {a.name}")
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxnll":
          aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "jaxnll"
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and private(node.attr):
      parts, value = [], node.value
      while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id in aliases:
        owner = ".".join([aliases[value.id], *reversed(parts)])
        if owner in MODULES and owner != name:
          found.append(f"{path.name}:{node.lineno} {owner}.{node.attr}")
  return found


def test_import_jaxnll_loads_no_application_package():
  code = "import jaxnll, sys; print(' '.join(sorted(sys.modules)))"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  ).stdout
  loaded = set(out.split())
  assert "jaxnll" in loaded and "jax" in loaded
  assert "jaxnll.fused" in loaded and "jaxnll.nll" in loaded
  heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
  assert not heavy, f"`import jaxnll` loads {heavy}"


def test_the_library_imports_no_application_package_at_module_level():
  library = ["jaxnll", *LIBRARY]
  assert {"jaxnll.nll", "jaxnll.spans", "jaxnll.fused.api"} <= set(library)
  bad = [
    f"{MODULES[n].relative_to(ROOT)}:{line} imports {imported}"
    for n in library
    for imported, line in imports(MODULES[n], module_level_only=True)
    if imported.split(".")[0] in APPLICATION_DEPS or is_application(imported)
  ]
  assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_application():
  # Anywhere in the file (a function's import, an importlib string), not just at module level:
  # jaxnll.train, jaxnll.bench and jaxnll.cli sit on the library, never under it.
  bad = [
    f"{MODULES[n].relative_to(ROOT)}:{line} imports {imported}"
    for n in ["jaxnll", *LIBRARY]
    for imported, line in imports(MODULES[n], module_level_only=False)
    if is_application(imported)
  ]
  assert not bad, "\n".join(bad)


def test_the_library_has_no_lazy_or_hidden_import():
  bad = [hit for n in ["jaxnll", *LIBRARY] for hit in hidden_imports(MODULES[n])]
  assert not bad, "\n".join(bad)


def test_no_library_module_reads_another_modules_private_names():
  # The shared internals live in jaxnll._core under public names; a `_name` is its module's own.
  bad = [hit for n in ["jaxnll", *LIBRARY] for hit in private_names(MODULES[n])]
  assert not bad, "\n".join(bad)


def test_f32_is_defined_once_in_the_library():
  # jaxnll._core.F32, imported everywhere else (one accumulation dtype, one name).
  defined = [
    f"{MODULES[n].relative_to(ROOT)}:{node.lineno}"
    for n in ["jaxnll", *LIBRARY]
    for node in ast.walk(ast.parse(MODULES[n].read_text()))
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "F32" for t in node.targets)
  ]
  assert defined == ["jaxnll/_core.py:" + defined[0].rpartition(":")[2]], defined


_SNEAKY = """
import importlib

def late():
  from jaxnll import nll
  runtime = importlib.import_module("jaxnll.train.runtime")
  return nll._reduce, __import__("jaxnll.cli"), runtime

from jaxnll.fused.api import _check
"""


def test_the_scans_see_strings_lazy_imports_and_private_names():
  path = MODULES["jaxnll.parallel"]
  found = dict(imports(path, module_level_only=False, source=_SNEAKY, name="jaxnll.parallel"))
  assert "jaxnll.train.runtime" in found and "jaxnll.cli" in found
  at_load = dict(imports(path, module_level_only=True, source=_SNEAKY, name="jaxnll.parallel"))
  assert "jaxnll.train.runtime" not in at_load and "jaxnll.fused.api" in at_load
  hidden = hidden_imports(path, source=_SNEAKY)
  assert [h.split()[1] for h in hidden] == ["lazy", "dynamic", "dynamic"], hidden
  private = private_names(path, source=_SNEAKY, name="jaxnll.parallel")
  assert sorted(h.split(" ", 1)[1] for h in private) == [
    "from jaxnll.fused.api import _check",
    "jaxnll.nll._reduce",
  ], private
  # A module's own private names and dunders are not crossings; jaxnll._core may be imported.
  own = "from jaxnll import _core\nimport jaxnll.nll as n\n_x = 1\nn.__name__, _core.F32, _x"
  assert private_names(path, source=own, name="jaxnll.parallel") == []


def import_graph() -> dict[str, set[str]]:
  """jaxnll module -> the jaxnll modules it imports, anywhere in the file."""
  return {
    name: {
      imported
      for imported, _ in imports(path, module_level_only=False)
      if imported in MODULES and imported != name
    }
    for name, path in MODULES.items()
  }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def dfs(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return [*path[path.index(nxt) :], nxt]
      if nxt not in state and (cycle := dfs(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := dfs(node)):
      return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "anywhere"])
def test_the_import_scan_sees_relative_and_function_imports(tmp_path, module_level_only):
  # The scan itself: a relative import, an import inside a function, `from package import module`.
  found = dict(imports(MODULES["jaxnll.fused.api"], module_level_only=module_level_only))
  assert "jaxnll.fused.kernel" in found and "jaxnll._core" in found and "jaxnll.nll" in found
  found = dict(imports(MODULES["jaxnll.cli"], module_level_only=module_level_only))
  assert ("jaxnll.parallel" in found) is (not module_level_only)  # imported inside a function


def test_no_import_cycle_between_jaxnll_modules():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


_SHAPE_CHECK = """
import jaxtyping
jaxtyping.install_import_hook("jaxnll", "beartype.beartype")
import jax.numpy as jnp
import jaxnll
logits, targets = jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32)  # T: 3 vs 4
try:
  jaxnll.sequence_nll(logits, targets, jnp.ones((2, 4), bool))
except jaxtyping.TypeCheckError as e:
  assert "targets" in str(e), e
  print("checked")
"""


def test_library_shape_annotations_are_checked_under_the_import_hook():
  # In a fresh process: the hook only checks modules imported after it is installed.
  out = subprocess.run(
    [sys.executable, "-c", _SHAPE_CHECK], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "checked", "sequence_nll took targets [2, 4] for logits [2, 3, 5]"


def test_star_import_gives_the_public_api_and_no_submodule():
  import types

  import jaxnll

  namespace: dict = {}
  exec("from jaxnll import *", namespace)
  got = {k for k in namespace if not k.startswith("__")}
  assert got == set(jaxnll.__all__)
  assert not [k for k, v in namespace.items() if isinstance(v, types.ModuleType)]
  assert {"sequence_nll", "linear_nll_loss", "checked", "pack_samples"} <= got
  # __all__ is the names imported one per line, no more and no fewer.
  tree = ast.parse(pathlib.Path(jaxnll.__file__).read_text())
  imported = [a.asname for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names]
  assert sorted(jaxnll.__all__) == sorted(imported)
