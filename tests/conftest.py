"""Test set-up: eight fake CPU devices for the multi-device tests, XLA's quick CPU compile,
deterministic hypothesis, and the ``app`` marker (``make test-fast`` leaves those tests out).

There are no run-time shape checks or rank-promotion errors here: the library checks its own
arguments (``jaxnll.checked``, the ``_core`` checks), and ``tests/test_imports.py`` checks that
its jaxtyping annotations hold under jaxtyping's import hook.
"""

import inspect
import os
import pathlib
import re

# Must happen before jax is imported anywhere: sharding tests run on 8 fake CPU devices, and
# XLA hands LLVM the CPU code at optimisation level 0.  The tests' arrays are tiny: compiling,
# not running, is where their time goes, and level 0 cuts the CPU time of a training test file
# by about a third (tests/test_train.py: 80 s vs 117 s user+sys).  The programs are the same;
# an XLA_FLAGS of the caller's own that names either flag wins.  Tests marked
# `default_compile` assert that two programs round identically (a DPO margin of exactly 0 at
# step 0, policy and reference being the same model), which holds at XLA's default level, not
# at level 0: `make unit` runs them in a lane of their own with
# XLA_FLAGS=--xla_backend_optimization_level=2.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def xla_flags(devices: int) -> str:
  """The tests' XLA_FLAGS for a process of their own with ``devices`` CPU devices."""
  flag = "--xla_force_host_platform_device_count"
  return re.sub(rf"{flag}=\d+", f"{flag}={devices}", os.environ["XLA_FLAGS"])


os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The application around the library (and the command line): it may import flax, optax,
#: orbax, matplotlib at module level.
APPLICATION = ("jaxnll.train", "jaxnll.bench", "jaxnll.cli")


def is_application(name: str) -> bool:
  return any(name == a or name.startswith(a + ".") for a in APPLICATION)


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


#: Every module of the package, by name.
MODULES = {module_name(p): p for p in sorted((ROOT / "jaxnll").rglob("*.py"))}
LIBRARY = sorted(n for n in MODULES if not is_application(n) and n != "jaxnll")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

#: A test that runs the application (the small models, training, benchmarks, the command line):
#: its function's source names one of these.
_APPLICATION_CODE = re.compile(
  r"\btrain\b|\bnnx\b|make_model|jaxnll\.train|jaxnll\.bench|\bbench\b|\bcli\b"
)

settings.register_profile(
  "jaxnll",
  max_examples=25,
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("jaxnll")


@pytest.fixture
def tiny_spec(monkeypatch):
  """A tiny head (D = 32, V = 300) added to the benchmarks' table for the test's duration."""
  from jaxnll import bench

  spec = bench.Spec("tiny", "tiny test head", 32, 300, cpu=(2, 16))
  monkeypatch.setitem(bench.SPECS, spec.name, spec)
  return spec


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "app: runs the application (models, training, command line, benchmarks); "
    "`make test-fast` leaves these out (-m 'not app')",
  )
  config.addinivalue_line(
    "markers",
    "default_compile: asserts bit-equal programs; `make unit` runs these at XLA's default "
    "optimisation level (a lane of their own), the rest at level 0",
  )


def pytest_collection_modifyitems(items):
  for item in items:
    if _runs_application(item):
      item.add_marker("app")


def _runs_application(item) -> bool:
  path = str(getattr(item, "path", getattr(item, "fspath", "")))
  if "/jaxnll/" in path:  # a doctest
    return "/jaxnll/train/" in path or "/jaxnll/bench/" in path or path.endswith("cli.py")
  module = getattr(item, "module", None)
  for value in vars(module).values() if module is not None else ():
    name = getattr(value, "__name__", "") or ""
    if inspect.ismodule(value) and name.split(".")[0] == "flax" or name.startswith("jaxnll.train"):
      return True  # a test module of the application
  fn = getattr(item, "function", None)
  try:
    source = inspect.getsource(fn) if fn is not None else ""
  except (OSError, TypeError):
    source = ""
  return bool(_APPLICATION_CODE.search(source))
