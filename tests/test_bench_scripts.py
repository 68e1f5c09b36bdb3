"""Tests for the scripts in bench/: each one's main at a tiny head writes records of the one
schema, with every implementation checked against the reference; torch's peers fall back."""

import importlib.util
import os

import pytest

from jaxnll import bench

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "bench")


def _script(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _records(out, name: str) -> list[dict]:
  rows = bench.load(str(out), name)
  assert rows
  for r in rows:
    assert tuple(r) == bench.FIELDS and r["bench"] == name
    assert r["device"] and r["jax_version"] and r["git_commit"] and r["date"] and r["run_id"]
  return rows


def _status(rows: list[dict]) -> dict[tuple, str]:
  """``{(spec, shards, impl): stat}``, every status ``ok`` unless tokamax is skipped here."""
  status = {(r["spec"], r["shards"], r["impl"]): r for r in rows if r["metric"] == "status"}
  for key, r in status.items():
    if not (key[2] == "tokamax" and r["stat"] == "skipped"):
      assert r["stat"] == "ok", (key, r["note"])
  return {k: r["stat"] for k, r in status.items()}


def _fwd_bwd(rows: list[dict], metric: str, stat: str = "value", **where) -> dict:
  return {
    r["impl"]: r["value"]
    for r in rows
    if r["metric"] == metric
    and r["stat"] == stat
    and r["pass"] == "fwd_bwd"
    and all(r[k] == v for k, v in where.items())
  }


def test_bench_fused_memory_curve_and_timed_check(tiny_spec, tmp_path, capsys):
  argv = ["--out", str(tmp_path), "--spec", "tiny", "--tokens", "2x16", "--vocabs", "300,600"]
  argv += ["--time-spec", "tiny", "--time-tokens", "2x16", "--quick", "--impl", "jaxnll_fused"]
  assert _script("bench_fused").main(argv) == 0
  rows = _records(tmp_path, "fused")
  status = _status(rows)
  for spec in ("tiny", "tiny@V=600"):
    assert (spec, 1, "jaxnll_fused") in status and (spec, 1, "optax") in status
  memory = [r for r in rows if r["note"] == "compile only" and r["metric"] == "temp_bytes"]
  assert {(r["vocab"], r["dtype"]) for r in memory} == {(300, "bfloat16"), (600, "bfloat16")}
  assert set(_fwd_bwd(rows, "max_rel_err", span_fraction=0.25)) == {"optax", "jaxnll_fused"}
  assert set(_fwd_bwd(rows, "ratio_vs_optax", "median", span_fraction=0.25)) == {"jaxnll_fused"}
  with open(tmp_path / "fused.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "jaxnll_fused" in capsys.readouterr().out


def test_bench_token_checks_and_times_the_losses_from_logits(tiny_spec, tmp_path):
  argv = ["--out", str(tmp_path), "--spec", "tiny", "--tokens", "2x16", "--dtype", "float32"]
  assert _script("bench_token").main([*argv, "--fractions", "0.5", "--repeats", "2"]) == 0
  rows = _records(tmp_path, "token")
  assert set(_status(rows)) == {("tiny", 1, n) for n in bench.logits_implementations()}
  assert set(_fwd_bwd(rows, "max_rel_err")) == set(bench.logits_implementations())
  ratios = _fwd_bwd(rows, "ratio_vs_optax", "median")
  assert set(ratios) == {"optax_f32", "token_nll", "sequence_nll"}
  temp = _fwd_bwd(rows, "temp_bytes")
  assert temp["sequence_nll"] < temp["optax"]  # no f32 copy of the logits
  assert not any(r["pass"] == "fwd" for r in rows)


def test_distill_memory_checks_then_compiles(tiny_spec, tmp_path):
  argv = ["--out", str(tmp_path), "--spec", "tiny", "--tokens", "2x16"]
  assert _script("distill_memory").main(argv) == 0
  rows = _records(tmp_path, "distill")
  _status(rows)
  checked = [r for r in rows if r["metric"] == "max_rel_err"]
  assert {r["impl"] for r in checked} == {"optax", "jaxnll_ce", "jaxnll_kl"}
  assert {(r["batch"], r["length"]) for r in checked} == {(2, 16)}
  temp = _fwd_bwd(rows, "temp_bytes", note="compile only")
  assert temp["jaxnll_ce"] < temp["optax"] and temp["jaxnll_kl"] < temp["optax"]


def test_bench_parallel_per_device_memory_on_a_mesh(tiny_spec, tmp_path):
  argv = ["--out", str(tmp_path), "--spec", "tiny", "--tokens", "2x16", "--shards", "1,2"]
  assert _script("bench_parallel").main([*argv, "--check-spec", "tiny"]) == 0
  rows = _records(tmp_path, "parallel")
  status = _status(rows)
  assert {k for k in status} == {("tiny", n, p) for n in (1, 2) for p in ("fused", "logits")}
  assert {r["shards"] for r in rows if r["metric"] == "max_rel_err"} == {1, 2}
  mem = {(r["impl"], r["shards"], r["metric"]) for r in rows if r["note"] == "compile only"}
  for metric in ("temp_bytes", "argument_bytes", "output_bytes"):
    assert ("fused", 2, metric) in mem and ("logits", 1, metric) in mem
  weight = {
    r["shards"]: r["value"]
    for r in rows
    if r["impl"] == "fused" and r["metric"] == "argument_bytes"
  }
  assert weight[2] < weight[1]  # each device holds half the head


def test_report_script_writes_the_table(tiny_spec, tmp_path, capsys):
  case = bench.resolve(tiny_spec, backend="cpu")
  impls = bench.implementations(case, ("optax", "jaxnll_fused"))
  rows = bench.bench_case(case, bench.environment(), fractions=(1.0,), repeats=1, impls=impls)
  bench.save(rows, str(tmp_path))
  assert _script("report").main(["--out", str(tmp_path), "--print"]) == 0
  out = capsys.readouterr().out
  assert "| jaxnll_fused | 1 |" in out and "bench.md" in out


def test_torch_peers_fall_back_cleanly(tmp_path, capsys):
  module = _script("torch_peers")
  torch, why = bench.torch_peers.import_torch()
  if torch is not None:  # a CUDA machine: the peers run for real elsewhere (bench/gpu.sh)
    pytest.skip("torch with CUDA is here: bench/gpu.sh runs the peers")
  assert module.main(["--out", str(tmp_path), "--spec", "mistral-7b"]) == 0
  assert "torch peers skipped" in capsys.readouterr().out and why
  assert not os.path.exists(tmp_path / "bench.jsonl")
