"""Tests for jaxnll/cli.py: `jaxnll train` (outputs, resume), `jaxnll eval`, errors."""

import csv
import json
import os
import pathlib
import shutil
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


# ----------------------------------------------------------------------------- --resume


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_file):
  """A finished 3-step run (read-only for the tests below: they copy it to change it)."""
  run = tmp_path_factory.mktemp("finished") / "run"
  argv = ["train", "--data", data_file, "--out", str(run), *TINY, "--steps", "3"]
  assert cli.main([*argv, "--eval-every", "0", "--table-rows", "0"]) == 0
  return run


def _snapshot(run):
  return {
    name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl", "summary.json")
  }


#: ``--resume`` with a flag that differs from the saved run: refused, naming the flag.
RESUME_REFUSED = [
  (["--model", "lstm"], "--model lstm differs from the run's transformer"),
  (["--d-model", "32"], "--d-model 32 differs from the run's 16"),
  (["--layers", "2"], "--layers 2 differs from the run's 1"),
  (["--lr", "0.5"], "--lr 0.5 differs from the run's"),
  (["--batch-size", "8"], "--batch-size 8 differs from the run's 16"),
  (["--pack"], "--pack True differs from the run's False"),
  (["--fused"], "--fused True differs from the run's False"),
  (["--accum", "2"], "--accum 2 differs from the run's 1"),
  (["--seed", "3"], "--seed 3 differs from the run's 0"),
  (["--loss", "selective"], "--loss selective differs from the run's subsequence"),
  (["--context-gradient", "stop"], "--context-gradient stop differs from the run's flow"),
  (["--data", "{other}"], "--data {other} differs from the run's"),
  (["--teacher", "{run}"], "--teacher {run} differs from the run's unset"),
  (["--kd-weight", "0.3"], "--kd-weight 0.3 differs from the run's unset"),
  (["--beta", "0.2"], "--beta 0.2 differs from the run's unset"),
  (["--group-size", "4"], "--group-size 4 differs from the run's unset"),
  (["--steps", "2"], "--steps 2 is below the 3 steps the run in {run} has done"),
]


@pytest.mark.parametrize(
  "flags, fragment", RESUME_REFUSED, ids=[" ".join(f[0]) for f in RESUME_REFUSED]
)
def test_resume_refuses_a_flag_that_differs_from_the_saved_run(
  flags, fragment, finished, data_file, tmp_path, capsys, monkeypatch
):
  from jaxnll.train import loop

  def no_model(*a, **k):
    raise AssertionError("a model was built for a refused --resume")

  monkeypatch.setattr(loop, "build_trainer", no_model)
  other = tmp_path / "other.jsonl"
  other.write_text(pathlib.Path(data_file).read_text())
  names = {"run": str(finished), "other": str(other)}
  before = _snapshot(finished)
  argv = ["train", "--out", str(finished), "--resume", "--no-progress"]
  assert cli.main([*argv, *(f.format(**names) for f in flags)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  assert fragment.format(**names) in err, err
  assert _snapshot(finished) == before  # config.json, records, summary untouched


def test_resume_keeps_the_saved_run_and_applies_length_and_reporting(
  finished, data_file, tmp_path, capsys
):
  """``--resume`` alone finishes the saved run: its --steps, not the command line's default;
  flags equal to the saved values are accepted; --steps past it extends the run, and
  --eval-every / --table-rows apply (logged)."""
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  same = [
    "--data",
    data_file,
    *TINY,
    "--lr",
    str(json.load(open(run / "config.json"))["train"]["learning_rate"]),
  ]
  assert cli.main(["train", "--out", str(run), "--resume", *same]) == 0
  saved = json.loads((run / "config.json").read_text())
  assert saved["steps"] == 3 and saved["schedule_steps"] == 3  # not 400, the default
  assert [r["step"] for r in _records(run)] == [1, 2, 3]
  capsys.readouterr()
  argv = ["train", "--out", str(run), "--resume", "--no-progress", "--steps", "4"]
  assert cli.main([*argv, "--eval-every", "1"]) == 0
  out = capsys.readouterr().out
  assert "--resume: steps 3 -> 4" in out and "--resume: eval_every 0 -> 1" in out
  saved = json.loads((run / "config.json").read_text())
  assert (saved["steps"], saved["schedule_steps"], saved["eval_every"]) == (4, 3, 1)
  records = _records(run)
  assert [r["step"] for r in records] == [1, 2, 3, 4] and "heldout_loss" in records[3]


def test_resume_without_steps_continues_to_the_saved_steps(finished, tmp_path):
  """A run stopped at step 1 of 3, resumed without --steps, ends at step 3 (the saved
  --steps), not at the command line's default 400."""
  from jaxnll import train
  from jaxnll.train import run as run_lib

  run = tmp_path / "run"
  config = run_lib.read_config(str(finished / "config.json"))
  train.fit(config, str(run), stop_after=1, progress=False, log=lambda s: None)
  assert [r["step"] for r in _records(run)] == [1]
  assert cli.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
  assert [r["step"] for r in _records(run)] == [1, 2, 3]
  assert json.loads((run / "config.json").read_text())["steps"] == 3


def _records(run):
  return [json.loads(line) for line in open(run / "metrics.jsonl")]
