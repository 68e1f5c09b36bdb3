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


def imports(path: pathlib.Path, *, module_level_only: bool) -> list[tuple[str, int]]:
  """``(imported module, line)`` for every import in the file; with ``module_level_only``,
  only those that run when the module is imported (not inside a function)."""
  name = module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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
        base = child.module or ""
        if child.level:
          anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
          base = ".".join([*anchor, base] if base else anchor)
        for a in child.names:
          sub = f"{base}.{a.name}"
          # `from jaxnll import nll` imports the module jaxnll.nll, not (only) the package.
          found.append((sub if sub in MODULES else base, child.lineno))
      visit(child)

  visit(ast.parse(path.read_text(), filename=str(path)))
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
