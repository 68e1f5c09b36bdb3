"""The run loop behind ``jaxnll train`` and ``jaxnll eval``.

:func:`fit` trains a :class:`~jaxnll.train.run.RunConfig` into a run directory: the step of
:mod:`jaxnll.train.step` on the objective of the task it is given (by a training mode of
:mod:`jaxnll.train.modes`, which this module does not import; plain fine-tuning by default),
checkpoints,
``metrics.jsonl``, plots, held-out evaluation and greedy samples; on any ``data`` × ``model``
mesh and over several processes (:mod:`jaxnll.train.runtime`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnll import parallel
from jaxnll.train import data as data_lib
from jaxnll.train import generate, runtime
from jaxnll.train import metrics as metrics_lib
from jaxnll.train import run as run_lib
from jaxnll.train.model import count_params
from jaxnll.train.objectives import Task, TaskBuilder
from jaxnll.train.run import RunConfig, build_trainer, checkpointer, load_examples, restore_state
from jaxnll.train.step import eval_step, make_schedule, micro_batches, train_step_fn


class Supervised:
  """The task builder of plain fine-tuning (``config.train``'s objective on ``config.data``):
  :func:`fit`'s default; the training modes of :mod:`jaxnll.train.modes` are the others."""

  def examples(self, config: RunConfig):
    return load_examples(config.data)

  def task(self, config: RunConfig, train_examples, out_dir: str, *, log=print) -> Task:
    del train_examples, out_dir, log
    return Task(config.train.objective())


def _on_mesh(mesh: Mesh | None):
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def evaluate(model, samples, spec: data_lib.BatchSpec, *, fused: bool = False, mesh=None):
  """Per-sample target NLL sums and token counts (float64 ``[N]``) over ``samples``.

  With a ``mesh`` (the model sharded on it, see :func:`fit`) each batch is split over its
  ``data`` axis and every process gets the full result.
  """
  sums = np.zeros(len(samples))
  counts = np.zeros(len(samples))
  for batch in data_lib.eval_batches(samples, spec):
    placed = batch if mesh is None else runtime.global_batch(batch, mesh, P("data"), axis=0)
    with _on_mesh(mesh):
      s, c = runtime.fetch(eval_step(model, placed, fused=fused))
    ids = batch["sample_ids"]
    sums[ids[ids >= 0]] = s[ids >= 0]
    counts[ids[ids >= 0]] = c[ids >= 0]
  return sums, counts


def greedy_responses(model, examples, *, length: int, max_new: int = 48, mesh=None) -> list[str]:
  """The model's greedy answer to each example's prompt (decoding stops at ``EOS``)."""
  prompts = [data_lib.encode_prompt(ex)[-length:] for ex in examples]
  tokens, lengths = generate.prompt_rows(prompts, length)
  if mesh is not None:
    tokens, lengths = runtime.place((tokens, lengths), (NamedSharding(mesh, P()),) * 2)
  with _on_mesh(mesh):
    out, end = runtime.fetch(generate.greedy(model, tokens, lengths, max_new=max_new))
  return [
    data_lib.decode(generate.answer_ids(out[r], len(p), end[r])) for r, p in enumerate(prompts)
  ]


def _heldout_line(sums, counts) -> float:
  return float(sums.sum() / max(counts.sum(), 1.0))


class Phase(enum.Enum):
  """The parts of one step of :func:`fit`, in order (where its ``_fault`` hook is called).

  ``DISPATCH``: the host batch is prepared and the step dispatched (the state's buffers are
  donated to it); ``FETCH``: its metrics come to the host; ``RECORD``: the step record is
  built and appended to ``metrics.jsonl``, then the new state, its step number and its record
  are committed together; ``CHECKPOINT``: the periodic checkpoint of the committed state.
  """

  DISPATCH = "dispatch"
  FETCH = "fetch"
  RECORD = "record"
  CHECKPOINT = "checkpoint"


#: ``fault(phase, step)``: called as ``step`` (1-based) enters ``phase`` (tests inject faults).
Fault = Callable[[Phase, int], None]


@dataclasses.dataclass
class _Run:
  """What the phases of :func:`fit` share: configuration, files, data, task, mesh, state."""

  config: RunConfig
  out_dir: str
  log: Callable[[str], None]
  primary: bool
  mesh: Mesh
  heldout_examples: list
  train_samples: list
  heldout_samples: list
  task: Task
  graphdef: Any = None
  shardings: Any = None

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.out_dir, "metrics.jsonl")

  @property
  def ckpt_dir(self) -> str:
    return os.path.join(self.out_dir, "checkpoints")

  def heldout(self, state):
    model = nnx.merge(self.graphdef, state).model
    fused = self.config.train.fused
    return evaluate(model, self.heldout_samples, self.config.batch, fused=fused, mesh=self.mesh)


@dataclasses.dataclass
class _Committed:
  """The run's committed point: a state, the number of updates it holds, and whether its
  buffers are still alive (a dispatched step donates them until it is committed)."""

  state: Any
  step: int
  live: bool = True


def fit(
  config: RunConfig,
  out_dir: str,
  *,
  resume: bool = False,
  overwrite: bool = False,
  stop_after: int | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
  mesh: str | Mesh | None = None,
  task: TaskBuilder | None = None,
  run_files: Sequence[str] = run_lib.RUN_FILES,
  _fault: Fault | None = None,
) -> dict[str, Any]:
  """Trains ``config`` into ``out_dir`` (the loop behind ``jaxnll train``).

  ``task`` builds what is trained (:class:`~jaxnll.train.objectives.TaskBuilder`: the run's
  examples and its :class:`~jaxnll.train.objectives.Task`; default :class:`Supervised`, plain
  fine-tuning); a configuration of another training mode needs its mode
  (:func:`jaxnll.train.modes.fit` passes it).  ``run_files``: what ``overwrite`` removes.

  Writes ``config.json``, ``metrics.jsonl`` (one record per step), ``loss.png``,
  ``checkpoints/`` (every ``checkpoint_every`` steps and always on exit) and ``summary.json``.
  ``out_dir`` must be new, empty, or a run: with ``resume`` it continues from the latest
  checkpoint (the newest the records cover) with the saved configuration: ``config`` may
  only change :data:`~jaxnll.train.run.RESUME_CHANGEABLE` (``steps``, not below the steps
  done; the learning-rate schedule stays the saved ``schedule_steps`` long, see
  :class:`RunConfig`), any other difference is refused (:func:`~jaxnll.train.run.resumed_config`);
  with ``overwrite`` the run's own files are replaced; anything else is refused before any
  work (:func:`jaxnll.train.run.check_run_dir`).

  SIGINT (Ctrl-C) and SIGTERM stop the run after the step in flight: its record is written,
  a checkpoint of exactly that step is saved (a second signal waits for it, a third abandons
  it: :class:`~jaxnll.train.runtime.StopRequest`), and a later ``resume`` gives the same records
  (losses bit for bit, epoch aggregates included) as a run that never stopped. The summary
  then says ``"interrupted": "SIGTERM"`` and has no end-of-run evaluation. ``stop_after``
  ends the run after that many steps in total (as an interruption would, but with the final
  evaluation), without changing the schedule.

  ``mesh`` (``"data=4,model=2"``, a :class:`jax.sharding.Mesh`, or None: every device on
  ``data``) is where the run lives: parameters and optimizer state are sharded by their Flax
  partitioning metadata (:func:`jaxnll.runtime.annotate_partitioning`: FSDP over ``data``,
  the head split along the vocabulary over ``model``, where the fused loss then runs
  vocabulary-parallel), batches split along ``data``; losses equal the single-device run's.
  The mesh is not part of the saved configuration: a run resumes on any device count.  With
  several processes (:func:`jaxnll.train.runtime.initialize` first) every process runs ``fit``,
  feeds its slice of each global batch, and only process 0 writes files.

  Returns:
    The summary: steps, wall time, held-out target NLL (nats per target token) at the start
    and end of this invocation, skipped steps, parameter count, and the sample table rows.
  """
  t_start = time.perf_counter()
  fault = _fault or (lambda phase, step: None)
  with runtime.StopRequest() as stop:
    if task is None:
      if config.distill or config.preference or config.policy:
        raise ValueError(
          "fit: this configuration is a training mode's (distill / preference / policy); "
          "train it with jaxnll.train.modes.fit, which passes the mode's task"
        )
      task = Supervised()
    run = _set_up(
      config, out_dir, task, resume=resume, overwrite=overwrite, mesh=mesh, log=log,
      run_files=run_files,
    )  # fmt: skip
    start, state, records = _initial_state(run, resume=resume)
    h_sums, h_counts = run.heldout(state)
    before = {"heldout_nll": _heldout_line(h_sums, h_counts)}
    run.log(f"held-out target NLL at step {start}: {before['heldout_nll']:.4f} nats/token")
    for name, value in run.task.report(nnx.merge(run.graphdef, state).model).items():
      run.log(f"held-out {name} at step {start}: {value:.4f}")
      before[name] = value
    end = run.config.steps if stop_after is None else min(stop_after, run.config.steps)
    bar = _progress_bar(run, start) if progress and run.primary else None
    try:
      done = _step_loop(run, state, start, records, end=end, stop=stop, fault=fault, bar=bar)
    finally:
      if bar is not None:
        bar.close()
    try:
      return _finish(run, done, records, before, stop=stop, seconds=time.perf_counter() - t_start)
    except KeyboardInterrupt as e:  # a third signal while finishing: the checkpoint is saved
      if str(e):
        raise
      raise KeyboardInterrupt(_ends_at(run, "stopped at once")) from None


def _set_up(config, out_dir, builder, *, resume, overwrite, mesh, log, run_files) -> _Run:
  """Checks the run directory, the mesh and the data (before any model is built), writes
  ``config.json``, then builds the task; every input mistake is a one-line ``ValueError``."""
  primary = runtime.is_primary()
  if not primary:
    log = lambda _: None  # noqa: E731
  saved = run_lib.check_run_dir(out_dir, resume=resume, overwrite=overwrite)
  if saved is not None:
    config_path = os.path.join(out_dir, "config.json")
    config = run_lib.resumed_config(saved, config, where=config_path)
    config = dataclasses.replace(config, schedule_steps=saved.total_schedule_steps)
    records = metrics_lib.read_records(os.path.join(out_dir, "metrics.jsonl"))
    done = records[-1]["step"] if records else 0
    if config.steps < done:
      raise run_lib.RunDirError(
        f"--steps {config.steps} is below the {done} steps the run in {out_dir} has done; a "
        f"resume cannot shorten a run (leave --steps out to continue to its {saved.steps})"
      )
    for name in run_lib.RESUME_CHANGEABLE:
      if getattr(config, name) != getattr(saved, name):
        log(f"jaxnll: --resume: {name} {getattr(saved, name)} -> {getattr(config, name)}")
  else:
    config = dataclasses.replace(config, schedule_steps=config.total_schedule_steps)
  mesh = mesh if isinstance(mesh, Mesh) else parallel.make_mesh(mesh)
  spec = config.batch
  data_lib.check_rows(spec, accum=config.train.accum, devices=parallel.axis_size(mesh, "data"))
  train_examples, heldout_examples = builder.examples(config)
  train_examples = data_lib.drop_long(train_examples, spec.length)
  heldout_examples = data_lib.drop_long(heldout_examples, spec.length)
  where = config.data or "the embedded data set"
  for name, examples in (("training", train_examples), ("held-out", heldout_examples)):
    if not examples:
      raise data_lib.DataError(f"{where}: no {name} example fits in {spec.length} tokens")
  runtime.barrier("jaxnll-fit-directory-checked")
  if primary:
    if overwrite:
      run_lib.clear_run_files(out_dir, run_files)
    os.makedirs(out_dir, exist_ok=True)
  runtime.barrier("jaxnll-fit-directory-made")
  # The task checks its settings before config.json makes the directory a run: a refused
  # command leaves nothing that a corrected one would have to --overwrite.
  task = builder.task(config, train_examples, out_dir, log=log)
  if primary:
    run_lib.write_config(os.path.join(out_dir, "config.json"), config)
  runtime.barrier("jaxnll-fit-directory-ready")
  return _Run(
    config=config,
    out_dir=out_dir,
    log=log,
    primary=primary,
    mesh=mesh,
    heldout_examples=heldout_examples,
    train_samples=data_lib.encode_all(train_examples, spec.length),
    heldout_samples=data_lib.encode_all(heldout_examples, spec.length),
    task=task,
  )


def _initial_state(run: _Run, *, resume: bool):
  """The sharded state to start from, its step and the records kept: a new model, or the
  latest checkpoint and the records up to its step (``metrics.jsonl`` repaired)."""
  config, mesh = run.config, run.mesh
  at = _resume_step(run) if resume else 0  # None: the newest checkpoint
  trainer = build_trainer(config)
  if at == 0:
    run.task.initialize(trainer.model)  # a mode that starts from a trained run sets it here
  runtime.annotate_partitioning(trainer, mesh)
  run.graphdef, state = nnx.split(trainer)
  run.shardings = runtime.state_shardings(state, mesh)
  start, records = 0, []
  if resume:
    if at != 0:  # read straight into this run's layout, whatever mesh wrote the checkpoint
      start, state = restore_state(run.ckpt_dir, runtime.abstract(state, run.shardings), at)
    records = metrics_lib.repair_records(run.metrics_path, start, write=run.primary)
  elif run.primary and os.path.exists(run.metrics_path):
    os.remove(run.metrics_path)  # a run's own file, left by an earlier --overwrite'd run
  state = runtime.place(state, run.shardings)
  mesh_text = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
  spec = config.batch
  run.log(
    f"jaxnll: {config.model.kind} with {count_params(trainer.model):,} parameters, "
    f"{len(run.train_samples)} training / {len(run.heldout_samples)} held-out samples, "
    f"{mesh.size} device(s) (mesh {mesh_text}"
    + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
    + f"), loss={config.train.loss}"
    + (", packed" if spec.pack else "")
    + (f", accum={config.train.accum}" if config.train.accum > 1 else "")
    + (", fused" if config.train.fused else "")
  )
  return start, state, records


def _resume_step(run: _Run) -> int | None:
  """The checkpoint to resume from: the newest one, or, when ``metrics.jsonl`` ends before it
  (a power cut after the checkpoint was durable but before the last record was), the newest
  one the records cover (0: none does; the run starts again from its initial state), the
  newer ones then removed. None: the newest, which the records cover."""
  steps = run_lib.checkpoint_steps(run.ckpt_dir)
  records = metrics_lib.read_records(run.metrics_path)
  last = records[-1]["step"] if records else 0
  if not steps:
    raise run_lib.CheckpointError(
      f"{run.ckpt_dir}: no checkpoint to resume from; start again with --overwrite"
    )
  if steps[-1] <= last:
    return None
  covered = [s for s in steps if s <= last]
  at = covered[-1] if covered else 0
  run.log(
    f"jaxnll: metrics.jsonl ends at step {last}, before the newest checkpoint (step "
    f"{steps[-1]}; its last record was lost): resuming from "
    + (f"step {at}, the newest checkpoint the records cover" if at else "the start (step 0)")
  )
  runtime.barrier("jaxnll-fit-resume-step-chosen")
  if run.primary:
    for s in reversed(steps):
      if s > at:  # renamed first: a kill during the removal leaves no damaged step behind
        path = os.path.join(run.ckpt_dir, str(s))
        gone = os.path.join(run.ckpt_dir, f".{s}.removed")
        if os.path.lexists(gone):
          shutil.rmtree(gone)
        os.replace(path, gone)
        shutil.rmtree(gone)
  runtime.barrier("jaxnll-fit-newer-checkpoints-removed")
  return at


def _progress_bar(run: _Run, start: int):
  from tqdm.auto import tqdm

  return tqdm(total=run.config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


_STEPS: dict = {}


def _jitted_step(run: _Run):
  """The compiled step of ``run``, kept across :func:`fit` calls of the same model, optimizer,
  objective and layout (a resumed or repeated run in one process compiles once)."""
  config = run.config
  leaves, treedef = jax.tree.flatten(run.shardings)
  key = (
    config.model,
    config.train,
    config.total_schedule_steps,  # the optimizer's schedule lives in the graphdef
    run.task.objective,
    treedef,
    tuple(leaves),
    run.mesh,
  )
  if key not in _STEPS:
    if len(_STEPS) >= 8:
      _STEPS.pop(next(iter(_STEPS)))
    jitted = jax.jit(
      functools.partial(train_step_fn, run.graphdef, objective=run.task.objective),
      donate_argnums=0,
      out_shardings=(run.shardings, NamedSharding(run.mesh, P())),  # metrics on every process
    )
    mesh = run.mesh

    def step_fn(state, batch):
      with jax.set_mesh(mesh):
        return jitted(state, batch)

    _STEPS[key] = step_fn
  return _STEPS[key]


def _step_loop(run: _Run, state, start, records, *, end, stop, fault, bar) -> _Committed:
  """Steps from ``start`` to ``end`` or until ``stop``; checkpoints the committed state.

  A stop request is honoured only here, between steps, where state, step number and record
  agree; the final checkpoint is of the committed state (never of a state in flight), so a
  checkpoint's step label always counts the updates it holds.
  """
  import orbax.checkpoint as ocp

  config = run.config
  step_fn = _jitted_step(run)
  aggregate = metrics_lib.EpochAggregate()
  done = _Committed(state, start)
  manager = checkpointer(run.ckpt_dir, cleanup=True)
  stop.patient = True  # from here a second signal waits for the committed step's checkpoint
  interrupted = False
  try:
    for i, item in enumerate(
      run.task.stream(run.train_samples, config.batch, seed=config.seed, start_step=start)
    ):
      if i == 0:
        aggregate.restore(records, item.epoch)
      if done.step >= end or stop.requested():
        break
      _one_step(run, done, item, step_fn, aggregate, records, fault)
      if bar is not None:
        bar.set_postfix(
          loss=f"{records[-1]['loss']:.3f}", tok_s=f"{records[-1]['tokens_per_s']:,.0f}"
        )
        bar.update(1)
      fault(Phase.CHECKPOINT, done.step)
      if config.checkpoint_every and done.step % config.checkpoint_every == 0:
        manager.save(done.step, args=ocp.args.StandardSave(done.state))
  except KeyboardInterrupt:
    interrupted = True
    raise
  finally:
    _final_checkpoint(run, manager, done, stop, interrupted=interrupted)
  return done


def _final_checkpoint(run: _Run, manager, done: _Committed, stop, *, interrupted: bool) -> None:
  """Saves the committed state (unless saved already or a signal asked to quit at once) and
  waits for every save, in a helper thread: the main thread only waits, so that a signal
  cannot cut orbax's work in the middle. A third signal abandons the wait; the save in
  progress is then never finished or read back (orbax renames a checkpoint into place only
  when complete, and the next run removes what is left). ``interrupted``: the loop ended by a
  :class:`KeyboardInterrupt`, raised again saying which checkpoint the run ends at."""
  import orbax.checkpoint as ocp

  save = done.live and not stop.aborting and manager.latest_step() != done.step
  errors: list[BaseException] = []

  def work():
    try:
      if save:
        manager.save(done.step, args=ocp.args.StandardSave(done.state), force=True)
      manager.wait_until_finished()
      manager.close()
    except BaseException as e:  # handed to the main thread
      errors.append(e)

  helper = threading.Thread(target=work, name="jaxnll-checkpoint", daemon=True)
  try:
    helper.start()
    while helper.is_alive():
      helper.join(0.02)
  except KeyboardInterrupt:
    raise KeyboardInterrupt(_ends_at(run, f"the save of step {done.step} was abandoned")) from None
  if errors:
    raise errors[0]
  if interrupted:
    raise KeyboardInterrupt(_ends_at(run, "stopped at once"))


def _ends_at(run: _Run, what: str) -> str:
  """One line: ``what``, and the checkpoint the run ends at (the newest complete one)."""
  kept = run_lib.checkpoint_steps(run.ckpt_dir)
  if not kept:
    return f"{what}; the run has no complete checkpoint"
  return f"{what}; the run ends at its checkpoint of step {kept[-1]} (--resume --out {run.out_dir})"


def _one_step(run: _Run, done: _Committed, item, step_fn, aggregate, records, fault) -> None:
  """One step from ``done``: dispatch, fetch, record; then commits state, step and record."""
  config, step = run.config, done.step + 1
  fault(Phase.DISPATCH, step)
  t0 = time.perf_counter()
  # Each process feeds its slice of the global batch.
  host = run.task.prepare(item.batch, nnx.merge(run.graphdef, done.state).model, done.step)
  batch = runtime.global_batch(micro_batches(host, config.train.accum), run.mesh)
  done.live = False  # the step donates the committed state's buffers
  state, out = step_fn(done.state, batch)
  fault(Phase.FETCH, step)
  out = runtime.fetch(out)
  seconds = time.perf_counter() - t0
  fault(Phase.RECORD, step)
  ids = item.batch["sample_ids"]
  lr = make_schedule(config.train, config.total_schedule_steps)(step - 1)
  record = metrics_lib.step_record(
    step=step, epoch=item.epoch, out=out, sample_ids=ids, seconds=seconds, lr=float(lr),
    means=tuple(run.task.objective.means),
  )  # fmt: skip
  run.task.annotate(record, out, ids)
  aggregate.add(out["sample_sums"], out["sample_counts"], ids)
  record["epoch_sum"], record["epoch_count"] = aggregate.sum, aggregate.count
  if item.last_in_epoch:
    record["epoch_loss"] = aggregate.value()
    aggregate.reset()
  if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
    record["heldout_loss"] = _heldout_line(*run.heldout(state))
  if run.primary:
    metrics_lib.append_record(run.metrics_path, record)
  # The commit: the new state, its step number and its record, together.
  done.state, done.step, done.live = state, step, True
  records.append(record)


def _finish(run: _Run, done: _Committed, records, before, *, stop, seconds) -> dict[str, Any]:
  """The end of the run: held-out evaluation, sample table, plot and ``summary.json``."""
  if run.primary:
    metrics_lib.plot_losses(records, os.path.join(run.out_dir, "loss.png"))
    run.task.plot(records, run.out_dir)
  trainer = nnx.merge(run.graphdef, done.state)
  summary = {
    "steps": done.step,
    "seconds": round(seconds, 2),
    "heldout_nll_start": before["heldout_nll"],
    "skipped_steps": int(runtime.fetch(done.state["skipped"][...])),
    "params": count_params(trainer.model),
  }
  interrupted = stop.name if stop.requested() else None
  if interrupted:
    summary["interrupted"] = interrupted
    run.log(
      f"jaxnll: {interrupted}: stopped after step {done.step} with a checkpoint of it; "
      f"continue with --resume --out {run.out_dir}"
    )
  else:
    summary.update(_final_evaluation(run, trainer.model, before))
  if run.primary:
    metrics_lib.write_json(os.path.join(run.out_dir, "summary.json"), summary)
  return summary


def _final_evaluation(run: _Run, model, before) -> dict[str, Any]:
  """Held-out NLL, the task's figures and the greedy sample table at the end of a run."""
  config, spec = run.config, run.config.batch
  fused = config.train.fused
  h_sums, h_counts = evaluate(model, run.heldout_samples, spec, fused=fused, mesh=run.mesh)
  heldout_end = _heldout_line(h_sums, h_counts)
  report_end = run.task.report(model)
  rows = []
  if config.table_rows:
    examples = run.heldout_examples
    picks = _table_picks(examples, config.table_rows)
    outputs = greedy_responses(
      model, [examples[i] for i in picks], length=spec.length, mesh=run.mesh
    )
    for i, output in zip(picks, outputs, strict=True):
      ex = examples[i]
      rows.append(
        {
          "family": ex.family,
          "prompt": ex.prompt,
          "reference": ex.response,
          "greedy": output,
          "nll": float(h_sums[i]),
          "tokens": int(h_counts[i]),
        }
      )
    run.log(metrics_lib.format_table(rows))
  start = before["heldout_nll"]
  run.log(
    f"held-out target NLL: {start:.4f} -> {heldout_end:.4f} nats/token "
    f"(perplexity {metrics_lib.perplexity(heldout_end):.2f}); outputs in {run.out_dir}"
  )
  return {
    "heldout_nll_end": heldout_end,
    "heldout_ppl_end": metrics_lib.perplexity(heldout_end),
    "samples": rows,
    **{f"{name}_before": value for name, value in before.items() if name != "heldout_nll"},
    **{f"{name}_after": value for name, value in report_end.items()},
  }


def _table_picks(examples, n: int) -> list[int]:
  """Up to ``n`` held-out examples, one family after another (deterministic)."""
  by_family: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    by_family.setdefault(ex.family, []).append(i)
  picks, k = [], 0
  while len(picks) < min(n, len(examples)):
    for members in by_family.values():
      if k < len(members) and len(picks) < n:
        picks.append(members[k])
    k += 1
  return picks


def evaluate_run(run_dir: str, data: str | None = None) -> list[dict[str, Any]]:
  """Per-sample target NLL of a trained run on ``data`` (default: its own data, all splits).

  Returns:
    One dict per sample (``index``, ``split``, ``family``, ``nll_sum``, ``nll_mean``,
    ``target_tokens``, ``prompt``, ``reference``), hardest (highest ``nll_mean``) first.
  """
  config = run_lib.read_config(os.path.join(run_dir, "config.json"))
  trainer = build_trainer(config)
  graphdef, state = nnx.split(trainer)
  _, state = restore_state(os.path.join(run_dir, "checkpoints"), state)
  model = nnx.merge(graphdef, state).model
  if data is None:
    train, heldout = load_examples(config.data)
    examples = [(ex, "train") for ex in train] + [(ex, "heldout") for ex in heldout]
  else:
    examples = [(ex, "data") for ex in data_lib.load_jsonl(data)]
  spec = config.batch
  length = max(spec.length, max(len(data_lib.encode(ex)[0]) for ex, _ in examples))
  length = -(-length // 8) * 8
  samples = data_lib.encode_all([ex for ex, _ in examples], length)
  sums, counts = evaluate(model, samples, dataclasses.replace(spec, length=length))
  rows = [
    {
      "index": i,
      "split": split,
      "family": ex.family,
      "nll_sum": float(sums[i]),
      "nll_mean": float(sums[i] / counts[i]) if counts[i] else 0.0,
      "target_tokens": int(counts[i]),
      "prompt": ex.prompt,
      "reference": ex.response,
    }
    for i, (ex, split) in enumerate(examples)
  ]
  rows.sort(key=lambda r: (-r["nll_mean"], r["index"]))
  return rows
