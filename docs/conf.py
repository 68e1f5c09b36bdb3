"""Sphinx configuration of the jaxnll API reference (``make docs``)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from docutils.utils import get_source_line
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxnll  # noqa: E402

project = "jaxnll"
author = "the jaxnll authors"
copyright = "the jaxnll authors"  # noqa: A001
release = version = jaxnll.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
# jaxtyping's shapes read best as written in the source: ``Float[Array, 'B T V']``.
autodoc_type_aliases: dict[str, str] = {}
python_use_unqualified_type_names = True

nitpicky = True
# Names outside jaxnll: there is no network for intersphinx, so references to them stay text.
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|jaxtyping|numpy|np|jnp|typing|collections)(\..*)?"),
  (r"py:.*", r"(Array|ArrayLike|Float|Int|Bool|Shaped|Mesh|NamedSharding|PartitionSpec|P)"),
  (r"py:.*", r"(Callable|Sequence|Literal|Any|NamedTuple|optional)"),
  (r"py:class", r"(int|float|str|bool|dict|tuple|list|slice|None|ndarray)"),
  # Members of the fused kernels' internal plan and compacted batch.
  (r"py:(attr|meth)", r"(Plan|Compacted)\..*"),
]


APPLICATION = r"jaxnll\.(train|model|data|metrics|distill_train|bench|cli)(\..*)?"
# The application around the library has no API reference of its own.
nitpick_ignore_regex.append((r"py:.*", APPLICATION))
nitpick_ignore_regex.append((r"py:.*", r"jaxnll(\.\w+)*\._\w+(\..*)?"))  # private helpers


def public_names(module) -> list[str]:
  """The public API of ``module``: ``__all__`` if it has one, else every public function or
  class that it defines (a package: that it re-exports from its own modules)."""
  names = getattr(module, "__all__", None)
  if names is None:
    prefix = module.__name__ + "." if hasattr(module, "__path__") else None
    names = []
    for name, obj in vars(module).items():
      if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue
      owner = getattr(obj, "__module__", "") or ""
      if owner == module.__name__ or (prefix and owner.startswith(prefix)):
        names.append(name)
  return sorted(names)


def documented_constants(modname: str) -> list[tuple[str, list[str]]]:
  """Module-level names with a ``#:`` doc comment, in source order."""
  docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
  items = sorted((k, v) for k, v in docs.items() if k[0] == "")
  order = ModuleAnalyzer.for_module(modname).tagorder
  items.sort(key=lambda kv: order.get(kv[0][1], 0))
  return [(name, list(lines)) for (_, name), lines in items if not name.startswith("_")]


def submodules(package, exclude: str | None = None) -> list[str]:
  """The public library modules of a package (never the application's), not yet imported."""
  names = (f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))
  return sorted(
    n
    for n in names
    if not n.rsplit(".", 1)[1].startswith("_")
    and not re.fullmatch(APPLICATION, n)
    and not (exclude and re.fullmatch(exclude, n))
  )


class PublicAPI(SphinxDirective):
  """``.. public-api:: jaxnll.fused`` — a summary table and the full entry of every public
  name of the module, found at build time (a name added to the package appears here without
  editing the docs), then its documented constants.

  ``:skip-exported:`` leaves out what the top-level ``jaxnll`` re-exports; ``:submodules:``
  adds each library module of a package (its docstring, what it defines beyond the
  re-exports, its constants) except those matching the ``:exclude:`` regular expression.
  """

  required_arguments = 1
  option_spec = {
    "skip-exported": directives.flag,
    "submodules": directives.flag,
    "exclude": directives.unchanged,
  }

  def run(self) -> list[nodes.Node]:
    modname = self.arguments[0]
    module = importlib.import_module(modname)
    lines = self._members(modname, skip_exported="skip-exported" in self.options)
    lines += self._constants(modname)
    if "submodules" in self.options:
      for sub in submodules(module, self.options.get("exclude")):
        lines += [f".. rubric:: ``{sub}``", "", f".. automodule:: {sub}", "   :no-members:", ""]
        lines += self._members(sub, skip_exported=True) + self._constants(sub)
    node = nodes.container()
    self.state.nested_parse(StringList(lines, source=f"<public-api {modname}>"), 0, node)
    return node.children

  @staticmethod
  def _members(modname: str, *, skip_exported: bool) -> list[str]:
    module = importlib.import_module(modname)
    names = public_names(module)
    if skip_exported:
      exported = {id(getattr(jaxnll, n)) for n in public_names(jaxnll)}
      names = [n for n in names if id(getattr(module, n)) not in exported]
    lines = [f".. currentmodule:: {modname}", ""]
    if names:
      lines += [".. list-table::", "   :widths: 30 70", ""]
      for name in names:
        doc = (inspect.getdoc(getattr(module, name)) or "").strip()
        lines += [f"   * - :obj:`{name}`", f"     - {doc.splitlines()[0] if doc else ''}"]
      lines.append("")
    for name in names:
      if inspect.isclass(getattr(module, name)):
        lines += [f".. autoclass:: {name}", "   :members:", ""]
      else:
        lines += [f".. autofunction:: {name}", ""]
    return lines

  @staticmethod
  def _constants(modname: str) -> list[str]:
    module = importlib.import_module(modname)
    lines = [f".. currentmodule:: {modname}", ""]
    for name, doc in documented_constants(modname):
      value = getattr(module, name)
      lines += [f".. py:data:: {name}"]
      if isinstance(value, (bool, int, float, str, tuple)) and len(repr(value)) < 80:
        lines += [f"   :value: {value!r}"]  # plain values only: no object reprs, no paths
      lines += [""]
      lines += [f"   {line}" for line in doc] + [""]
    return lines


def _resolve_where_written(app, env, node, contnode):
  """Resolve a reference the way its author read it.

  In order: against the module the docstring was written in (``jaxnll.fused.api``), then its
  parents; a qualified name of an object the top level re-exports (``jaxnll.fused.X`` is
  documented as ``jaxnll.X``); the one documented object of that name.  A name that matches
  nothing, or several things, stays a warning.
  """
  if node.get("refdomain") != "py":
    return None
  domain = env.get_domain("py")
  target = node["reftarget"].lstrip("~.")

  def resolve(name):
    return domain.resolve_xref(
      env, node["refdoc"], app.builder, node["reftype"], name, node, contnode
    )

  source = node.source or get_source_line(node)[0] or ""
  m = re.search(r"docstring of ([\w.]+)", source)
  parts = m.group(1).split(".") if m else []
  for i in range(len(parts), 0, -1):
    name = ".".join([*parts[:i], target])
    if name in domain.objects:
      return resolve(name)
  short = target.rsplit(".", 1)[-1]
  if target.startswith("jaxnll.") and f"jaxnll.{short}" in domain.objects:
    modname = target.rsplit(".", 1)[0]
    try:
      same = getattr(importlib.import_module(modname), short) is getattr(jaxnll, short)
    except (ImportError, AttributeError):
      same = False
    if same:
      return resolve(f"jaxnll.{short}")
  if "." not in target:
    matches = [n for n in domain.objects if n.startswith("jaxnll.") and n.endswith("." + target)]
    if len(matches) == 1:
      return resolve(matches[0])
  return None


def _short_array_names(app, what, name, obj, options, signature, return_annotation):
  """``Float[jaxlib._jax.Array, 'B T']`` -> ``Float[Array, 'B T']``, as the source writes it."""
  short = lambda s: s and re.sub(r"\b(?:jaxlib\._jax|jax)\.Array\b", "Array", s)
  return short(signature), short(return_annotation)


def setup(app):
  app.add_directive("public-api", PublicAPI)
  app.connect("missing-reference", _resolve_where_written)
  app.connect("autodoc-process-signature", _short_array_names)
  return {"parallel_read_safe": True}
