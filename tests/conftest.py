"""Test set-up: eight fake CPU devices for the multi-device tests, deterministic hypothesis."""

import os

# Must happen before jax is imported anywhere: sharding tests run on 8 fake CPU devices.
_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
