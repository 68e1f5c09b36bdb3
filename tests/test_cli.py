"""Tests for jaxnll/cli.py: `jaxnll train` (outputs, resume), `jaxnll eval`, errors."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxnll import cli
from jaxnll.train import data as data_lib

TINY = ["--d-model", "16", "--layers", "1", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "small.jsonl"
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::70], path)  # 50 samples
  return str(path)


def test_help_lists_the_subcommands(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "train" in out and "eval" in out
  assert set(cli.SUBCOMMANDS) >= {"train", "eval"}


def test_train_resume_and_eval(tmp_path, data_file, capsys):
  run = tmp_path / "run"
  args = ["train", "--data", data_file, "--out", str(run), *TINY]
  assert cli.main([*args, "--steps", "3", "--pack", "--accum", "2", "--eval-every", "2"]) == 0
  out = capsys.readouterr().out
  assert "held-out target NLL" in out and "| greedy" in out
  for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json"):
    assert (run / name).is_file(), name
  assert any((run / "checkpoints").iterdir())
  config = json.loads((run / "config.json").read_text())
  assert config["batch"]["pack"] and config["train"]["accum"] == 2 and config["steps"] == 3
  records = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert {"loss", "sample_ids", "sample_nll", "sample_tokens"} <= set(records[0])
  assert "heldout_loss" in records[1]

  assert cli.main([*args, "--steps", "5", "--resume"]) == 0
  records = [json.loads(line) for line in open(run / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert json.loads((run / "config.json").read_text())["batch"]["pack"]  # kept on resume

  table = tmp_path / "eval.csv"
  assert cli.main(["eval", "--run", str(run), "--out", str(table)]) == 0
  rows = list(csv.DictReader(open(table)))
  assert len(rows) == 50
  assert {r["split"] for r in rows} == {"train", "heldout"}
  means = [float(r["nll_mean"]) for r in rows]
  assert means == sorted(means, reverse=True) and means[0] > 0  # hardest first
  row = rows[0]
  assert float(row["nll_sum"]) == pytest.approx(float(row["nll_mean"]) * int(row["target_tokens"]))


def test_malformed_data_is_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
  code = cli.main(["train", "--data", str(bad), "--out", str(tmp_path / "r"), *TINY])
  assert code == 2
  assert "bad.jsonl:2: record has no 'response'" in capsys.readouterr().err


def test_resume_without_a_run_is_a_clear_error(tmp_path, capsys):
  code = cli.main(["train", "--out", str(tmp_path / "none"), "--resume", *TINY])
  assert code == 2
  assert "config.json" in capsys.readouterr().err


def test_bad_batch_shape_is_a_clear_error(tmp_path, data_file, capsys):
  args = ["train", "--data", data_file, "--out", str(tmp_path / "r"), *TINY, "--accum", "3"]
  assert cli.main(args) == 2
  assert "divisible by accum (3)" in capsys.readouterr().err


@pytest.mark.parametrize("blocked", ["flax", "optax"])
def test_train_without_the_extra_says_in_one_line_what_to_install(blocked):
  # A fresh interpreter where the application's dependency cannot be imported.
  code = (
    f"import sys; sys.modules[{blocked!r}] = None; from jaxnll import cli; "
    "sys.exit(cli.main(['train', '--steps', '1', '--out', 'unused']))"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
  r = subprocess.run(
    [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
  )
  assert r.returncode == 2, r.stderr
  assert r.stdout == ""
  assert r.stderr.strip().splitlines() == [
    f"jaxnll train: needs {blocked}; install it with: pip install 'jaxnll[train]'"
  ]
  assert not (root / "unused").exists()
