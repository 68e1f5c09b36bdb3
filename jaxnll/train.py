"""A Flax NNX train step for sub-sequence NLL fine-tuning, and the run loop behind ``jaxnll train``.

The step (:func:`train_step`, one ``nnx.jit``; its pure form :func:`train_step_fn` on
``(graphdef, state, batch)``) does, for a batch split into ``K`` micro-batches:

1. for each micro-batch, the gradient of the loss *numerator* — the summed NLL of the trained
   positions — and its *denominator*, the number of those positions (:func:`loss_fn`);
2. adds numerators, denominators and gradients over the micro-batches (and, through the
   sharded batch axis, over devices) and divides once:

   .. math::

      \\nabla L = \\frac{\\sum_k \\nabla N_k}{\\sum_k D_k}, \\qquad
      L = \\frac{\\sum_k N_k}{\\sum_k D_k},

   which is the full-batch global token mean whatever each micro-batch's token count (2
   target tokens at NLL 1 and 8 at NLL 3 give 2.6, not the 2.0 of averaging the averages);
3. skips the update — parameters and optimizer state unchanged, a counter incremented — when
   any gradient is not finite; otherwise applies AdamW with warm-up + cosine decay and global
   norm clipping (:func:`make_optimizer`).

Loss modes (``loss=``): ``"subsequence"`` trains ``-log Pr(y | x)`` over the target spans
(:func:`jaxnll.sequence_nll`, per sample via :func:`jaxnll.segment_nll`); ``"selective"``
builds :func:`jaxnll.selective_sequence_nll` (value over every token, gradient of the target
span; the full-sequence value is logged as ``full_loss``); ``"full"`` is the whole-sequence
language-model loss, the baseline. With ``fused=True`` the head and loss run through
:func:`jaxnll.fused.linear_nll_loss` on the model's hidden states (no ``[B, T, V]`` logits).

Batches are the fixed-shape dicts of :mod:`jaxnll.data` with a leading micro-batch axis
``[K, B/K, ...]`` (:func:`micro_batches`); on a :class:`jax.sharding.Mesh` the ``B/K`` axis
is split over devices (:func:`shard_batch`) and the state replicated (:func:`replicate`);
:func:`fit` runs on any ``data`` × ``model`` mesh and over several processes, the state
sharded by its Flax partitioning metadata (:mod:`jaxnll.parallel`).

:func:`fit` is the run loop of the command line: checkpoints, ``metrics.jsonl``, plots,
held-out evaluation and greedy samples.
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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnll import data as data_lib
from jaxnll import metrics as metrics_lib
from jaxnll import parallel
from jaxnll.distill_train import make_distiller
from jaxnll.model import ModelConfig, count_params, make_model
from jaxnll.nll import segment_nll, selective_sequence_nll, sequence_nll
from jaxnll.spans import shift_targets

F32 = jnp.float32
LOSS_MODES = ("subsequence", "selective", "full")
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loss mode and optimizer settings (JSON-friendly, hashable).

  Attributes:
    loss: ``"subsequence"``, ``"selective"`` or ``"full"`` (module docstring).
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warm-up from 0; then cosine decay to ``end_lr_fraction`` of the peak
      at the run's last step.
    weight_decay: AdamW decoupled weight decay (matrices only, not norms or biases).
    clip_norm: global gradient-norm clip.
    accum: micro-batches per step (gradient accumulation).
    fused: fused head + loss (:func:`jaxnll.fused.linear_nll_loss`); subsequence or full only.
  """

  loss: str = "subsequence"
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  accum: int = 1
  fused: bool = False

  def __post_init__(self):
    if self.loss not in LOSS_MODES:
      raise ValueError(f"loss must be one of {LOSS_MODES}, got {self.loss!r}")
    if self.fused and self.loss == "selective":
      raise ValueError("fused=True supports loss 'subsequence' or 'full', not 'selective'")
    if not isinstance(self.accum, int) or self.accum < 1:
      raise ValueError(f"accum must be a positive int, got {self.accum!r}")


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, cosine decay to ``end_lr_fraction`` at ``total_steps``."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    warmup,
    max(total_steps, warmup + 1),
    end_value=config.learning_rate * config.end_lr_fraction,
  )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the warm-up + cosine schedule."""
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(
      make_schedule(config, total_steps),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=_decay_mask,
    ),
  )


class SkipCount(nnx.Variable):
  """Number of steps skipped because a gradient was not finite."""


class Trainer(nnx.Module):
  """The training state: model, optimizer (over :class:`flax.nnx.Param`) and skip counter."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.skipped = SkipCount(jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- the loss


def segment_counts(mask: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mask weight per segment, ``f32[B, num_segments]`` (segment ``s`` in column ``s-1``)."""
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)
  return jnp.sum(jnp.where(onehot, mask[..., None].astype(F32), 0.0), axis=1)


def _fused_segment_sums(hidden, weight, targets, mask, segment_ids, num_segments):
  """Per-segment target NLL through the fused head (one segment at a time, no logits)."""

  def one(s):
    return parallel.head_sequence_nll(hidden, weight, targets, mask & (segment_ids == s))

  return jax.lax.map(one, jnp.arange(1, num_segments + 1)).T


def loss_fn(model: nnx.Module, batch: Batch, *, loss: str = "subsequence", fused: bool = False):
  """The loss numerator of one micro-batch and what the metrics need.

  Args:
    model: a :mod:`jaxnll.model` language model.
    batch: ``tokens``, ``span_mask``, ``segment_ids``, ``positions`` ``[B, T]`` and
      ``sample_ids`` ``[B, S]`` (only its shape is read here: ``S`` segments a row).
    loss: the loss mode; fused: use the fused head + loss.

  Returns:
    ``(numerator, aux)``: the summed NLL that is differentiated, and a dict of float32
    ``denominator`` (trained positions), ``target_sum``/``target_count`` (target spans),
    ``full_sum``/``valid_count`` (every position that predicts a token of its own sample;
    ``full_sum`` only in the selective and full modes), ``tokens`` (non-padding tokens), and
    ``sample_sums``/``sample_counts`` ``[B, S]``, the per-sample target NLL and token count.
  """
  tokens, span, seg = batch["tokens"], batch["span_mask"], batch["segment_ids"]
  num_segments = batch["sample_ids"].shape[-1]
  targets, target_mask = shift_targets(tokens, span, seg)
  _, valid_mask = shift_targets(tokens, seg > 0, seg)
  train_mask = valid_mask if loss == "full" else target_mask
  kwargs = dict(segment_ids=seg, positions=batch["positions"], span_mask=target_mask)
  aux = {}
  sg = jax.lax.stop_gradient
  if fused:
    hidden = model(tokens, return_hidden=True, **kwargs)
    weight = model.head_weight()
    # Vocabulary-parallel (head split over ``model``) when the step runs under a mesh with a
    # ``model`` axis (:func:`jaxnll.parallel.head_loss`); the plain fused kernel otherwise.
    numerator, row_sums = parallel.head_loss(hidden, weight, targets, train_mask, normalize="sum")
    if loss == "subsequence" and num_segments == 1:
      sample_sums = sg(row_sums)[:, None]
    else:
      sample_sums = _fused_segment_sums(
        sg(hidden), sg(weight), targets, target_mask, seg, num_segments
      )
    if loss == "full":
      aux["full_sum"] = sg(numerator)
  else:
    logits = model(tokens, **kwargs)
    if loss == "subsequence":
      sample_sums = segment_nll(logits, targets, target_mask, seg, num_segments=num_segments)
      numerator = jnp.sum(sample_sums)
      sample_sums = sg(sample_sums)
    else:
      sample_sums = segment_nll(sg(logits), targets, target_mask, seg, num_segments=num_segments)
      if loss == "selective":
        # Value: every valid token (for monitoring); gradient: the target spans only.
        rows = selective_sequence_nll(logits, targets, target_mask, valid_mask)
      else:
        rows = sequence_nll(logits, targets, valid_mask)
      numerator = jnp.sum(rows)
      aux["full_sum"] = sg(numerator)
  aux["sample_sums"] = sample_sums
  aux["sample_counts"] = segment_counts(target_mask, seg, num_segments)
  aux["target_sum"] = jnp.sum(sample_sums)
  aux["target_count"] = jnp.sum(target_mask, dtype=F32)
  aux["valid_count"] = jnp.sum(valid_mask, dtype=F32)
  aux["tokens"] = jnp.sum(seg > 0, dtype=F32)
  aux["denominator"] = aux["valid_count"] if loss == "full" else aux["target_count"]
  return numerator, aux


def accumulate_gradients(
  model: nnx.Module, batch: Batch, *, loss="subsequence", fused=False, objective=None
):
  """Summed numerator gradients and loss terms over the micro-batch axis of ``batch``.

  ``objective`` replaces :func:`loss_fn` (same signature and aux keys; e.g. the distillation
  objective of :mod:`jaxnll.distill_train`).

  Returns:
    ``(grads, totals, per_sample)``: the gradient of ``Σ_k N_k`` (a ``Param`` state, not yet
    divided), the scalar aux entries of :func:`loss_fn` summed over micro-batches, and the
    dict of its ``sample_*`` entries (``sample_sums``, ``sample_counts``, ...) ``[B, S]`` in
    the order of the un-split batch.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  objective = loss_fn if objective is None else objective

  def micro(params, mb):
    return objective(nnx.merge(graphdef, params, rest), mb, loss=loss, fused=fused)

  grad_fn = jax.grad(micro, has_aux=True)

  def one(mb):
    grads, aux = grad_fn(params, mb)
    per = {k: aux.pop(k) for k in [k for k in aux if k.startswith("sample_")]}
    return (grads, aux), per

  def body(acc, mb):
    new, per = one(mb)
    return jax.tree.map(jnp.add, acc, new), per

  acc, per = one(jax.tree.map(lambda x: x[0], batch))
  per = jax.tree.map(lambda x: x[None], per)
  if jax.tree.leaves(batch)[0].shape[0] > 1:
    acc, more = jax.lax.scan(body, acc, jax.tree.map(lambda x: x[1:], batch))
    per = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), per, more)
  per = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), per)
  grads, totals = acc
  return grads, totals, per


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step_fn(
  graphdef, state, batch: Batch, *, loss: str = "subsequence", fused=False, objective=None
):
  """One optimizer step as a pure function of ``(graphdef, state, batch)``.

  Args:
    graphdef, state: ``nnx.split(trainer)`` of a :class:`Trainer`.
    batch: data dict with leaves ``[K, B/K, ...]`` (:func:`micro_batches`).
    loss, fused: as in :func:`loss_fn`.
    objective: replaces :func:`loss_fn` (see :func:`accumulate_gradients`); when its aux has
      ``objective_sum`` that (over ``denominator``) is the logged ``loss``, and ``kd_sum`` /
      ``kd_count`` give ``kd_loss``.

  Returns:
    ``(new_state, metrics)``: ``metrics`` holds float32 scalars ``loss`` (the trained
    objective: the target loss, or the full-sequence loss for ``"full"``), ``target_loss``,
    ``full_loss`` (selective and full modes), ``target_tokens``, ``tokens``, ``grad_norm``,
    ``finite`` (bool: the update was applied), and ``sample_sums``/``sample_counts``
    ``[B, S]``.  When a gradient is not finite the state is returned unchanged except for the
    skip counter.
  """
  trainer = nnx.merge(graphdef, state, copy=True)
  grads, totals, per_sample = accumulate_gradients(
    trainer.model, batch, loss=loss, fused=fused, objective=objective
  )
  den = totals["denominator"]
  grads = jax.tree.map(lambda g: g / jnp.where(den > 0, den, 1.0), grads)
  finite = _all_finite(grads)

  def apply(state):
    t = nnx.merge(graphdef, state, copy=True)
    t.optimizer.update(t.model, grads)
    return nnx.state(t)

  def skip(state):
    t = nnx.merge(graphdef, state, copy=True)
    t.skipped[...] = t.skipped[...] + 1
    return nnx.state(t)

  new_state = jax.lax.cond(finite, apply, skip, state)
  metrics = {
    "target_loss": _ratio(totals["target_sum"], totals["target_count"]),
    "target_tokens": totals["target_count"],
    "tokens": totals["tokens"],
    "grad_norm": optax.tree.norm(grads),
    "finite": finite,
    **per_sample,
  }
  if "full_sum" in totals:
    metrics["full_loss"] = _ratio(totals["full_sum"], totals["valid_count"])
  metrics["loss"] = metrics["full_loss"] if loss == "full" else metrics["target_loss"]
  if "objective_sum" in totals:
    metrics["loss"] = _ratio(totals["objective_sum"], den)
  if "kd_sum" in totals:
    metrics["kd_loss"] = _ratio(totals["kd_sum"], totals["kd_count"])
  return new_state, metrics


@functools.partial(nnx.jit, static_argnames=("loss", "fused"), donate_argnames=("trainer",))
def train_step(trainer: Trainer, batch: Batch, *, loss: str = "subsequence", fused=False):
  """One jitted, donated training step on a :class:`Trainer` (updated in place).

  A thin ``nnx.jit`` wrapper of :func:`train_step_fn`; returns its ``metrics``.
  """
  graphdef, state = nnx.split(trainer)
  state, metrics = train_step_fn(graphdef, state, batch, loss=loss, fused=fused)
  nnx.update(trainer, state)
  return metrics


@functools.partial(nnx.jit, static_argnames=("fused",))
def eval_step(model: nnx.Module, batch: Batch, *, fused: bool = False):
  """Per-sample target NLL sums and token counts ``[B, S]`` of a (non-micro-batched) batch."""
  _, aux = loss_fn(model, batch, loss="subsequence", fused=fused)
  return aux["sample_sums"], aux["sample_counts"]


def export_train_step(
  graphdef,
  state,
  batch: Batch,
  *,
  platforms=("cpu", "cuda", "tpu"),
  loss: str = "subsequence",
  fused: bool = False,
) -> jax.export.Exported:
  """Serialisable :func:`train_step_fn` for ``platforms`` (lowered here, run anywhere).

  The exported function takes and returns the state as its flat list of leaves
  (``jax.tree.leaves(state)``, so no custom pytree needs registering) next to the batch.
  """
  leaves, treedef = jax.tree.flatten(state)

  def step(leaves, batch):
    new_state, metrics = train_step_fn(
      graphdef, jax.tree.unflatten(treedef, leaves), batch, loss=loss, fused=fused
    )
    return jax.tree.leaves(new_state), metrics

  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  return jax.export.export(jax.jit(step), platforms=platforms)(
    jax.tree.map(spec, leaves), jax.tree.map(spec, batch)
  )


# ----------------------------------------------------------------------------- devices


def data_mesh(devices=None) -> Mesh:
  """A one-axis (``"data"``) mesh over ``devices`` (default: all local devices)."""
  return Mesh(np.asarray(jax.local_devices() if devices is None else devices), ("data",))


def micro_batches(batch: Batch, accum: int) -> Batch:
  """``[B, ...]`` host arrays to ``[accum, B / accum, ...]`` (consecutive rows together)."""
  return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
  """Puts a micro-batched batch on ``mesh``, rows of each micro-batch split over devices."""
  return jax.device_put(batch, NamedSharding(mesh, P(None, "data")))


def replicate(tree, mesh: Mesh):
  """Copies ``tree`` (parameters, optimizer state) to every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------- evaluation


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
    placed = batch if mesh is None else parallel.global_batch(batch, mesh, P("data"), axis=0)
    with _on_mesh(mesh):
      s, c = parallel.fetch(eval_step(model, placed, fused=fused))
    ids = batch["sample_ids"]
    sums[ids[ids >= 0]] = s[ids >= 0]
    counts[ids[ids >= 0]] = c[ids >= 0]
  return sums, counts


@functools.partial(nnx.jit, static_argnames=("max_new",))
def _greedy(model, tokens, lengths, *, max_new: int):
  rows, length = tokens.shape

  def body(_, carry):
    tokens, lengths, done = carry
    logits = model(tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    nxt = jnp.argmax(last, axis=-1).astype(tokens.dtype)
    write = ~done & (lengths < length)
    at = jnp.minimum(lengths, length - 1)
    old = jnp.take_along_axis(tokens, at[:, None], axis=1)[:, 0]
    tokens = tokens.at[jnp.arange(rows), at].set(jnp.where(write, nxt, old))
    done = done | (write & (nxt == data_lib.EOS)) | (lengths >= length)
    return tokens, lengths + write, done

  done = jnp.zeros((rows,), jnp.bool_)
  tokens, lengths, _ = jax.lax.fori_loop(0, max_new, body, (tokens, lengths, done))
  return tokens, lengths


def greedy_responses(model, examples, *, length: int, max_new: int = 48, mesh=None) -> list[str]:
  """The model's greedy answer to each example's prompt (decoding stops at ``EOS``)."""
  prompts = [data_lib.encode_prompt(ex)[-length:] for ex in examples]
  tokens = np.full((len(prompts), length), data_lib.PAD, np.int32)
  for r, p in enumerate(prompts):
    tokens[r, : len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if mesh is not None:
    tokens, lengths = parallel.place((tokens, lengths), (NamedSharding(mesh, P()),) * 2)
  with _on_mesh(mesh):
    out, end = parallel.fetch(_greedy(model, tokens, lengths, max_new=max_new))
  texts = []
  for r, p in enumerate(prompts):
    ids = list(out[r, len(p) : end[r]])
    if data_lib.EOS in ids:
      ids = ids[: ids.index(data_lib.EOS)]
    texts.append(data_lib.decode(ids))
  return texts


# ----------------------------------------------------------------------------- the run loop


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run depends on; saved as ``config.json`` and read back by ``--resume``."""

  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  batch: data_lib.BatchSpec = data_lib.BatchSpec()
  steps: int = 400
  seed: int = 0
  data: str | None = None
  eval_every: int = 100
  checkpoint_every: int = 200
  table_rows: int = 8
  distill: dict[str, Any] | None = None
  """Teacher distillation (:class:`jaxnll.distill_train.DistillConfig` as a dict), or None."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunConfig:
    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    d["train"] = TrainConfig(**d["train"])
    d["batch"] = data_lib.BatchSpec(**d["batch"])
    return cls(**d)


def load_examples(path: str | None):
  """``(train, heldout)`` examples: the embedded set, or a JSONL file split 9:1."""
  if path is None:
    return data_lib.embedded_examples("train"), data_lib.embedded_examples("heldout")
  examples = data_lib.load_jsonl(path)
  if len(examples) < 2:
    return examples, examples
  return data_lib.split_examples(examples, "train"), data_lib.split_examples(examples, "heldout")


def _checkpointer(directory: str):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_state(directory: str, abstract_state, step: int | None = None):
  """The latest (or ``step``'s) checkpointed state under ``directory``; ``(step, state)``."""
  import orbax.checkpoint as ocp

  with _checkpointer(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint to resume from")
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return step, state


def build_trainer(config: RunConfig) -> Trainer:
  model = make_model(config.model, seed=config.seed)
  return Trainer(model, make_optimizer(config.train, config.steps))


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
  partitioning metadata (:func:`jaxnll.parallel.annotate_partitioning`: FSDP over ``data``,
  the head split along the vocabulary over ``model``, where the fused loss then runs
  vocabulary-parallel), batches split along ``data``; losses equal the single-device run's.
  The mesh is not part of the saved configuration: a run resumes on any device count.  With
  several processes (:func:`jaxnll.parallel.initialize` first) every process runs ``fit``,
  feeds its slice of each global batch, and only process 0 writes files.

  Returns:
    The summary: steps, wall time, held-out target NLL (nats per target token) at the start
    and end of this invocation, skipped steps, parameter count, and the sample table rows.
  """
  t_start = time.perf_counter()
  primary = parallel.is_primary()
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
  parallel.barrier("jaxnll-fit-config-read")
  if primary:
    if not resume:
      for stale in (ckpt_dir, metrics_path):
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        elif os.path.exists(stale):
          os.remove(stale)
    with open(config_path, "w") as f:
      json.dump(config.to_dict(), f, indent=2)
  parallel.barrier("jaxnll-fit-directory-ready")

  train_examples, heldout_examples = load_examples(config.data)
  spec = config.batch
  train_examples = data_lib.drop_long(train_examples, spec.length)
  heldout_examples = data_lib.drop_long(heldout_examples, spec.length)
  train_samples = data_lib.encode_all(train_examples, spec.length)
  heldout_samples = data_lib.encode_all(heldout_examples, spec.length)
  distiller = make_distiller(config, train_examples, out_dir, log=log)

  mesh = mesh if isinstance(mesh, Mesh) else parallel.make_mesh(mesh)
  data_lib.check_rows(spec, accum=config.train.accum, devices=parallel.axis_size(mesh, "data"))
  trainer = build_trainer(config)
  parallel.annotate_partitioning(trainer, mesh)
  graphdef, state = nnx.split(trainer)
  shardings = parallel.state_shardings(state, mesh)
  start = 0
  if resume:
    # Read straight into this run's layout, whatever mesh wrote the checkpoint.
    start, state = restore_state(ckpt_dir, parallel.abstract(state, shardings))
    if primary:
      metrics_lib.truncate_records(metrics_path, start)
  state = parallel.place(state, shardings)
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

  jitted = jax.jit(
    functools.partial(
      train_step_fn,
      graphdef,
      loss=config.train.loss,
      fused=fused,
      objective=None if distiller is None else distiller.objective,
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
  stream = data_lib.train_stream(train_samples, spec, seed=config.seed, start_step=start)
  end = config.steps if stop_after is None else min(stop_after, config.steps)
  step = start
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  manager = _checkpointer(ckpt_dir)
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
      host = item.batch if distiller is None else distiller.prepare(item.batch)
      batch = parallel.global_batch(micro_batches(host, config.train.accum), mesh)
      state, out = step_fn(state, batch)
      out = parallel.fetch(out)
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
      if distiller is not None:
        distiller.annotate(record, out, item.batch["sample_ids"])
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
    "skipped_steps": int(parallel.fetch(state["skipped"][...])),
    "params": count_params(trainer.model),
    "samples": rows,
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
