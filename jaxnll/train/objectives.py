"""Training objectives: what the train step differentiates, in one protocol.

An objective is a hashable callable ``objective(model, batch) -> (numerator, aux)`` on one
micro-batch.  The train step (:mod:`jaxnll.train.step`) knows nothing else about it:

* it differentiates ``numerator`` (a float32 scalar: a *sum*, never a mean), adds numerators,
  denominators and gradients over micro-batches and devices and divides once by
  ``Σ aux["denominator"]`` — so accumulation reproduces the full batch exactly;
* it logs ``loss = Σ aux["loss_sum"] / Σ aux["denominator"]`` (``loss_sum`` defaults to the
  numerator's value; an objective whose differentiated value is not its logged loss — the
  selective mode — sets it);
* for every mean the objective declares (:attr:`Objective.means`: ``{logged name: X}``) it
  logs ``Σ X_sum / Σ X_count`` (``0`` when the count is 0) under that name — the name written
  into ``metrics.jsonl`` as it is —, and every other scalar entry as its sum over
  micro-batches;
* ``sample_*`` entries (``[B, S]``: one value per packed sample) are per-sample metrics,
  concatenated back into the order of the batch.

Everything in ``aux`` is float32 and already under ``stop_gradient`` where it is a value.
Supervised fine-tuning (:class:`SFT`: ``"subsequence"``, ``"selective"``, ``"full"``) is
here; distillation is :class:`jaxnll.train.modes.distill.Distill`.  Host-side work an objective
needs (its batches, teacher logits added to them, extra record fields, held-out figures) is a
:class:`Task`; the training modes that build them are :mod:`jaxnll.train.modes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnll import parallel
from jaxnll.nll import segment_nll, selective_sequence_nll, sequence_nll
from jaxnll.spans import shift_targets

F32 = jnp.float32
LOSS_MODES = ("subsequence", "selective", "full")
Batch = dict[str, Any]


def segment_counts(mask: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Mask weight per segment, ``f32[B, num_segments]`` (segment ``s`` in column ``s-1``)."""
  onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)
  return jnp.sum(jnp.where(onehot, mask[..., None].astype(F32), 0.0), axis=1)


def batch_masks(batch: Batch):
  """``(targets, target_mask, valid_mask, num_segments)`` of a data batch: the shifted
  targets, the target spans, every position predicting a token of its own sample."""
  tokens, span, seg = batch["tokens"], batch["span_mask"], batch["segment_ids"]
  targets, target_mask = shift_targets(tokens, span, seg)
  _, valid_mask = shift_targets(tokens, seg > 0, seg)
  return targets, target_mask, valid_mask, batch["sample_ids"].shape[-1]


def common_aux(batch: Batch, target_mask, valid_mask, sample_sums, num_segments) -> dict:
  """The entries every objective reports: per-sample target NLL and counts, the target
  loss (``target_sum`` / ``target_count``), ``full_count`` and ``tokens``."""
  seg = batch["segment_ids"]
  return {
    "sample_sums": sample_sums,
    "sample_counts": segment_counts(target_mask, seg, num_segments),
    "target_sum": jnp.sum(sample_sums),
    "target_count": jnp.sum(target_mask, dtype=F32),
    "full_count": jnp.sum(valid_mask, dtype=F32),
    "tokens": jnp.sum(seg > 0, dtype=F32),
  }


class Objective:
  """Base of the training objectives (see the module docstring for the protocol)."""

  #: The means the step logs: ``{logged name: X}`` for the aux pair ``X_sum`` / ``X_count``.
  means: ClassVar[Mapping[str, str]] = {"target_loss": "target", "full_loss": "full"}

  def __call__(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
  """Supervised fine-tuning: the NLL of the target spans, or of every token.

  Attributes:
    loss: ``"subsequence"`` trains ``-log Pr(y | x)`` over the target spans
      (:func:`jaxnll.sequence_nll`, per sample via :func:`jaxnll.segment_nll`);
      ``"selective"`` builds :func:`jaxnll.selective_sequence_nll` (value over every token,
      gradient of the target span; the whole-sequence value is logged as ``full_loss``);
      ``"full"`` is the whole-sequence language-model loss, the baseline.
    fused: the head and loss through :func:`jaxnll.linear_nll_loss` on the model's hidden
      states (no ``[B, T, V]`` logits); ``"subsequence"`` or ``"full"`` only.
  """

  loss: Literal["subsequence", "selective", "full"] = "subsequence"
  fused: bool = False

  def __post_init__(self):
    if self.loss not in LOSS_MODES:
      raise ValueError(f"loss must be one of {LOSS_MODES}, got {self.loss!r}")
    if self.fused and self.loss == "selective":
      raise ValueError("fused=True supports loss 'subsequence' or 'full', not 'selective'")

  def __call__(self, model: nnx.Module, batch: Batch):
    """The loss numerator of one micro-batch and its aux (module docstring).

    Args:
      model: a :mod:`jaxnll.train.model` language model.
      batch: ``tokens``, ``span_mask``, ``segment_ids``, ``positions`` ``[B, T]`` and
        ``sample_ids`` ``[B, S]`` (only its shape is read here: ``S`` segments a row).

    Returns:
      ``(numerator, aux)``: the summed NLL that is differentiated, and float32 entries
      ``denominator`` (trained positions), ``target_sum`` / ``target_count`` (target spans),
      ``full_sum`` / ``full_count`` (every position that predicts a token of its own sample;
      ``full_sum`` only in the selective and full modes), ``tokens`` (non-padding tokens),
      ``sample_sums`` / ``sample_counts`` ``[B, S]`` (per-sample target NLL and token count).
    """
    targets, target_mask, valid_mask, num_segments = batch_masks(batch)
    seg = batch["segment_ids"]
    train_mask = valid_mask if self.loss == "full" else target_mask
    kwargs = dict(segment_ids=seg, positions=batch["positions"], span_mask=target_mask)
    sg = jax.lax.stop_gradient
    extra = {}
    if self.fused:
      hidden = model(batch["tokens"], return_hidden=True, **kwargs)
      # A tied head is the [V, D] embedding table, read in place ("vd": no transposed copy).
      weight, layout = model.output_head()
      # Vocabulary-parallel (head split over ``model``) when the step runs under a mesh with a
      # ``model`` axis (:func:`jaxnll.parallel.head_loss`); the plain fused kernel otherwise.
      # One head pass: the per-sample target sums come from the loss's own per-token losses
      # (a trained position outside the target spans, in "full", is in no segment: id 0).
      numerator, sample_sums = parallel.head_loss(
        hidden, weight, targets, train_mask, normalize="sum", weight_layout=layout,
        segment_ids=jnp.where(target_mask, seg, 0), num_segments=num_segments,
      )  # fmt: skip
      sample_sums = sg(sample_sums)
      if self.loss == "full":
        extra["full_sum"] = sg(numerator)
    else:
      logits = model(batch["tokens"], **kwargs)
      if self.loss == "subsequence":
        sample_sums = segment_nll(logits, targets, target_mask, seg, num_segments=num_segments)
        numerator = jnp.sum(sample_sums)
        sample_sums = sg(sample_sums)
      else:
        sample_sums = segment_nll(sg(logits), targets, target_mask, seg, num_segments=num_segments)
        if self.loss == "selective":
          # Value: every valid token (for monitoring); gradient: the target spans only.
          rows = selective_sequence_nll(logits, targets, target_mask, valid_mask)
        else:
          rows = sequence_nll(logits, targets, valid_mask)
        numerator = jnp.sum(rows)
        extra["full_sum"] = sg(numerator)
    aux = common_aux(batch, target_mask, valid_mask, sample_sums, num_segments)
    aux.update(extra)
    aux["denominator"] = aux["full_count"] if self.loss == "full" else aux["target_count"]
    if self.loss == "selective":
      aux["loss_sum"] = aux["target_sum"]  # logged: the target loss, not the value trained
    return numerator, aux


class Task:
  """An objective together with what the run loop does for it on the host.

  :func:`jaxnll.train.loop.fit` trains any task the same way (checkpoints, records,
  resumption); a task says what the step differentiates (:attr:`objective`), which batches it
  sees (:meth:`stream`), what it adds to them before the step (:meth:`prepare`: a teacher's
  logits, a reference model's NLLs, sampled answers), what it adds to each step record
  (:meth:`annotate`) and the figures it reports before and after training (:meth:`report`).
  The default is supervised fine-tuning on the run's examples.
  """

  def __init__(self, objective: Objective):
    self.objective = objective

  def stream(self, samples, spec, *, seed: int, start_step: int = 0):
    """Endless batches from step ``start_step`` (reproducible from ``(seed, step)``)."""
    from jaxnll.train import data as data_lib

    return data_lib.train_stream(samples, spec, seed=seed, start_step=start_step)

  def prepare(self, batch: Batch, model: nnx.Module, step: int) -> Batch:
    """The host batch the objective reads at ``step`` (``model``: the current policy)."""
    del model, step
    return batch

  def annotate(self, record: dict[str, Any], out: dict[str, Any], sample_ids) -> dict[str, Any]:
    """Adds the task's own figures to a ``metrics.jsonl`` step record."""
    del out, sample_ids
    return record

  def report(self, model: nnx.Module) -> dict[str, float]:
    """Held-out figures of this task (written to ``summary.json`` as ``NAME_before`` and
    ``NAME_after``); none for plain fine-tuning, whose held-out NLL the loop reports."""
    del model
    return {}

  def initialize(self, model: nnx.Module) -> None:
    """Sets the parameters a new run starts from (a trained run's, for a mode that starts
    from one); called on the fresh model of a run at step 0, before it is sharded."""
    del model

  def plot(self, records: Sequence[dict[str, Any]], out_dir: str) -> None:
    """Writes the task's own plots into ``out_dir`` at the end of the run (the loop writes
    ``loss.png``)."""
    del records, out_dir


class TaskBuilder(Protocol):
  """What :func:`jaxnll.train.loop.fit` asks of a training mode (every mode of
  :mod:`jaxnll.train.modes` is one; the loop imports none)."""

  def examples(self, config) -> tuple[list, list]:
    """The run's ``(train, held-out)`` examples (held-out NLL, sample table)."""
    ...

  def task(self, config, train_examples: list, out_dir: str, *, log: Callable[[str], None]) -> Task:
    """The :class:`Task` of ``config``; may write the mode's input files into ``out_dir``
    (which exists, and has no ``config.json`` yet on a new run)."""
    ...
