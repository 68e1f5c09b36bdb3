"""Fault injection for the run loop (jaxnll/train/loop.py): a run stopped at any moment resumes
to exactly the records of a run that never stopped.

An interrupt is injected as each step enters each :class:`~jaxnll.train.loop.Phase`: as a real
SIGTERM to this process (the handler only asks the loop to stop), and as an exception raised
right there (a crash, or a second Ctrl-C). Then: the latest checkpoint holds as many optimizer
updates as its step label says, ``metrics.jsonl`` holds steps ``1 .. label`` exactly once, and
``--resume`` gives records equal, bit for bit, to the uninterrupted run's.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest
from conftest import xla_flags
from flax import nnx

from jaxnll import cli, parallel, train
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


def _complete_steps(directory):
  """The steps of the complete checkpoints in ``directory`` (orbax renames one to its step
  number once complete; an unfinished one is ``<step>.orbax-checkpoint-tmp``)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


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
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
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


@pytest.mark.parametrize("checkpoint_every, stop, resumes_at", [(2, 4, 2), (0, 3, 0)])
def test_a_lost_last_record_resumes_from_the_newest_checkpoint_it_covers(
  checkpoint_every, stop, resumes_at, config, reference, one_device, tmp_path
):
  """Power-loss order: the checkpoint of the last step is durable, its record (the last line
  of metrics.jsonl) is cut. Resume falls back to the newest checkpoint the records cover (the
  start, step 0, where none does), says so in one line, and gives the reference records."""
  config = dataclasses.replace(config, checkpoint_every=checkpoint_every)
  train.fit(config, str(tmp_path), mesh=one_device, stop_after=stop, **QUIET)
  assert _complete_steps(str(tmp_path / "checkpoints"))[-1] == stop
  path = tmp_path / "metrics.jsonl"
  text = path.read_text()
  path.write_text(text[: text.rstrip("\n").rfind("\n") + 1 + 40])  # the last record, cut
  lines = []
  train.fit(config, str(tmp_path), resume=True, mesh=one_device, progress=False, log=lines.append)
  (said,) = [line for line in lines if "metrics.jsonl ends at step" in line]
  assert f"ends at step {stop - 1}, before the newest checkpoint (step {stop}" in said
  assert ("the start (step 0)" if resumes_at == 0 else f"step {resumes_at}, the newest") in said
  assert _without_timing(_records(tmp_path)) == _without_timing(reference)


def test_a_third_signal_abandons_the_final_save_atomically(
  config, reference, one_device, tmp_path, monkeypatch, capfd
):
  """A signal after step 3 stops the run; a second one while the checkpoint of step 3 is being
  written only says so; a third abandons that save (held up here, then never finished, as when
  the process exits): the run ends at its checkpoint of step 2, in one line, nothing unfinished
  is read back, and --resume continues from step 2 exactly."""
  from jaxnll.train import loop

  release = threading.Event()
  real = loop.checkpointer

  def held_checkpointer(directory, **kw):
    manager = real(directory, **kw)
    save = manager.save

    def held(step, *a, force=False, **k):
      if not force:
        return save(step, *a, **k)
      manager.wait_until_finished()  # the periodic checkpoint of step 2 is complete
      for _ in range(2):  # the second and third signal, while the final save runs
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)  # the main thread handles each (two pending ones would merge)
      release.wait(60)
      return None  # abandoned: never finished

    manager.save = held
    return manager

  monkeypatch.setattr(loop, "checkpointer", held_checkpointer)

  def fault(p, step):
    if p is Phase.CHECKPOINT and step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(KeyboardInterrupt) as e:
    train.fit(config, str(tmp_path), mesh=one_device, _fault=fault, **QUIET)
  release.set()
  for thread in threading.enumerate():
    if thread.name == "jaxnll-checkpoint":
      thread.join(60)
  assert str(e.value).startswith(
    "the save of step 3 was abandoned; the run ends at its checkpoint of step 2"
  )
  assert "SIGINT again: finishing the step in flight and saving" in capfd.readouterr().err
  assert _complete_steps(str(tmp_path / "checkpoints")) == [2]
  assert _checkpoint(config, tmp_path) == (2, 2)
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]  # step 3's record: dropped
  train.fit(config, str(tmp_path), resume=True, mesh=one_device, **QUIET)
  assert _without_timing(_records(tmp_path)) == _without_timing(reference)


def test_two_quick_signals_to_jaxnll_train_keep_the_committed_step(config, tmp_path):
  """Ctrl-C, then a second Ctrl-C (or SIGTERM) 0.01-0.15 s later, while the final checkpoint is
  written: that save finishes, no traceback, the checkpoint holds the step of the last
  record, nothing unfinished is left, and --resume continues from it. A third signal may
  abandon the save: then one line says which checkpoint the run ends at (here none: the
  default --checkpoint-every has not come) and nothing unfinished is read back."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  root = os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  args = ["train", "--data", config.data, "--d-model", "16", "--layers", "1"]
  args += ["--batch-size", "16", "--pack", "--no-progress", "--eval-every", "0"]
  args += ["--table-rows", "0", "--lr", "0.01"]
  later = {  # signals after the first SIGINT: (delay, signal) ...
    "int-0.01": [(0.01, signal.SIGINT)],
    "term-0.05": [(0.05, signal.SIGTERM)],
    "int-0.15": [(0.15, signal.SIGINT)],
    "three": [(0.02, signal.SIGINT), (0.02, signal.SIGINT)],
  }
  runs = {
    name: subprocess.Popen(
      [sys.executable, "-m", "jaxnll.cli", *args, "--out", str(tmp_path / name)],
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    for name in later
  }
  deadline = time.monotonic() + 240  # start-up and compilation
  pending = dict(later)
  while pending and time.monotonic() < deadline:
    for name in list(pending):
      path = tmp_path / name / "metrics.jsonl"
      if path.exists() and path.read_text().count("\n") >= 3:
        runs[name].send_signal(signal.SIGINT)
        for delay, sig in pending.pop(name):
          time.sleep(delay)
          runs[name].send_signal(sig)
    time.sleep(0.005)
  results = {}
  for name, proc in runs.items():
    if name in pending:
      proc.kill()
    _, err = proc.communicate(timeout=120)
    results[name] = proc.returncode, err.decode()
  assert not pending, f"no records within the deadline: {results}"
  for name, (code, err) in results.items():
    assert code == 130, (name, code, err)
    assert "Traceback" not in err and "Error" not in err, (name, err)
    out = tmp_path / name
    ckpt = out / "checkpoints"
    steps = _complete_steps(str(ckpt))
    records = _records(out)
    assert all(s <= len(records) for s in steps), (name, steps, len(records))
    if name == "three":  # the save finished, or one line names where the run ends
      last = err.strip().splitlines()[-1]
      ends = r"the run ends at its checkpoint of step \d+|the run has no complete checkpoint"
      assert steps == [len(records)] or re.match(rf"jaxnll train: interrupted: .*({ends})", last), (
        name,
        err,
      )
      continue
    assert steps == [len(records)], (name, steps, len(records), err)
    assert not [p for p in os.listdir(ckpt) if not p.isdigit()], (name, os.listdir(ckpt))
    assert json.load(open(out / "summary.json"))["steps"] == len(records)
  # --resume continues from the kept step (in this process: only the step numbers matter).
  for name in later:
    if name == "three":
      continue
    out = tmp_path / name
    kept = len(_records(out))
    argv = [*args, "--out", str(out), "--resume", "--steps", str(kept + 1)]
    assert cli.main(argv) == 0, name
    assert [r["step"] for r in _records(out)] == list(range(1, kept + 2)), name
