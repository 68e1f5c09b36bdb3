"""Tests for jaxnll/train/run.py: the run directory (what may be written where), atomic files,
config.json read back strictly, and the learning-rate schedule of an extended run."""

import json
import os

import jax
import pytest

from jaxnll import parallel, train
from jaxnll.train import data as data_lib
from jaxnll.train import metrics as metrics_lib
from jaxnll.train import run as run_lib
from jaxnll.train.model import ModelConfig

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def one_device():
  return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "small.jsonl"
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::25], path)
  return train.RunConfig(
    model=ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32),
    train=train.TrainConfig(learning_rate=1e-2, warmup_steps=1),
    batch=data_lib.BatchSpec(rows=16, pack=True),
    steps=4,
    data=str(path),
    eval_every=0,
    checkpoint_every=0,
    table_rows=0,
  )


def test_overwrite_removes_only_the_runs_own_files(config, one_device, tmp_path):
  train.fit(config, str(tmp_path), stop_after=2, mesh=one_device, **QUIET)
  (tmp_path / "notes.txt").write_text("mine")
  (tmp_path / "extra").mkdir()
  with pytest.raises(run_lib.RunDirError, match="--resume .* or --overwrite"):
    train.fit(config, str(tmp_path), mesh=one_device, **QUIET)
  assert len(metrics_lib.read_records(str(tmp_path / "metrics.jsonl"))) == 2  # untouched
  train.fit(config, str(tmp_path), overwrite=True, mesh=one_device, **QUIET)
  assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "extra").is_dir()
  assert [r["step"] for r in metrics_lib.read_records(str(tmp_path / "metrics.jsonl"))] == [
    1,
    2,
    3,
    4,
  ]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_a_directory_that_is_not_a_run_is_refused_untouched(config, tmp_path):
  (tmp_path / "data.csv").write_text("a,b\n")
  for overwrite in (False, True):
    with pytest.raises(run_lib.RunDirError, match="not a jaxnll run"):
      train.fit(config, str(tmp_path), overwrite=overwrite, **QUIET)
  assert os.listdir(tmp_path) == ["data.csv"]
  with pytest.raises(run_lib.RunDirError, match="is a file"):
    train.fit(config, str(tmp_path / "data.csv"), **QUIET)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
  path = str(tmp_path / "summary.json")
  metrics_lib.write_json(path, {"steps": 1})

  def killed(src, dst):
    raise KeyboardInterrupt  # stopped between writing the temporary file and the rename

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    metrics_lib.write_json(path, {"steps": 2})
  assert json.load(open(path)) == {"steps": 1}
  assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind


def test_config_round_trip_and_strict_reading(tmp_path):
  config = train.RunConfig(steps=7, schedule_steps=5)
  path = str(tmp_path / "config.json")
  run_lib.write_config(path, config)
  assert run_lib.read_config(path) == config
  d = config.to_dict()
  d["batch"]["rowz"] = 3
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(run_lib.ConfigError, match=r"unknown key\(s\) \['rowz'\] in 'batch'"):
    run_lib.read_config(path)
  d = config.to_dict()
  d["steps"] = -1
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(run_lib.ConfigError, match="steps must be an int >= 1, got -1"):
    run_lib.read_config(path)


@pytest.mark.parametrize(
  "field, value",
  [("steps", 0), ("seed", -1), ("eval_every", -1), ("table_rows", -2), ("schedule_steps", 0)],
)
def test_run_config_refuses_values_outside_their_domain(field, value):
  with pytest.raises(ValueError, match=field):
    train.RunConfig(**{field: value})


def test_extending_a_run_keeps_its_schedule(config, one_device, tmp_path):
  """``--resume --steps 6`` on a 4-step run: the schedule stays 4 steps long, so steps 5 and 6
  run at the final learning rate; steps 1-4 are those of the 4-step run."""
  train.fit(config, str(tmp_path), mesh=one_device, **QUIET)
  four = metrics_lib.read_records(str(tmp_path / "metrics.jsonl"))
  longer = dict(config.__dict__, steps=6)
  train.fit(train.RunConfig(**longer), str(tmp_path), resume=True, mesh=one_device, **QUIET)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["steps"] == 6 and saved["schedule_steps"] == 4
  records = metrics_lib.read_records(str(tmp_path / "metrics.jsonl"))
  assert records[:4] == four
  final = float(train.make_schedule(config.train, 4)(4))
  assert final == pytest.approx(config.train.learning_rate * config.train.end_lr_fraction)
  assert [r["lr"] for r in records[4:]] == [final, final]
  assert records[3]["lr"] > final  # the original last step was still decaying


@pytest.mark.parametrize(
  "config_json",
  [
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16},
    {},  # reads back as the default RunConfig: still not what a run writes
    {"model": {"kind": "transformer"}, "steps": 3},
    [1, 2],
  ],
  ids=["hugging-face", "empty", "partial", "list"],
)
def test_overwrite_refuses_a_folder_that_merely_holds_a_config_json(config, config_json, tmp_path):
  """A model folder (a Hugging Face one, say) has a config.json but is not a jaxnll run:
  refused with and without --overwrite, nothing touched."""
  (tmp_path / "config.json").write_text(json.dumps(config_json))
  (tmp_path / "model.safetensors").write_bytes(b"weights")
  for overwrite in (False, True):
    with pytest.raises(run_lib.RunDirError, match="is not a jaxnll run .*config.json") as e:
      train.fit(config, str(tmp_path), overwrite=overwrite, **QUIET)
    assert "holds a jaxnll run" not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  assert json.loads((tmp_path / "config.json").read_text()) == config_json


def test_resume_refuses_a_config_that_differs_from_the_saved_one(config, one_device, tmp_path):
  """The library's ``fit(resume=True)``: a field other than the run's length and reporting
  that differs from config.json is refused, naming it, before anything is written."""
  train.fit(config, str(tmp_path), stop_after=1, mesh=one_device, **QUIET)
  saved = (tmp_path / "config.json").read_text()
  other = train.RunConfig(**dict(config.__dict__, seed=5))
  with pytest.raises(run_lib.RunDirError, match="--resume: seed is 5 but the run in"):
    train.fit(other, str(tmp_path), resume=True, mesh=one_device, **QUIET)
  wider = train.RunConfig(**dict(config.__dict__, model=ModelConfig(d_model=32)))
  with pytest.raises(run_lib.RunDirError, match="--resume: model.d_model is 32"):
    train.fit(wider, str(tmp_path), resume=True, mesh=one_device, **QUIET)
  assert (tmp_path / "config.json").read_text() == saved
