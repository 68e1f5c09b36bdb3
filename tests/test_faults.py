"""Fault injection for the run loop (jaxnll/train/loop.py): a run stopped at any moment resumes
to exactly the records of a run that never stopped.

An interrupt is injected as each step enters each :class:`~jaxnll.train.loop.Phase`: as a real
SIGTERM to this process (the handler only asks the loop to stop), and as an exception raised
right there (a crash, or a second Ctrl-C). Then: the latest checkpoint holds as many optimizer
updates as its step label says, ``metrics.jsonl`` holds steps ``1 .. label`` exactly once, and
``--resume`` gives records equal, bit for bit, to the uninterrupted run's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest
from flax import nnx

from jaxnll import parallel, train
from jaxnll.train import data as data_lib
from jaxnll.train import metrics as metrics_lib
from jaxnll.train import run as run_lib
from jaxnll.train.loop import Phase
from jaxnll.train.model import ModelConfig

TINY = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32)
QUIET = dict(progress=False, log=lambda s: None)
STEPS = 6  # the first epoch ends at step 5: an interrupt at step 3 splits it
TIMING = ("tokens_per_s",)  # the only record field that may differ between runs


@pytest.fixture(scope="module")
def one_device():
  return parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "small.jsonl"
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::25], path)  # 126 train, 14 held out
  return train.RunConfig(
    model=TINY,
    train=train.TrainConfig(learning_rate=1e-2, warmup_steps=2),
    batch=data_lib.BatchSpec(rows=16, pack=True),
    steps=STEPS,
    data=str(path),
    eval_every=0,
    checkpoint_every=2,
    table_rows=0,
  )


@pytest.fixture(scope="module")
def reference(config, one_device, tmp_path_factory):
  """The records of the run that never stops."""
  out = tmp_path_factory.mktemp("reference")
  train.fit(config, str(out), mesh=one_device, **QUIET)
  records = _records(out)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert [r["epoch"] for r in records] == [0, 0, 0, 0, 0, 1] and "epoch_loss" in records[4]
  return records


def _records(out):
  return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _checkpoint(config, out):
  """``(step label, optimizer updates held)`` of the latest checkpoint in ``out``."""
  _, abstract = nnx.split(run_lib.build_trainer(config))
  step, state = run_lib.restore_state(os.path.join(out, "checkpoints"), abstract)
  return step, int(state["optimizer"]["step"][...])


def _assert_resumes_exactly(config, out, reference, mesh):
  label, updates = _checkpoint(config, out)
  assert updates == label  # the label counts the updates the state holds
  assert [r["step"] for r in _records(out)] == list(range(1, label + 1))
  train.fit(config, str(out), resume=True, mesh=mesh, **QUIET)
  records = _records(out)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each exactly once
  assert _without_timing(records) == _without_timing(reference)  # losses bit for bit
  return label


@pytest.mark.parametrize("phase", list(Phase), ids=[p.value for p in Phase])
def test_sigterm_at_any_phase_stops_after_that_step(phase, config, reference, one_device, tmp_path):
  def fault(p, step):
    if p is phase and step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler only asks the loop to stop

  summary = train.fit(config, str(tmp_path), mesh=one_device, _fault=fault, **QUIET)
  assert summary["interrupted"] == "SIGTERM" and summary["steps"] == 3
  assert "heldout_nll_end" not in summary
  assert json.load(open(tmp_path / "summary.json"))["interrupted"] == "SIGTERM"
  assert _assert_resumes_exactly(config, tmp_path, reference, one_device) == 3


#: Where the run ends when an exception is raised as step 3 enters each phase: before the
#: dispatch the committed state (step 2) is intact; once the step is dispatched it has donated
#: that state, so the run ends at its last checkpoint (step 2); once step 3 is committed, at 3.
EXCEPTION_ENDS = {Phase.DISPATCH: 2, Phase.FETCH: 2, Phase.RECORD: 2, Phase.CHECKPOINT: 3}


@pytest.mark.parametrize("phase", list(Phase), ids=[p.value for p in Phase])
def test_exception_at_any_phase_leaves_a_consistent_checkpoint(
  phase, config, reference, one_device, tmp_path
):
  def fault(p, step):
    if p is phase and step == 3:
      raise KeyboardInterrupt  # what a second Ctrl-C raises, anywhere

  with pytest.raises(KeyboardInterrupt):
    train.fit(config, str(tmp_path), mesh=one_device, _fault=fault, **QUIET)
  label = _assert_resumes_exactly(config, tmp_path, reference, one_device)
  assert label == EXCEPTION_ENDS[phase]


def test_truncated_last_record_is_repaired_on_resume(config, reference, one_device, tmp_path):
  """SIGKILL in the middle of a write leaves part of a line; resume drops it."""
  train.fit(config, str(tmp_path), mesh=one_device, stop_after=4, **QUIET)
  path = tmp_path / "metrics.jsonl"
  whole = path.read_text()
  with open(path, "a") as f:
    f.write(json.dumps(reference[4])[:57])  # step 5's record, cut
  assert path.read_text() != whole
  assert [r["step"] for r in metrics_lib.read_records(str(path))] == [1, 2, 3, 4]
  train.fit(config, str(tmp_path), resume=True, mesh=one_device, **QUIET)
  assert _without_timing(_records(tmp_path)) == _without_timing(reference)


def test_epoch_loss_across_a_resume_is_exact(config, reference, one_device, tmp_path):
  train.fit(config, str(tmp_path), mesh=one_device, stop_after=2, **QUIET)
  train.fit(config, str(tmp_path), resume=True, mesh=one_device, **QUIET)
  (resumed,) = [r["epoch_loss"] for r in _records(tmp_path) if "epoch_loss" in r]
  (uninterrupted,) = [r["epoch_loss"] for r in reference if "epoch_loss" in r]
  assert resumed == uninterrupted  # exact, not rebuilt from rounded per-sample values
  # The exact running totals (not the rounded per-sample NLLs) are what the aggregate
  # restarts from; they read back bit for bit.
  last = reference[1]
  agg = metrics_lib.EpochAggregate()
  agg.restore(reference[:2], 0)
  assert (agg.sum, agg.count) == (last["epoch_sum"], last["epoch_count"])


def test_an_unfinished_orbax_checkpoint_is_never_read(config, one_device, tmp_path):
  """Orbax writes a step into a temporary folder and renames it when complete (atomic)."""
  train.fit(config, str(tmp_path), mesh=one_device, stop_after=3, **QUIET)
  ckpt = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", "3"]
  unfinished = ckpt / "5.orbax-checkpoint-tmp-1234567"  # what a kill during a save leaves
  shutil.copytree(ckpt / "3", unfinished)
  (unfinished / "garbage").write_text("half written")
  assert _checkpoint(config, tmp_path) == (3, 3)


def test_real_sigterm_and_sigint_to_jaxnll_train(config, tmp_path):
  """Both signals to a real ``jaxnll train`` process: exit 143 / 130, then resume exactly.

  Numerics depend on the process's device set-up, so the uninterrupted run and the resumes run
  in one more process of the same set-up (one device), through ``cli.main``.
  """
  steps = 60
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # One compilation cache for the three processes: the last one compiles nothing.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  args = ["train", "--data", config.data, "--d-model", "16", "--layers", "1"]
  args += ["--batch-size", "16", "--pack", "--no-progress", "--steps", str(steps)]
  args += ["--eval-every", "0", "--table-rows", "0", "--lr", "0.01"]
  runs = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    out = tmp_path / sig.name
    runs[sig] = (
      out,
      subprocess.Popen(
        [sys.executable, "-m", "jaxnll.cli", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
      ),
    )
  deadline = time.monotonic() + 240  # start-up and compilation: ~20 s idle, more when loaded
  pending = dict(runs)
  while pending and time.monotonic() < deadline:
    for sig, (out, proc) in list(pending.items()):
      path = out / "metrics.jsonl"
      if path.exists() and path.read_text().count("\n") >= 1:
        proc.send_signal(sig)
        del pending[sig]
    time.sleep(0.01)
  codes = {}
  for sig, (_, proc) in runs.items():
    if sig in pending:
      proc.kill()
    _, err = proc.communicate(timeout=120)
    codes[sig] = proc.returncode, err.decode()[-2000:]
  assert not pending, f"no records within the deadline: {codes}"
  assert codes[signal.SIGTERM][0] == 143, codes[signal.SIGTERM]
  assert codes[signal.SIGINT][0] == 130, codes[signal.SIGINT]
  config = run_lib.read_config(str(runs[signal.SIGTERM][0] / "config.json"))
  for sig, (out, _) in runs.items():
    summary = json.load(open(out / "summary.json"))
    assert summary["interrupted"] == sig.name
    label, updates = _checkpoint(config, out)
    assert label == updates == summary["steps"] < steps
    assert [r["step"] for r in _records(out)] == list(range(1, label + 1))
  ref = tmp_path / "reference"
  script = (
    "import sys; from jaxnll import cli; a = sys.argv[1:]; "
    f"assert cli.main([*a, '--out', {str(ref)!r}]) == 0; "
    + "; ".join(
      f"assert cli.main([*a, '--resume', '--out', {str(out)!r}]) == 0" for out, _ in runs.values()
    )
  )
  done = subprocess.run(
    [sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=300
  )
  assert done.returncode == 0, done.stderr.decode()[-2000:]
  for sig, (out, _) in runs.items():
    assert [r["step"] for r in _records(out)] == list(range(1, steps + 1))
    assert _without_timing(_records(out)) == _without_timing(_records(ref)), sig.name
