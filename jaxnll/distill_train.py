"""Training a student from a trained teacher: token-level and sequence-level distillation.

``jaxnll train --teacher RUN_DIR [--kd-weight α] [--temperature τ] [--kd token|sequence]``
trains the (usually smaller) model of the command line from the teacher checkpointed in
``RUN_DIR`` with, per target token,

.. math::

   \\mathcal L = (1 - α)\\, \\mathrm{NLL} + α\\, \\mathrm{KD},

normalised like every jaxnll training loss (a global token mean, exact under accumulation).

* ``--kd token`` (Hinton et al., 2015): ``KD = τ² · CE(softmax(teacher/τ), softmax(student/τ))``
  at every target position (:func:`jaxnll.distill_cross_entropy`, per sample through
  :func:`jaxnll.distill.segment_distill_cross_entropy`).  **The τ² factor is applied here**
  (the loss function itself does not scale): it keeps the soft term's gradient on the scale
  of the hard term's whatever ``τ``.  The teacher runs forward on the same batch, outside the
  differentiated step, and its logits enter the step as data (``batch["teacher_logits"]``).
* ``--kd sequence`` (Kim & Rush, 2016, the form the book makes tractable): the teacher's
  greedy answer ``ŷ`` to every training prompt is decoded once (cached in the run directory
  as ``teacher_outputs.jsonl``) and ``KD = -log Pr(ŷ | x)`` by :func:`jaxnll.sequence_nll`.
  The normaliser is ``(1 - α)|y| + α|ŷ|`` target tokens, so ``α = 1`` is exactly training
  on the teacher's outputs.  Needs unpacked batches (one sample per row).

Logged per step in ``metrics.jsonl``: ``loss`` (the objective above), ``target_loss`` (the
student's NLL of the reference answers, as in every run), ``kd_loss`` (token mean of the KD
term, without ``τ²``), and per sample ``sample_nll`` and ``sample_kd`` (sums, aligned with
``sample_ids``) with their token counts ``sample_tokens`` and ``sample_kd_tokens``.  The
held-out metric is unchanged: the student's target NLL of the reference answers.

References: G. Hinton, O. Vinyals and J. Dean, *Distilling the Knowledge in a Neural Network*
(2015); Y. Kim and A. M. Rush, *Sequence-Level Knowledge Distillation* (2016); T. Xiao and
J. Zhu, *Foundations of Large Language Models*, ch. 3-4.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnll import data as data_lib
from jaxnll.distill import segment_distill_cross_entropy
from jaxnll.nll import segment_nll
from jaxnll.spans import shift_targets

F32 = jnp.float32
KD_MODES = ("token", "sequence")
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Teacher and distillation settings (JSON-friendly; saved in the run's ``config.json``).

  Attributes:
    teacher: run directory of the trained teacher (``config.json`` + ``checkpoints/``).
    kd_weight: ``α`` in ``(1 - α)·NLL + α·KD``, in ``[0, 1]``.
    temperature: ``τ > 0`` of both softmaxes (token mode; the term is scaled by ``τ²``).
    kd: ``"token"`` or ``"sequence"`` (module docstring).
    max_new: most tokens decoded per teacher answer (sequence mode).
  """

  teacher: str
  kd_weight: float = 0.5
  temperature: float = 1.0
  kd: str = "token"
  max_new: int = 64

  def __post_init__(self):
    if self.kd not in KD_MODES:
      raise ValueError(f"kd must be one of {KD_MODES}, got {self.kd!r}")
    if not 0.0 <= self.kd_weight <= 1.0:
      raise ValueError(f"kd_weight (α) must be in [0, 1], got {self.kd_weight}")
    if not (np.isfinite(self.temperature) and self.temperature > 0.0):
      raise ValueError(f"temperature (τ) must be a finite float > 0, got {self.temperature}")
    if self.kd == "sequence" and self.temperature != 1.0:
      raise ValueError("temperature only applies to --kd token (sequence KD decodes greedily)")
    if not isinstance(self.max_new, int) or self.max_new < 1:
      raise ValueError(f"max_new must be a positive int, got {self.max_new!r}")
    object.__setattr__(self, "kd_weight", float(self.kd_weight))
    object.__setattr__(self, "temperature", float(self.temperature))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
    return cls(**d)


# ----------------------------------------------------------------------------- the objective


def objective(model: nnx.Module, batch: Batch, *, loss: str, fused: bool, config: DistillConfig):
  """The numerator of ``(1 - α)·NLL + α·KD`` for one micro-batch, and its aux.

  A drop-in for :func:`jaxnll.train.loss_fn` (same signature once ``config`` is bound, same
  aux keys) that also reports ``objective_sum`` (the value of the numerator), ``kd_sum`` /
  ``kd_count`` and the per-sample ``sample_kd_sums`` / ``sample_kd_counts`` ``[B, S]``.
  ``denominator`` is ``(1 - α)·target_count + α·kd_count``.  ``loss`` must be
  ``"subsequence"`` and ``fused`` False (checked by :class:`Distiller`).
  """
  del loss, fused
  tokens, span, seg = batch["tokens"], batch["span_mask"], batch["segment_ids"]
  num_segments = batch["sample_ids"].shape[-1]
  targets, target_mask = shift_targets(tokens, span, seg)
  _, valid_mask = shift_targets(tokens, seg > 0, seg)
  logits = model(tokens, segment_ids=seg, positions=batch["positions"], span_mask=target_mask)
  nll = segment_nll(logits, targets, target_mask, seg, num_segments=num_segments)
  counts = _segment_counts(target_mask, seg, num_segments)
  alpha = config.kd_weight
  if config.kd == "token":
    kd = segment_distill_cross_entropy(
      logits,
      batch["teacher_logits"],
      target_mask,
      seg,
      num_segments=num_segments,
      temperature=config.temperature,
    )
    kd_counts, scale = counts, config.temperature**2
  else:
    kd_tokens, kd_seg = batch["kd_tokens"], batch["kd_segment_ids"]
    kd_targets, kd_mask = shift_targets(kd_tokens, batch["kd_span_mask"], kd_seg)
    kd_logits = model(
      kd_tokens, segment_ids=kd_seg, positions=batch["kd_positions"], span_mask=kd_mask
    )
    kd = segment_nll(kd_logits, kd_targets, kd_mask, kd_seg, num_segments=num_segments)
    kd_counts, scale = _segment_counts(kd_mask, kd_seg, num_segments), 1.0
  numerator = (1.0 - alpha) * jnp.sum(nll) + (alpha * scale) * jnp.sum(kd)
  sg = jax.lax.stop_gradient
  target_count = jnp.sum(target_mask, dtype=F32)
  kd_count = jnp.sum(kd_counts)
  aux = {
    "sample_sums": sg(nll),
    "sample_counts": counts,
    "sample_kd_sums": sg(kd),
    "sample_kd_counts": kd_counts,
    "target_sum": jnp.sum(sg(nll)),
    "target_count": target_count,
    "valid_count": jnp.sum(valid_mask, dtype=F32),
    "tokens": jnp.sum(seg > 0, dtype=F32),
    "kd_sum": jnp.sum(sg(kd)),
    "kd_count": kd_count,
    "objective_sum": sg(numerator),
    "denominator": (1.0 - alpha) * target_count + alpha * kd_count,
  }
  return numerator, aux


def _segment_counts(mask, segment_ids, num_segments):
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)
  return jnp.sum(jnp.where(onehot, mask[..., None].astype(F32), 0.0), axis=1)


# ----------------------------------------------------------------------------- the teacher


def load_teacher(run_dir: str):
  """The trained model of ``run_dir`` (latest checkpoint): ``(model, run_config, step)``."""
  from jaxnll import train

  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
      f"--teacher {run_dir}: no config.json there (a run directory written by `jaxnll train`)"
    )
  with open(config_path) as f:
    run = train.RunConfig.from_dict(json.load(f))
  graphdef, state = nnx.split(train.build_trainer(run))
  step, state = train.restore_state(os.path.join(run_dir, "checkpoints"), state)
  return nnx.merge(graphdef, state).model, run, step


@nnx.jit
def _forward(model, tokens, segment_ids, positions):
  return model(tokens, segment_ids=segment_ids, positions=positions)


@functools.partial(nnx.jit, static_argnames=("max_new",))
def _greedy_ids(model, tokens, lengths, *, max_new: int):
  """Greedy continuation of each row's first ``lengths`` tokens, until EOS or ``max_new``."""
  rows, length = tokens.shape

  def cond(carry):
    i, _, _, done = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, tokens, lengths, done = carry
    logits = model(tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    nxt = jnp.argmax(last, axis=-1).astype(tokens.dtype)
    write = ~done & (lengths < length)
    at = jnp.minimum(lengths, length - 1)
    old = tokens[jnp.arange(rows), at]
    tokens = tokens.at[jnp.arange(rows), at].set(jnp.where(write, nxt, old))
    lengths = lengths + write
    done = done | (write & (nxt == data_lib.EOS)) | (lengths >= length)
    return i + 1, tokens, lengths, done

  done = lengths >= length
  _, tokens, lengths, _ = jax.lax.while_loop(cond, body, (0, tokens, lengths, done))
  return tokens, lengths


def teacher_answers(
  model, examples: Sequence[data_lib.Example], *, length: int, max_new: int, rows: int = 64
) -> list[list[int]]:
  """The teacher's greedy answer (token ids, without the closing EOS) to each prompt.

  Prompts are decoded shortest first, ``rows`` at a time, each chunk in a row just long
  enough for its longest prompt plus ``max_new`` (a multiple of 8, at most ``length``).
  """
  prompts = [data_lib.encode_prompt(ex)[-(length - 1) :] for ex in examples]
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  answers: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), rows):
    chunk = order[start : start + rows]
    longest = max(len(prompts[i]) for i in chunk)
    width = min(length, -(-(longest + max_new) // 8) * 8)
    tokens = np.full((rows, width), data_lib.PAD, np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, i in enumerate(chunk):
      tokens[r, : len(prompts[i])] = prompts[i]
      lengths[r] = len(prompts[i])
    out, end = jax.device_get(_greedy_ids(model, tokens, lengths, max_new=max_new))
    for r, i in enumerate(chunk):
      ids = [int(x) for x in out[r, len(prompts[i]) : end[r]]]
      answers[i] = ids[: ids.index(data_lib.EOS)] if data_lib.EOS in ids else ids
  return answers


def answer_sample(example: data_lib.Example, answer: Sequence[int], length: int):
  """``(tokens, span_mask)`` of the prompt followed by ``answer`` and EOS (the target span),
  the answer cut so that the row fits ``length``."""
  prompt = data_lib.encode_prompt(example)
  keep = max(0, min(len(answer), length - len(prompt) - 1))
  body = np.asarray(list(answer[:keep]) + [data_lib.EOS], np.int32)
  tokens = np.concatenate([prompt, body])
  span = np.concatenate([np.zeros(len(prompt), np.bool_), np.ones(len(body), np.bool_)])
  return tokens, span


# ----------------------------------------------------------------------------- the run glue


class Distiller:
  """What :func:`jaxnll.train.fit` needs to train a student from a teacher.

  * :attr:`objective` replaces :func:`jaxnll.train.loss_fn` in the train step;
  * :meth:`prepare` adds the teacher's part to each host batch (teacher logits, or the
    batch of teacher answers) before it is split into micro-batches;
  * :meth:`annotate` adds the distillation figures to a ``metrics.jsonl`` record.

  The teacher is restored whole and runs on the default device, its logits (or the batch of
  its answers) then split over the run's mesh like the rest of the batch; one process only.
  """

  def __init__(
    self,
    config: DistillConfig,
    run,
    train_examples: Sequence[data_lib.Example],
    out_dir: str,
    *,
    log: Callable[[str], None] = print,
  ):
    if run.train.loss != "subsequence" or run.train.fused:
      raise ValueError(
        "distillation trains the sub-sequence loss from logits: use loss 'subsequence' "
        f"without --fused (got loss {run.train.loss!r}, fused={run.train.fused})"
      )
    if jax.process_count() > 1:
      raise ValueError("distillation runs in a single process (any device mesh there)")
    if config.kd == "sequence" and run.batch.pack:
      raise ValueError("--kd sequence needs unpacked batches (one sample per row): drop --pack")
    self.config = config
    self.teacher, teacher_run, step = load_teacher(config.teacher)
    if teacher_run.model.vocab_size != run.model.vocab_size:
      raise ValueError(
        f"teacher vocabulary ({teacher_run.model.vocab_size}) differs from the student's "
        f"({run.model.vocab_size})"
      )
    from jaxnll.model import count_params

    log(
      f"teacher: {teacher_run.model.kind} with {count_params(self.teacher):,} parameters "
      f"from {config.teacher} (step {step}); kd={config.kd}, α={config.kd_weight}"
      + (f", τ={config.temperature}" if config.kd == "token" else "")
    )
    self.objective = functools.partial(objective, config=config)
    self.length = run.batch.length
    self.answers: list[tuple[np.ndarray, np.ndarray]] = []
    if config.kd == "sequence":
      answers = self._answers(train_examples, out_dir, log)
      self.answers = [
        answer_sample(ex, a, self.length) for ex, a in zip(train_examples, answers, strict=True)
      ]

  def _answers(self, examples, out_dir, log) -> list[list[int]]:
    """Teacher answers, decoded once and cached in ``out_dir/teacher_outputs.jsonl``."""
    path = os.path.join(out_dir, "teacher_outputs.jsonl")
    key = {
      "teacher": os.path.abspath(self.config.teacher),
      "max_new": self.config.max_new,
      "length": self.length,
      "count": len(examples),
    }
    if os.path.exists(path):
      with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
      if lines and lines[0] == {"key": key}:
        return [r["ids"] for r in lines[1:]]
    log(f"decoding the teacher's greedy answers to {len(examples)} training prompts ...")
    answers = teacher_answers(
      self.teacher, examples, length=self.length, max_new=self.config.max_new
    )
    with open(path, "w") as f:
      f.write(json.dumps({"key": key}) + "\n")
      for ex, ids in zip(examples, answers, strict=True):
        record = {"prompt": ex.prompt, "teacher": data_lib.decode(ids), "ids": ids}
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    same = sum(data_lib.decode(a) == ex.response for ex, a in zip(examples, answers, strict=True))
    log(f"teacher answers match the reference on {same}/{len(examples)} training prompts")
    return answers

  def prepare(self, batch: Batch) -> Batch:
    """``batch`` with the teacher's logits, or the aligned batch of teacher answers."""
    if self.config.kd == "token":
      logits = _forward(self.teacher, batch["tokens"], batch["segment_ids"], batch["positions"])
      return {**batch, "teacher_logits": logits}
    ids = np.asarray(batch["sample_ids"])[:, 0]
    empty = (np.zeros(0, np.int32), np.zeros(0, np.bool_))
    samples = [self.answers[i] if i >= 0 else empty for i in ids]
    kd = data_lib.pad_batch(samples, list(ids), rows=len(ids), length=batch["tokens"].shape[1])
    return {
      **batch,
      **{f"kd_{k}": kd[k] for k in ("tokens", "span_mask", "segment_ids", "positions")},
    }

  @staticmethod
  def annotate(record: dict[str, Any], out: dict[str, Any], sample_ids) -> dict[str, Any]:
    """Adds ``kd_loss`` and the per-sample ``sample_kd`` / ``sample_kd_tokens`` to a record."""
    keep = np.asarray(sample_ids) >= 0
    record["kd_loss"] = float(out["kd_loss"])
    record["sample_kd"] = [round(float(x), 5) for x in np.asarray(out["sample_kd_sums"])[keep]]
    record["sample_kd_tokens"] = [int(x) for x in np.asarray(out["sample_kd_counts"])[keep]]
    return record


def make_distiller(run, train_examples, out_dir: str, *, log=print) -> Distiller | None:
  """The :class:`Distiller` of a run whose ``run.distill`` is set, else ``None``."""
  if getattr(run, "distill", None) is None:
    return None
  return Distiller(DistillConfig.from_dict(run.distill), run, train_examples, out_dir, log=log)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The ``jaxnll train`` options of distillation."""
  g = parser.add_argument_group("distillation (train this model from a trained teacher run)")
  g.add_argument("--teacher", metavar="RUN_DIR", help="run directory of the teacher")
  g.add_argument(
    "--kd-weight", type=float, metavar="ALPHA", help="α in (1-α)·NLL + α·KD (default: 0.5)"
  )
  g.add_argument(
    "--temperature",
    type=float,
    metavar="TAU",
    help="softmax temperature of --kd token; its term is scaled by τ² (default: 1.0)",
  )
  g.add_argument(
    "--kd",
    choices=KD_MODES,
    help="token: match the teacher's next-token distributions (default); "
    "sequence: NLL of the teacher's greedy answers",
  )


def config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
  """``RunConfig.distill`` from parsed arguments (``None`` without ``--teacher``)."""
  given = {
    "kd_weight": args.kd_weight,
    "temperature": args.temperature,
    "kd": args.kd,
  }
  given = {k: v for k, v in given.items() if v is not None}
  if args.teacher is None:
    if given:
      flags = ", ".join("--" + k.replace("_", "-") for k in given)
      raise ValueError(f"{flags} need --teacher RUN_DIR")
    return None
  return DistillConfig(teacher=os.path.abspath(args.teacher), **given).to_dict()
