"""Tests for jaxnll/bench/: the quick run writes records, table and plot; the reference check
catches a wrong implementation; shapes resolve per backend; records keep one schema."""

import csv
import json
import os

import jax.numpy as jnp
import pytest

from jaxnll import bench


def test_specs_are_the_real_heads():
  heads = {n: (s.hidden, s.vocab) for n, s in bench.SPECS.items() if s.accel is not None}
  assert heads == {
    "gemma2-2b": (2304, 256000),
    "llama3-8b": (4096, 128256),
    "qwen3-8b": (4096, 151936),
    "mistral-7b": (4096, 32768),
  }


def test_resolve_picks_sizes_by_backend():
  llama = bench.SPECS["llama3-8b"]
  gpu = bench.resolve(llama, backend="gpu")
  assert (gpu.batch, gpu.length, gpu.dtype, gpu.token_chunk) == (4, 2048, "bfloat16", None)
  cpu = bench.resolve(llama, backend="cpu")
  assert cpu.tokens < gpu.tokens and cpu.dtype == "float32"
  assert cpu.token_chunk == cpu.tokens // 4  # span skipping at the same granularity
  quick = bench.resolve(bench.SPECS[bench.QUICK_SPEC["cpu"]], backend="cpu", quick=True)
  assert quick.tokens <= 512
  assert bench.resolve(llama, backend="cpu", tokens=(3, 8), dtype="bfloat16").tokens == 24


def test_span_mask_is_the_tail_of_each_row():
  m = bench.span_mask(2, 8, 0.25)
  assert m.tolist() == [[False] * 6 + [True] * 2] * 2
  assert bench.span_mask(1, 4, 1.0).all()


def test_quick_run_writes_records_table_and_plot(tiny_spec, tmp_path, capsys):
  out = str(tmp_path / "results")
  argv = ["--quick", "--spec", "tiny", "--out", out, "--repeats", "2", "--no-progress"]
  assert bench.main(argv) == 0
  records = bench.load(out)
  with open(os.path.join(out, "bench.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(records) > 0
  assert tuple(rows[0]) == bench.FIELDS
  for r in records:
    assert r["device"] and r["jax_version"] and r["git_commit"] and r["date"] and r["run_id"]
  status = {r["impl"]: r for r in records if r["metric"] == "status" and r["spec"] == "tiny"}
  expected = set(bench.implementations(bench.resolve(tiny_spec, backend="cpu")))
  assert set(status) == expected
  for name, r in status.items():
    if name == "tokamax" and r["stat"] == "skipped":
      assert r["note"]  # the reason it does not run here
    else:
      assert r["stat"] == "ok", (name, r["note"])
  timed = {(r["impl"], r["pass"], r["span_fraction"]) for r in records if r["metric"] == "time_s"}
  for name in ("optax", "jaxnll_fused", "jaxnll_fused_scalar"):
    for p in bench.PASSES:
      for f in bench.QUICK_FRACTIONS:
        assert (name, p, f) in timed
  metrics = {r["metric"] for r in records}
  assert {"compile_s", "temp_bytes", "time_s", "ratio_vs_optax", "flops_per_s"} <= metrics
  assert {"matmul_fraction", "max_rel_err"} <= metrics
  stats = {r["stat"] for r in records if r["metric"] == "time_s"}
  assert stats == {"median", "p20", "p80"}
  # The fused kernels never hold the [B, T, V] logits: less temp memory than optax's path.
  temp = {
    r["impl"]: r["value"] for r in records if r["metric"] == "temp_bytes" and r["pass"] == "fwd_bwd"
  }
  assert temp["jaxnll_fused"] < temp["optax"]

  md = open(os.path.join(out, "bench.md")).read()
  for name in ("optax", "jaxnll_fused", "jaxnll_fused_scalar", "naive", "jaxnll_logits"):
    assert f"| {name} | 1 |" in md and f"| {name} | 0.25 |" in md
  # The fused distillation rows of the same head: their own table, timed against the logits
  # path (optax on both materialised logits) at each span fraction, checked, less memory.
  kd = [r for r in records if r["spec"] == "tiny+kd"]
  assert {r["impl"]: r["stat"] for r in kd if r["metric"] == "status"} == {
    "optax": "ok",
    "jaxnll_fused": "ok",
  }
  ratios = {
    (r["pass"], r["span_fraction"]) for r in kd if r["metric"] == "ratio_vs_optax"
    and r["impl"] == "jaxnll_fused" and r["stat"] == "median"
  }  # fmt: skip
  assert ratios == {(p, f) for p in bench.PASSES for f in bench.QUICK_FRACTIONS}
  kd_temp = {
    r["impl"]: r["value"] for r in kd if r["metric"] == "temp_bytes" and r["pass"] == "fwd_bwd"
  }
  assert kd_temp["jaxnll_fused"] < kd_temp["optax"]
  assert "### tiny+kd: fused distillation" in md
  pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  assert len(pngs) == 2
  assert sum(p.startswith("bench_tiny_") for p in pngs) == 1
  assert sum(p.startswith("bench_tiny-kd_") for p in pngs) == 1
  for png in pngs:
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "bench.md" in capsys.readouterr().out

  # A second run appends; the report shows the latest run of each implementation.
  bench.save(records[:3], out)
  assert len(bench.load(out)) == len(records) + 3
  with open(os.path.join(out, "bench.csv")) as f:
    assert len(list(csv.DictReader(f))) == len(records) + 3


def _dropped_first_target(h, w, y, m):
  """The classic off-by-one: the first token of each span is not predicted."""
  first = m & ~jnp.pad(m, ((0, 0), (1, 0)))[:, :-1]
  return bench.optax_loss(h, w, y, m & ~first)


def test_memory_only_compiles_at_accelerator_sizes(tiny_spec, tmp_path):
  out = str(tmp_path)
  assert bench.main(["--memory-only", "--spec", "tiny", "--tokens", "2x64", "--out", out]) == 0
  records = bench.load(out)
  assert not any(r["metric"] == "time_s" for r in records)
  temp = {
    r["impl"]: r["value"] for r in records if r["metric"] == "temp_bytes" and r["pass"] == "fwd_bwd"
  }
  assert {"optax", "naive", "jaxnll_fused", "jaxnll_fused_scalar"} <= set(temp)
  assert {r["dtype"] for r in records} == {"bfloat16"}  # the accelerator dtype, on any backend
  md = open(os.path.join(out, "bench.md")).read()
  assert "Compile only" in md and "| jaxnll_fused |" in md


def test_reference_check_catches_a_wrong_implementation(tiny_spec):
  case = bench.resolve(tiny_spec, backend="cpu")
  impls = bench.implementations(case)
  impls = {
    "optax": impls["optax"],
    "matmul": impls["matmul"],
    "ignores_mask": bench.Impl(
      "ignores_mask", lambda h, w, y, m: bench.optax_loss(h, w, y, m | True)
    ),
    "mean_not_sum": bench.Impl(
      "mean_not_sum", lambda h, w, y, m: bench.optax_loss(h, w, y, m) / jnp.sum(m)
    ),
    "off_by_one": bench.Impl("off_by_one", _dropped_first_target),
  }
  env = bench.environment()
  rows = bench.bench_case(case, env, fractions=(0.5,), repeats=1, warmup=0, impls=impls)
  status = {r["impl"]: r for r in rows if r["metric"] == "status"}
  assert status["optax"]["stat"] == "ok" and status["matmul"]["stat"] == "ok"
  for name in ("ignores_mask", "mean_not_sum", "off_by_one"):
    assert status[name]["stat"] == "check_failed", name
    assert "jaxnll.reference" in status[name]["note"]
    assert not any(r["impl"] == name and r["metric"] == "time_s" for r in rows)
  errs = {r["impl"]: r["value"] for r in rows if r["metric"] == "max_rel_err"}
  assert errs["optax"] < 1e-4 and errs["off_by_one"] > 1e-2


def test_report_keeps_failures_as_notes(tiny_spec, tmp_path):
  env = bench.environment()
  case = bench.resolve(tiny_spec, backend="cpu")
  impls = {
    "optax": bench.implementations(case)["optax"],
    "broken": bench.Impl("broken", lambda h, w, y, m: jnp.sum(h) * jnp.nan),
  }
  rows = bench.bench_case(case, env, fractions=(1.0,), repeats=1, warmup=0, impls=impls)
  bench.save(rows, str(tmp_path))
  md, pngs = bench.report(str(tmp_path))
  text = open(md).read()
  assert "`broken`: check_failed" in text and "| optax | 1 |" in text
  assert len(pngs) == 1


def test_cli_has_the_bench_subcommand(capsys):
  from jaxnll import cli

  if "bench" not in cli.SUBCOMMANDS:
    pytest.fail("jaxnll/cli.py does not register `bench`")
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for option in ("--quick", "--spec", "--out"):
    assert option in out


def test_records_are_json_lines(tmp_path):
  bench.save([dict.fromkeys(bench.FIELDS, 1)], str(tmp_path))
  line = open(tmp_path / "bench.jsonl").read().strip()
  assert set(json.loads(line)) == set(bench.FIELDS)


def test_older_records_load_and_the_csv_is_rewritten_with_every_column(tmp_path):
  old_fields = [f for f in bench.FIELDS if f not in ("bench", "shards")]
  with open(tmp_path / "bench.csv", "w") as f:
    f.write(",".join(old_fields) + "\n" + ",".join("7" for _ in old_fields) + "\n")
  with open(tmp_path / "bench.jsonl", "w") as f:
    f.write(json.dumps(dict.fromkeys(old_fields, 7)) + "\n")
  (old,) = bench.load(str(tmp_path))
  assert tuple(old) == bench.FIELDS and old["bench"] == "bench" and old["shards"] == 1
  bench.save([dict.fromkeys(bench.FIELDS, 2)], str(tmp_path))
  with open(tmp_path / "bench.csv") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == bench.FIELDS and len(rows) == 2
  assert rows[0]["shards"] == "1" and rows[0]["metric"] == "7" and rows[1]["metric"] == "2"


def test_interleave_rotates_the_order_and_reverses_every_other_repetition():
  order = []
  calls = {n: {"fwd": lambda n=n: order.append(n)} for n in "abc"}
  times = bench.interleave(calls, 4, timer=lambda call: call() or 1.0)
  assert "".join(order) == "abc" + "acb" + "cab" + "cba"
  assert times == {n: {"fwd": [1.0] * 4} for n in "abc"}


def test_with_vocab_names_the_variant_of_a_real_head():
  llama = bench.SPECS["llama3-8b"]
  assert bench.with_vocab(llama, llama.vocab) is llama
  v = bench.with_vocab(llama, 32768)
  assert (v.name, v.hidden, v.vocab) == ("llama3-8b@V=32768", 4096, 32768)
