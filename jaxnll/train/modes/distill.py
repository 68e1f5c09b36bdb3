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

* ``--kd token --fused``: the teacher's final hidden states ``[B, T, D_t]`` (not its
  ``[B, T, V]`` logits) enter the step as data (``batch["teacher_hidden"]``), its frozen head
  rides with the objective (:class:`TeacherHead`), and both heads go through
  :func:`jaxnll.fused.linear_distill_loss` (no logits of either model); the student's NLL
  through its fused head.  ``--kd-kind`` picks the divergence (``ce`` — the default, equal to
  the logits path —, ``kl``, ``reverse_kl``, ``jsd`` with ``--kd-beta``), always times ``τ²``.

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
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnll.distill import segment_distill_cross_entropy
from jaxnll.fused.distill import KINDS as KD_KINDS
from jaxnll.fused.distill import linear_distill_loss
from jaxnll.nll import segment_nll
from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train import generate
from jaxnll.train.model import count_params
from jaxnll.train.modes.base import Mode, given_options
from jaxnll.train.objectives import Objective, Task, batch_masks, common_aux, segment_counts
from jaxnll.train.run import load_run

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
    kind: the token-level divergence, one of ``("ce", "kl", "reverse_kl", "jsd")``
      (:func:`jaxnll.fused.linear_distill_loss`); from logits only ``ce`` and ``kl``.
    beta: ``β`` of ``kind="jsd"``, in ``[0, 1]``.
  """

  teacher: str
  kd_weight: float = 0.5
  temperature: float = 1.0
  kd: str = "token"
  max_new: int = 64
  kind: str = "ce"
  beta: float = 0.5

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
    if self.kind not in KD_KINDS:
      raise ValueError(f"kind (--kd-kind) must be one of {KD_KINDS}, got {self.kind!r}")
    if self.kd == "sequence" and (self.kind != "ce" or self.beta != 0.5):
      raise ValueError("--kd-kind / --kd-beta only apply to --kd token")
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"beta (--kd-beta) must be in [0, 1], got {self.beta}")
    if self.beta != 0.5 and self.kind != "jsd":
      raise ValueError(f"--kd-beta only applies to --kd-kind jsd (got kind {self.kind!r})")
    object.__setattr__(self, "beta", float(self.beta))
    object.__setattr__(self, "kd_weight", float(self.kd_weight))
    object.__setattr__(self, "temperature", float(self.temperature))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
    return cls(**d)


# ----------------------------------------------------------------------------- the objective


class TeacherHead:
  """The teacher's frozen output head ``(weight, layout)``, carried by the objective into the
  step (a constant of the compiled step, like the objective's settings).  Hashed by identity:
  one head, one compiled step."""

  def __init__(self, weight, layout: str):
    self.weight, self.layout = jax.lax.stop_gradient(jnp.asarray(weight)), layout


@dataclasses.dataclass(frozen=True)
class Distill(Objective):
  """The numerator of ``(1 - α)·NLL + α·KD`` for one micro-batch, and its aux.

  An objective of :mod:`jaxnll.train.objectives` (same entries as
  :class:`~jaxnll.train.objectives.SFT`) that also reports ``kd_sum`` / ``kd_count`` (logged
  as ``kd_loss``) and the per-sample ``sample_kd_sums`` / ``sample_kd_counts`` ``[B, S]``.
  ``denominator`` is ``(1 - α)·target_count + α·kd_count``.  Reads ``batch["teacher_logits"]``
  (token mode), ``batch["teacher_hidden"]`` with :attr:`teacher_head` (token mode, fused) or
  the ``kd_*`` batch of teacher answers (sequence mode), which :class:`Distiller` adds on the
  host.
  """

  config: DistillConfig
  teacher_head: TeacherHead | None = None  # set: the fused token mode
  means: ClassVar = {**Objective.means, "kd_loss": "kd"}

  def _fused_token(self, model: nnx.Module, batch: Batch, targets, target_mask, seg, num_segments):
    """Per-segment NLL and KD sums ``[B, S]`` (differentiable) through both fused heads: one
    pass of the student's head for both terms, all segments of the packed rows at once
    (``linear_distill_loss`` with ``targets`` and ``segment_ids``)."""
    config = self.config
    hidden = model(
      batch["tokens"], return_hidden=True, segment_ids=seg, positions=batch["positions"],
      span_mask=target_mask,
    )  # fmt: skip
    weight, layout = model.output_head()
    head = self.teacher_head
    kd, nll = linear_distill_loss(
      hidden, weight, batch["teacher_hidden"], head.weight, target_mask, kind=config.kind,
      temperature=config.temperature, beta=config.beta, student_weight_layout=layout,
      teacher_weight_layout=head.layout, targets=targets, segment_ids=seg,
      num_segments=num_segments,
    )  # fmt: skip
    return nll, kd

  def __call__(self, model: nnx.Module, batch: Batch):
    config = self.config
    targets, target_mask, valid_mask, num_segments = batch_masks(batch)
    seg = batch["segment_ids"]
    counts = segment_counts(target_mask, seg, num_segments)
    alpha = config.kd_weight
    if config.kd == "token" and self.teacher_head is not None:
      nll, kd = self._fused_token(model, batch, targets, target_mask, seg, num_segments)
      kd_counts, scale = counts, config.temperature**2
    else:
      logits = model(
        batch["tokens"], segment_ids=seg, positions=batch["positions"], span_mask=target_mask
      )
      nll = segment_nll(logits, targets, target_mask, seg, num_segments=num_segments)
    if config.kd == "token" and self.teacher_head is None:
      kd = segment_distill_cross_entropy(
        logits,
        batch["teacher_logits"],
        target_mask,
        seg,
        num_segments=num_segments,
        temperature=config.temperature,
        kind="cross_entropy" if config.kind == "ce" else config.kind,
      )
      kd_counts, scale = counts, config.temperature**2
    elif config.kd == "sequence":
      kd_tokens, kd_seg = batch["kd_tokens"], batch["kd_segment_ids"]
      kd_targets, kd_mask = shift_targets(kd_tokens, batch["kd_span_mask"], kd_seg)
      kd_logits = model(
        kd_tokens, segment_ids=kd_seg, positions=batch["kd_positions"], span_mask=kd_mask
      )
      kd = segment_nll(kd_logits, kd_targets, kd_mask, kd_seg, num_segments=num_segments)
      kd_counts, scale = segment_counts(kd_mask, kd_seg, num_segments), 1.0
    numerator = (1.0 - alpha) * jnp.sum(nll) + (alpha * scale) * jnp.sum(kd)
    sg = jax.lax.stop_gradient
    aux = common_aux(batch, target_mask, valid_mask, sg(nll), num_segments)
    kd_count = jnp.sum(kd_counts)
    aux.update(
      sample_kd_sums=sg(kd),
      sample_kd_counts=kd_counts,
      kd_sum=jnp.sum(sg(kd)),
      kd_count=kd_count,
      denominator=(1.0 - alpha) * aux["target_count"] + alpha * kd_count,
    )
    return numerator, aux


# ----------------------------------------------------------------------------- the teacher


@nnx.jit
def _forward(model, tokens, segment_ids, positions):
  return model(tokens, segment_ids=segment_ids, positions=positions)


@nnx.jit
def _forward_hidden(model, tokens, segment_ids, positions):
  return model(tokens, segment_ids=segment_ids, positions=positions, return_hidden=True)


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
    tokens, lengths = generate.prompt_rows([prompts[i] for i in chunk], width, rows)
    out, end = jax.device_get(generate.greedy(model, tokens, lengths, max_new=max_new))
    for r, i in enumerate(chunk):
      answers[i] = generate.answer_ids(out[r], len(prompts[i]), end[r])
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


class Distiller(Task):
  """What :func:`jaxnll.train.loop.fit` needs to train a student from a teacher.

  * :attr:`objective` (a :class:`Distill`) is what the train step differentiates;
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
    fused = run.train.fused
    if run.train.loss != "subsequence" or (fused and config.kd != "token"):
      raise ValueError(
        "distillation trains the sub-sequence loss, fused only with --kd token: use loss "
        f"'subsequence' (got loss {run.train.loss!r}, fused={fused}, kd={config.kd!r})"
      )
    if not fused and config.kind not in ("ce", "kl"):
      raise ValueError(f"--kd-kind {config.kind} needs --fused (from logits: --kd-kind ce or kl)")
    if jax.process_count() > 1:
      raise ValueError("distillation runs in a single process (any device mesh there)")
    if config.kd == "sequence" and run.batch.pack:
      raise ValueError("--kd sequence needs unpacked batches (one sample per row): drop --pack")
    self.config = config
    self.teacher, teacher_run, step = load_run(config.teacher, flag="--teacher")
    if teacher_run.model.vocab_size != run.model.vocab_size:
      raise ValueError(
        f"teacher vocabulary ({teacher_run.model.vocab_size}) differs from the student's "
        f"({run.model.vocab_size})"
      )
    self.fused = fused and config.kd == "token"
    head = TeacherHead(*self.teacher.output_head()) if self.fused else None
    super().__init__(Distill(config, head))
    log(
      f"teacher: {teacher_run.model.kind} with {count_params(self.teacher):,} parameters "
      f"from {config.teacher} (step {step}); kd={config.kd}, α={config.kd_weight}"
      + (f", τ={config.temperature}, {config.kind}" if config.kd == "token" else "")
      + (f" (β={config.beta})" if config.kind == "jsd" else "")
      + (", fused (teacher hidden states and head, no logits)" if self.fused else "")
    )
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

  def prepare(self, batch: Batch, model=None, step: int = 0) -> Batch:
    """``batch`` with the teacher's logits (fused: its hidden states), or the aligned batch of
    teacher answers."""
    if self.fused:
      hidden = _forward_hidden(
        self.teacher, batch["tokens"], batch["segment_ids"], batch["positions"]
      )
      return {**batch, "teacher_hidden": hidden}
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

  def annotate(self, record: dict[str, Any], out: dict[str, Any], sample_ids) -> dict[str, Any]:
    """Adds the per-sample ``sample_kd`` / ``sample_kd_tokens`` to a record (``kd_loss`` is
    one of the objective's means, recorded by the loop)."""
    keep = np.asarray(sample_ids) >= 0
    record["sample_kd"] = [round(float(x), 5) for x in np.asarray(out["sample_kd_sums"])[keep]]
    record["sample_kd_tokens"] = [int(x) for x in np.asarray(out["sample_kd_counts"])[keep]]
    return record


# ----------------------------------------------------------------------------- the mode


class Distillation(Mode):
  """``--teacher RUN_DIR``: the student of the command line trained from a teacher run."""

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
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
    g.add_argument(
      "--kd-kind",
      choices=KD_KINDS,
      help="divergence of --kd token: ce (default), kl, reverse_kl, jsd; reverse_kl and jsd "
      "need --fused",
    )
    g.add_argument(
      "--kd-beta", type=float, metavar="BETA", help="β of --kd-kind jsd (default: 0.5)"
    )

  def selected(self, args) -> bool:
    return args.teacher is not None

  def settings(self, args) -> dict[str, Any] | None:
    """``RunConfig.distill`` from parsed arguments (``None`` without ``--teacher``)."""
    given = given_options(
      args,
      ("kd_weight", "temperature", "kd", "kd_kind", "kd_beta"),
      enabled=self.selected(args),
      needs="--teacher RUN_DIR",
    )
    if not self.selected(args):
      return None
    renamed = {"kd_kind": "kind", "kd_beta": "beta"}
    given = {renamed.get(k, k): v for k, v in given.items()}
    return DistillConfig(teacher=os.path.abspath(args.teacher), **given).to_dict()

  def task(self, config, train_examples, out_dir: str, *, log=print) -> Distiller:
    settings = DistillConfig.from_dict(config.distill)
    return Distiller(settings, config, train_examples, out_dir, log=log)


MODE = Distillation(
  "distill",
  section="distill",
  files=("teacher_outputs.jsonl",),
  saved={k: k for k in ("teacher", "kd_weight", "temperature", "kd")},
  paths=("teacher",),
)
