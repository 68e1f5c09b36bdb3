"""The run loop behind ``jaxnll train`` and ``jaxnll eval``.

:func:`fit` trains a :class:`~jaxnll.train.run.RunConfig` into a run directory: the step of
:mod:`jaxnll.train.step` on the objective the configuration selects, checkpoints,
``metrics.jsonl``, plots, held-out evaluation and greedy samples; on any ``data`` × ``model``
mesh and over several processes (:mod:`jaxnll.train.runtime`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnll import parallel
from jaxnll.train import data as data_lib
from jaxnll.train import generate, policy, runtime, teacher
from jaxnll.train import metrics as metrics_lib
from jaxnll.train.model import count_params
from jaxnll.train.objectives import Task
from jaxnll.train.run import RunConfig, build_trainer, checkpointer, load_examples, restore_state
from jaxnll.train.step import eval_step, make_schedule, micro_batches, train_step_fn

#: Task builders, tried in order: ``builder(run_config, train_examples, out_dir, log=...)``
#: returns the :class:`~jaxnll.train.objectives.Task` of a run it handles, else None; a run no
#: builder claims is supervised fine-tuning (``config.train``'s objective).
TASK_BUILDERS = [teacher.make_task, policy.make_task]


def make_task(config: RunConfig, train_examples, out_dir: str, *, log=print) -> Task:
  """The :class:`~jaxnll.train.objectives.Task` that ``config`` trains."""
  for build in TASK_BUILDERS:
    task = build(config, train_examples, out_dir, log=log)
    if task is not None:
      return task
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


def fit(
  config: RunConfig,
  out_dir: str,
  *,
  resume: bool = False,
  stop_after: int | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
  mesh: str | Mesh | None = None,
) -> dict[str, Any]:
  """Trains ``config`` into ``out_dir`` (the loop behind ``jaxnll train``).

  Writes ``config.json``, ``metrics.jsonl`` (one record per step), ``loss.png``,
  ``checkpoints/`` (every ``checkpoint_every`` steps and always on exit, Ctrl-C included)
  and ``summary.json``. With ``resume`` it continues from the latest checkpoint (keeping the
  saved configuration, except ``steps``) and the later losses equal those of a run that
  never stopped. ``stop_after`` ends the run early after that many steps in total (as an
  interruption would), without changing the schedule.

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
  primary = runtime.is_primary()
  if not primary:
    log, progress = (lambda _: None), False
  os.makedirs(out_dir, exist_ok=True)
  config_path = os.path.join(out_dir, "config.json")
  metrics_path = os.path.join(out_dir, "metrics.jsonl")
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if resume:
    with open(config_path) as f:
      saved = RunConfig.from_dict(json.load(f))
    config = dataclasses.replace(saved, steps=config.steps)
  runtime.barrier("jaxnll-fit-config-read")
  if primary:
    if not resume:
      for stale in (ckpt_dir, metrics_path):
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        elif os.path.exists(stale):
          os.remove(stale)
    with open(config_path, "w") as f:
      json.dump(config.to_dict(), f, indent=2)
  runtime.barrier("jaxnll-fit-directory-ready")

  train_examples, heldout_examples = load_examples(config.data)
  spec = config.batch
  train_examples = data_lib.drop_long(train_examples, spec.length)
  heldout_examples = data_lib.drop_long(heldout_examples, spec.length)
  train_samples = data_lib.encode_all(train_examples, spec.length)
  heldout_samples = data_lib.encode_all(heldout_examples, spec.length)
  task = make_task(config, train_examples, out_dir, log=log)

  mesh = mesh if isinstance(mesh, Mesh) else parallel.make_mesh(mesh)
  data_lib.check_rows(spec, accum=config.train.accum, devices=parallel.axis_size(mesh, "data"))
  trainer = build_trainer(config)
  runtime.annotate_partitioning(trainer, mesh)
  graphdef, state = nnx.split(trainer)
  shardings = runtime.state_shardings(state, mesh)
  start = 0
  if resume:
    # Read straight into this run's layout, whatever mesh wrote the checkpoint.
    start, state = restore_state(ckpt_dir, runtime.abstract(state, shardings))
    if primary:
      metrics_lib.truncate_records(metrics_path, start)
  state = runtime.place(state, shardings)
  mesh_text = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
  log(
    f"jaxnll: {config.model.kind} with {count_params(trainer.model):,} parameters, "
    f"{len(train_samples)} training / {len(heldout_samples)} held-out samples, "
    f"{mesh.size} device(s) (mesh {mesh_text}"
    + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
    + f"), loss={config.train.loss}"
    + (", packed" if spec.pack else "")
    + (f", accum={config.train.accum}" if config.train.accum > 1 else "")
    + (", fused" if config.train.fused else "")
  )

  fused = config.train.fused

  def heldout(state):
    model = nnx.merge(graphdef, state).model
    return evaluate(model, heldout_samples, spec, fused=fused, mesh=mesh)

  h_sums, h_counts = heldout(state)
  heldout_start = _heldout_line(h_sums, h_counts)
  log(f"held-out target NLL at step {start}: {heldout_start:.4f} nats/token")
  report_start = task.report(nnx.merge(graphdef, state).model)
  for name, value in report_start.items():
    log(f"held-out {name} at step {start}: {value:.4f}")

  jitted = jax.jit(
    functools.partial(
      train_step_fn,
      graphdef,
      objective=task.objective,
    ),
    donate_argnums=0,
    out_shardings=(shardings, NamedSharding(mesh, P())),  # metrics on every process
  )

  def step_fn(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  schedule = make_schedule(config.train, config.steps)
  aggregate = metrics_lib.EpochAggregate()
  records = metrics_lib.read_records(metrics_path) if resume else []
  stream = task.stream(train_samples, spec, seed=config.seed, start_step=start)
  end = config.steps if stop_after is None else min(stop_after, config.steps)
  step = start
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  manager = checkpointer(ckpt_dir)
  import orbax.checkpoint as ocp

  try:
    first = True
    for item in stream:
      if step >= end:
        break
      if first:
        aggregate.restore(records, item.epoch)
        first = False
      t0 = time.perf_counter()
      # Each process feeds its slice of the global batch.
      host = task.prepare(item.batch, nnx.merge(graphdef, state).model, step)
      batch = runtime.global_batch(micro_batches(host, config.train.accum), mesh)
      state, out = step_fn(state, batch)
      out = runtime.fetch(out)
      dt = time.perf_counter() - t0
      step += 1
      record = metrics_lib.step_record(
        step=step,
        epoch=item.epoch,
        out=out,
        sample_ids=item.batch["sample_ids"],
        seconds=dt,
        lr=float(schedule(step - 1)),
      )
      task.annotate(record, out, item.batch["sample_ids"])
      aggregate.add(out["sample_sums"], out["sample_counts"], item.batch["sample_ids"])
      if item.last_in_epoch:
        record["epoch_loss"] = aggregate.value()
        aggregate.reset()
      if config.eval_every and (step % config.eval_every == 0 or step == end):
        record["heldout_loss"] = _heldout_line(*heldout(state))
      if primary:
        metrics_lib.append_record(metrics_path, record)
      records.append(record)
      if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        bar.update(1)
      if config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
        manager.save(step, args=ocp.args.StandardSave(state))
  finally:
    if bar is not None:
      bar.close()
    if manager.latest_step() != step:
      manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()

  trainer = nnx.merge(graphdef, state)
  h_sums, h_counts = evaluate(trainer.model, heldout_samples, spec, fused=fused, mesh=mesh)
  heldout_end = _heldout_line(h_sums, h_counts)
  report_end = task.report(trainer.model)
  if primary:
    metrics_lib.plot_losses(records, os.path.join(out_dir, "loss.png"))
  rows = []
  if config.table_rows:
    picks = _table_picks(heldout_examples, config.table_rows)
    outputs = greedy_responses(
      trainer.model, [heldout_examples[i] for i in picks], length=spec.length, mesh=mesh
    )
    for i, output in zip(picks, outputs, strict=True):
      ex = heldout_examples[i]
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
    log(metrics_lib.format_table(rows))
  summary = {
    "steps": step,
    "seconds": round(time.perf_counter() - t_start, 2),
    "heldout_nll_start": heldout_start,
    "heldout_nll_end": heldout_end,
    "heldout_ppl_end": metrics_lib.perplexity(heldout_end),
    "skipped_steps": int(runtime.fetch(state["skipped"][...])),
    "params": count_params(trainer.model),
    "samples": rows,
    **{f"{name}_before": value for name, value in report_start.items()},
    **{f"{name}_after": value for name, value in report_end.items()},
  }
  if primary:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  log(
    f"held-out target NLL: {heldout_start:.4f} -> {heldout_end:.4f} nats/token "
    f"(perplexity {summary['heldout_ppl_end']:.2f}); {step} steps in {summary['seconds']:.0f} s; "
    f"outputs in {out_dir}"
  )
  return summary


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
  with open(os.path.join(run_dir, "config.json")) as f:
    config = RunConfig.from_dict(json.load(f))
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
