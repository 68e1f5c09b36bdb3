"""Preference optimisation of a trained run: DPO, IPO, hinge, SimPO, ORPO on answer pairs.

``jaxnll train --loss dpo|ipo|simpo|orpo --init RUN_DIR [--beta B] [--data prefs.jsonl]``
starts the policy from the trained run in ``RUN_DIR`` (its latest checkpoint and its model
configuration) and trains it on pairs ``(x, y_w, y_l)`` of a prompt, a chosen and a rejected
answer with the per-pair losses of :mod:`jaxnll.preference`, from the per-sample NLL sums of
:func:`jaxnll.sequence_nll` (or, with ``--fused``, :func:`jaxnll.linear_sequence_nll`: no
``[B, T, V]`` logits).  For DPO / IPO / hinge the frozen reference model is that same run,
loaded once; its per-sample NLLs are computed on the host batch by a jitted forward outside
the differentiated step and enter it as data (``batch["ref_nll"]``), so no gradient reaches
it.

**Layout.** Pair ``i`` of a batch is rows ``2i`` (chosen) and ``2i + 1`` (rejected), one
sample a row; the rows of a step must split into micro-batches of whole pairs
(``rows % (2 · accum) == 0``; with the ``data`` axis of a mesh the per-device row count is
even too when ``rows % (2 · accum · devices) == 0``).  The loss is the mean over the non-empty
pairs of the step: the objective's numerator is the sum of the per-pair losses and its
denominator the number of pairs whose chosen and rejected spans are non-empty, so gradient
accumulation and data parallelism reproduce the full batch exactly.  ``--pack`` is refused:
a packed row would hold answers of several pairs, and the pair bookkeeping above is per row.

**Data.** JSONL records ``{"prompt", "chosen", "rejected"}`` or chat records ``{"messages"}``
whose last turn is ``{"role": "assistant", "chosen": ..., "rejected": ...}``
(:func:`load_pairs`; a malformed line is reported as ``file:LINE``), split 9:1 like SFT data
(every 10th pair held out).  Without ``--data`` the **embedded preference set**
(:func:`embedded_pairs`) pairs every example of the embedded SFT set (chosen: its reference
answer) with a plausible wrong answer (:func:`wrong_answer`): a sum or difference off by 1-3,
a reversal with two adjacent letters swapped, one word of a copy replaced, one word of an
upper-cased phrase left in lower case, a translation with the wrong adjective or noun from
the phrase table, a look-up answered with another person's count; held out: the embedded
held-out split.  The run's ``data`` is the chosen answers (so the loop's held-out NLL and
greedy table are those of the chosen answers on the held-out prompts).

**Held-out figures** (``summary.json``, ``_before`` / ``_after``):

* ``preference_accuracy`` — the fraction of held-out pairs the *policy* ranks right:
  ``-log π(y_w|x) < -log π(y_l|x)`` (whole-answer NLL sums, ties wrong).  The same definition
  for every loss kind, so the kinds are comparable and the figure before training is the SFT
  model's own ranking.
* ``reward_accuracy`` — the loss kind's own implicit-reward ranking: DPO / IPO / hinge
  ``β[(ref_nll_w − nll_w) − (ref_nll_l − nll_l)] > 0`` (exactly 0 before training, where the
  policy is the reference); SimPO / ORPO: per-token mean NLL of the chosen answer below the
  rejected one's (for ORPO: the odds ratio favours the chosen answer).
* ``reward_margin`` (mean implicit margin), ``chosen_nll`` and ``rejected_nll`` (nats per
  target token of the held-out chosen / rejected answers).

Logged per step (``metrics.jsonl``): ``loss`` (mean pair loss), ``accuracy``, ``margin``,
``chosen_reward``, ``rejected_reward`` (means over the step's pairs), ``chosen_nll`` /
``rejected_nll`` (per target token), and the per-row ``sample_nll``; plot: ``margins.png``.

References: see :mod:`jaxnll.preference` (Rafailov et al. 2023; Azar et al. 2023; Meng et al.
2024; Hong et al. 2024; Mitchell 2023).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnll import parallel
from jaxnll import preference as pref
from jaxnll.nll import sequence_nll
from jaxnll.train import data as data_lib
from jaxnll.train.model import count_params
from jaxnll.train.modes.base import Mode, copy_params, given_options, start_model
from jaxnll.train.objectives import Objective, Task, batch_masks, common_aux
from jaxnll.train.run import RunConfig, load_examples, load_run
from jaxnll.train.step import eval_step

F32 = jnp.float32
KINDS = ("dpo", "ipo", "hinge", "simpo", "orpo")
CLI_KINDS = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_KINDS = ("dpo", "ipo", "hinge")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0, "orpo": 0.1}
#: Defaults of a preference run (``jaxnll train --loss dpo`` without ``--steps`` / ``--lr``): the
#: smallest learning rate tried on the demo, which moves the chosen answers' NLL least.  They do
#: NOT meet the issue's target (held-out preference accuracy +10 points): measured from the
#: ``make demo`` run (400 packed steps, held-out NLL 0.622) on a shared 2-core CPU, ``--loss
#: dpo`` took held-out preference accuracy 73.1% -> 71.1% (82 s); lr 2e-4 for 150 steps gave
#: 69.4%.  The pairs the demo ranks wrong are in the families it cannot solve (add, subtract,
#: reverse, look-up: 42-64% right); copy, translate and upper are at 98-100%.  Three times the
#: SFT compute ranks 74.3% right, so the gap is skill, not the preference loss (README).
DEFAULT_STEPS = 60
DEFAULT_LR = 5e-5
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """Preference-training settings (JSON-friendly; saved in the run's ``config.json``).

  Attributes:
    init: run directory of the trained start (``config.json`` + ``checkpoints/``); the policy
      starts from it and, for DPO / IPO / hinge, it is the frozen reference.
    kind: ``"dpo"``, ``"ipo"``, ``"hinge"``, ``"simpo"`` or ``"orpo"``.
    beta: ``β`` of the loss (None: 0.1, SimPO 2.0).
    gamma: SimPO's target margin ``γ``.
    label_smoothing: conservative DPO's ``ε`` (kind ``"dpo"`` only).
    data: JSONL file of preference pairs (None: the embedded set).
  """

  init: str
  kind: str = "dpo"
  beta: float | None = None
  gamma: float = 0.5
  label_smoothing: float = 0.0
  data: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"preference kind (--loss) must be one of {KINDS}, got {self.kind!r}")
    beta = DEFAULT_BETA[self.kind] if self.beta is None else self.beta
    if not (np.isfinite(beta) and beta > 0):
      raise ValueError(f"--beta must be a finite float > 0, got {beta!r}")
    if not np.isfinite(self.gamma):
      raise ValueError(f"--gamma must be finite, got {self.gamma!r}")
    if not 0.0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.kind != "dpo"):
      raise ValueError(
        f"--label-smoothing must be in [0, 0.5) and only with --loss dpo, got "
        f"{self.label_smoothing!r} for {self.kind!r}"
      )
    object.__setattr__(self, "beta", float(beta))

  @property
  def uses_reference(self) -> bool:
    return self.kind in REFERENCE_KINDS

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PreferenceConfig:
    return cls(**d)


# ----------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True)
class Pair:
  """A prompt (the turns before the answer) with a chosen and a rejected answer."""

  context: tuple[data_lib.Message, ...]
  chosen: str
  rejected: str
  family: str = ""
  source: str = ""

  def example(self, which: str) -> data_lib.Example:
    """The conversation ending with the chosen (``"chosen"``) or rejected answer."""
    answer = self.chosen if which == "chosen" else self.rejected
    turns = self.context + (data_lib.Message("assistant", answer),)
    return data_lib.Example(turns, family=self.family, source=self.source)


def _swap_two(rng: random.Random, word: str) -> str:
  """``word`` with two adjacent, different letters swapped (or one letter changed)."""
  spots = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
  if not spots:
    i = int(rng.random() * len(word))
    return word[:i] + ("a" if word[i] != "a" else "b") + word[i + 1 :]
  i = spots[int(rng.random() * len(spots))]
  return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _other(rng: random.Random, options: Sequence[str], not_this: str) -> str:
  rest = [o for o in options if o != not_this]
  return rest[int(rng.random() * len(rest))]


def _wrong_translation(rng: random.Random, spanish: str) -> str:
  words = spanish.split()  # article, noun, adjective
  adjectives = sorted({a for pair in data_lib._ADJECTIVES.values() for a in pair})
  if rng.random() < 0.5:
    plural = words[0] in ("los", "las")
    forms = [a + "s" if plural else a for a in adjectives]
    words[2] = _other(rng, forms, words[2])
  else:
    plural = words[0] in ("los", "las")
    nouns = sorted(n[2] if plural else n[0] for n in data_lib._NOUNS.values())
    words[1] = _other(rng, nouns, words[1])
  return " ".join(words)


def wrong_answer(example: data_lib.Example, rng: random.Random) -> str:
  """A plausible wrong answer to an embedded example (module docstring), never the right one."""
  family, prompt, right = example.family, example.prompt, example.response
  if family in ("add", "subtract"):
    value = int(right)
    offsets = [d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
    wrong = str(value + offsets[int(rng.random() * len(offsets))])
  elif family == "reverse":
    wrong = _swap_two(rng, right)
  elif family == "copy":
    words = right.split()
    i = int(rng.random() * len(words))
    words[i] = _other(rng, data_lib._WORDS, words[i])
    wrong = " ".join(words)
  elif family == "upper":
    words = right.split()
    i = int(rng.random() * len(words))
    words[i] = words[i].lower()
    wrong = " ".join(words)
  elif family == "translate":
    wrong = _wrong_translation(rng, right)
  elif family == "lookup":
    numbers = {int(n.rstrip(".")) for n in prompt.split() if n.rstrip(".").isdigit()}
    counts = sorted(numbers - {int(right)})
    counts = [str(c) for c in counts] or [str(int(right) % 9 + 1)]
    wrong = counts[int(rng.random() * len(counts))]
  else:
    raise ValueError(f"no wrong-answer rule for family {family!r}")
  if wrong == right:  # (cannot happen with the rules above; kept as a guard)
    wrong = right + right[-1]
  return wrong


def embedded_pairs(split: str = "train", *, seed: int = 20250102) -> list[Pair]:
  """The embedded preference set: every embedded example with a plausible wrong answer.

  ``split`` is ``"train"``, ``"heldout"`` (the embedded held-out examples) or ``"all"``;
  deterministic.

  Examples:
    >>> pair = embedded_pairs("heldout")[252]
    >>> pair.family, pair.chosen, pair.rejected != pair.chosen
    ('translate', 'el perro negro', True)
  """
  examples = data_lib.embedded_examples("all")
  pairs = []
  for i, ex in enumerate(examples):
    rng = random.Random(seed * 10_007 + i)
    context = ex.messages[:-1]
    pairs.append(Pair(context, ex.response, wrong_answer(ex, rng), ex.family, ex.source))
  return data_lib.split_examples(pairs, split)


def _pair_record(record, where: str) -> Pair:
  DataError = data_lib.DataError
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise DataError(f"{where}: 'messages' must be a non-empty list")
    last = messages[-1]
    if not (isinstance(last, dict) and last.get("role") == "assistant"):
      raise DataError(f"{where}: the last message must be the assistant turn with versions")
    answers = [last.get(k) for k in ("chosen", "rejected")]
    context = tuple(data_lib._message(where, i, m) for i, m in enumerate(messages[:-1]))
  elif "prompt" in record:
    answers = [record.get(k) for k in ("chosen", "rejected")]
    prompt = record["prompt"]
    if not isinstance(prompt, str):
      raise DataError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    context = (data_lib.Message("user", prompt),)
  else:
    raise DataError(
      f"{where}: expected {{'prompt', 'chosen', 'rejected'}} or {{'messages'}} whose last "
      f"assistant turn has 'chosen' and 'rejected', got keys {sorted(record)}"
    )
  for key, value in zip(("chosen", "rejected"), answers, strict=True):
    if value is None:
      raise DataError(f"{where}: no {key!r} answer")
    if not isinstance(value, str):
      raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
  return Pair(context, answers[0], answers[1], family="jsonl", source=where)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
  """Reads preference pairs from JSONL (module docstring); blank lines are skipped.

  Raises:
    jaxnll.train.data.DataError: a missing or empty file, invalid JSON or a malformed record,
      naming ``file:LINE``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise data_lib.DataError(f"{path}: no such file")
  pairs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise data_lib.DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      pairs.append(_pair_record(record, where))
  if not pairs:
    raise data_lib.DataError(f"{path}: no records")
  return pairs


def write_pairs(pairs: Sequence[Pair], path: str | os.PathLike) -> None:
  """Writes pairs as ``{"prompt", "chosen", "rejected"}`` records (a one-user-turn context)
  or chat records whose last turn holds both versions (readable with :func:`load_pairs`)."""
  with open(path, "w", encoding="utf-8") as f:
    for p in pairs:
      if len(p.context) == 1 and p.context[0].role == "user":
        record = {"prompt": p.context[0].content, "chosen": p.chosen, "rejected": p.rejected}
      else:
        turns = [{"role": m.role, "content": m.content} for m in p.context]
        turns.append({"role": "assistant", "chosen": p.chosen, "rejected": p.rejected})
        record = {"messages": turns}
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def split_pairs(pairs: Sequence[Pair], split: str) -> list[Pair]:
  """Every 10th pair held out (all of them for fewer than 2), as SFT data is split."""
  if len(pairs) < 2:
    return list(pairs)
  return data_lib.split_examples(pairs, split)


def pair_samples(pairs: Sequence[Pair], length: int) -> list[tuple[data_lib.Sample, ...]]:
  """``(chosen, rejected)`` encoded samples of each pair (:func:`jaxnll.train.data.encode`)."""
  out = []
  for p in pairs:
    c, r = (data_lib.encode(p.example(w)) for w in ("chosen", "rejected"))
    if max(len(c[0]), len(r[0])) > length:
      raise data_lib.DataError(f"{p.source or 'pair'}: longer than the row length {length}")
    out.append((c, r))
  return out


def fits(pair: Pair, length: int) -> bool:
  return all(len(data_lib.encode(pair.example(w))[0]) <= length for w in ("chosen", "rejected"))


def pair_batch(samples, ids: Sequence[int], *, rows: int, length: int) -> Batch:
  """Pairs ``ids`` as rows ``2i`` (chosen) and ``2i + 1`` (rejected); empty rows after.

  ``sample_ids`` of row ``2i + j`` is ``2 · pair + j``.
  """
  flat = [s for i in ids for s in samples[i]]
  flat_ids = [2 * i + j for i in ids for j in (0, 1)]
  return data_lib.pad_batch(flat, flat_ids, rows=rows, length=length)


def pair_stream(
  samples, spec: data_lib.BatchSpec, *, seed: int, start_step: int = 0
) -> Iterator[data_lib.Step]:
  """Endless shuffled epochs of pair batches, reproducible from ``(seed, step)`` (as
  :func:`jaxnll.train.data.train_stream`)."""
  if not samples:
    raise ValueError("no training pairs")
  per = spec.rows // 2
  step, epoch = 0, 0
  while True:
    order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(samples))]
    starts = range(0, len(order), per)
    for k, s in enumerate(starts):
      if step >= start_step:
        batch = pair_batch(samples, order[s : s + per], rows=spec.rows, length=spec.length)
        yield data_lib.Step(epoch, k == len(starts) - 1, batch)
      step += 1
    epoch += 1


# ----------------------------------------------------------------------------- the objective


def _pairs(x):
  """``[B]`` rows to ``(chosen [P], rejected [P])`` (rows 2i, 2i + 1)."""
  x = x.reshape(-1, 2)
  return x[:, 0], x[:, 1]


@dataclasses.dataclass(frozen=True)
class Preference(Objective):
  """The summed per-pair preference loss of one micro-batch, and its aux.

  An objective of :mod:`jaxnll.train.objectives`: the numerator is ``Σ`` per-pair loss, the
  denominator the number of non-empty pairs.  Besides the entries of
  :func:`~jaxnll.train.objectives.common_aux` (per-row NLL as ``sample_sums``) it reports
  ``accuracy_sum`` / ``accuracy_count``, ``margin_*``, ``chosen_reward_*``,
  ``rejected_reward_*`` (sums over pairs and the pair count) and ``chosen_nll_*`` /
  ``rejected_nll_*`` (NLL sums and target tokens), and per row ``sample_pair_loss``,
  ``sample_margin`` and ``sample_ranked_right`` ``[B, 1]`` (the pair's value on both rows).
  Reads ``batch["ref_nll"]`` ``[B]`` (reference NLL per row) for DPO / IPO / hinge.
  """

  kind: str = "dpo"
  beta: float = 0.1
  gamma: float = 0.5
  label_smoothing: float = 0.0
  fused: bool = False
  means: ClassVar = {
    **Objective.means,
    **{n: n for n in ("accuracy", "margin", "chosen_reward", "rejected_reward")},
    **{n: n for n in ("chosen_nll", "rejected_nll")},
  }

  def pair_losses(self, nll, counts, ref_nll=None):
    """Per-pair losses and :func:`jaxnll.preference_metrics` from per-row NLL and counts."""
    (c, r), (cc, rc) = _pairs(nll), _pairs(counts)
    if self.kind in REFERENCE_KINDS:
      ref_c, ref_r = _pairs(jax.lax.stop_gradient(ref_nll))
      kind = {"dpo": "sigmoid"}.get(self.kind, self.kind)
      loss = pref.dpo_loss(
        c,
        r,
        ref_c,
        ref_r,
        beta=self.beta,
        kind=kind,
        label_smoothing=self.label_smoothing,
        chosen_count=cc,
        rejected_count=rc,
      )
      metrics = pref.preference_metrics(
        c, r, ref_c, ref_r, beta=self.beta, chosen_count=cc, rejected_count=rc
      )
    else:
      if self.kind == "simpo":
        loss = pref.simpo_loss(c, cc, r, rc, beta=self.beta, gamma=self.gamma)
      else:
        loss = pref.orpo_loss(c, cc, r, rc, beta=self.beta)
      metrics = pref.preference_metrics(
        c, r, beta=self.beta, chosen_count=cc, rejected_count=rc, length_normalize=True
      )
    return loss, metrics

  def __call__(self, model: nnx.Module, batch: Batch):
    targets, target_mask, valid_mask, num_segments = batch_masks(batch)
    if num_segments != 1:
      raise ValueError("preference batches hold one sample a row (no packing)")
    kwargs = dict(
      segment_ids=batch["segment_ids"], positions=batch["positions"], span_mask=target_mask
    )
    if self.fused:
      hidden = model(batch["tokens"], return_hidden=True, **kwargs)
      weight, layout = model.output_head()  # a tied [V, D] table is read in place
      nll = parallel.head_sequence_nll(hidden, weight, targets, target_mask, weight_layout=layout)
    else:
      nll = sequence_nll(model(batch["tokens"], **kwargs), targets, target_mask)
    counts = jnp.sum(target_mask, axis=-1, dtype=F32)
    loss, m = self.pair_losses(nll, counts, batch.get("ref_nll"))
    sg = jax.lax.stop_gradient
    valid = m["valid"]
    n = jnp.sum(valid, dtype=F32)
    (c, r), (cc, rc) = _pairs(sg(nll)), _pairs(counts)
    both = lambda x: jnp.repeat(x.astype(F32), 2)[:, None]
    aux = common_aux(batch, target_mask, valid_mask, sg(nll)[:, None], 1)
    aux.update(
      denominator=n,
      accuracy_sum=jnp.sum(m["ranked_right"], dtype=F32),
      accuracy_count=n,
      margin_sum=jnp.sum(m["margin"]),
      margin_count=n,
      chosen_reward_sum=jnp.sum(m["chosen_reward"]),
      chosen_reward_count=n,
      rejected_reward_sum=jnp.sum(m["rejected_reward"]),
      rejected_reward_count=n,
      chosen_nll_sum=jnp.sum(jnp.where(valid, c, 0.0)),
      chosen_nll_count=jnp.sum(jnp.where(valid, cc, 0.0)),
      rejected_nll_sum=jnp.sum(jnp.where(valid, r, 0.0)),
      rejected_nll_count=jnp.sum(jnp.where(valid, rc, 0.0)),
      sample_pair_loss=both(sg(loss)),
      sample_margin=both(m["margin"]),
      sample_ranked_right=both(m["ranked_right"]),
    )
    return jnp.sum(loss), aux


# ----------------------------------------------------------------------------- the run glue


def sequence_nlls(model, samples: Sequence[data_lib.Sample], spec, *, fused=False):
  """Per-sample NLL sums and target counts (float64 ``[N]``) of ``samples`` under ``model``."""
  sums, counts = np.zeros(len(samples)), np.zeros(len(samples))
  for batch in data_lib.eval_batches(samples, spec):
    s, c = jax.device_get(eval_step(model, batch, fused=fused))
    ids = batch["sample_ids"][:, 0]
    sums[ids[ids >= 0]] = s[ids >= 0, 0]
    counts[ids[ids >= 0]] = c[ids >= 0, 0]
  return sums, counts


def pair_figures(kind: str, beta: float, sums, counts, ref_sums=None) -> dict[str, float]:
  """Held-out figures (module docstring) from per-row NLL sums / counts of the pair rows
  (chosen at even, rejected at odd positions) and, for DPO-style kinds, the reference's."""
  c, r, cc, rc = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
  if kind in REFERENCE_KINDS:
    margin = beta * ((ref_sums[0::2] - c) - (ref_sums[1::2] - r))
  else:
    margin = beta * (r / np.maximum(rc, 1) - c / np.maximum(cc, 1))
  return {
    "preference_accuracy": float(np.mean(c < r)),
    "reward_accuracy": float(np.mean(margin > 0)),
    "reward_margin": float(np.mean(margin)),
    "chosen_nll": float(c.sum() / max(cc.sum(), 1)),
    "rejected_nll": float(r.sum() / max(rc.sum(), 1)),
  }


def check_run(run: RunConfig) -> None:
  """Refuses run settings a preference run cannot keep (one line naming the flag)."""
  if run.batch.pack:
    raise ValueError(
      "preference training keeps each pair's chosen and rejected answers in adjacent rows "
      "(2i, 2i+1) of one micro-batch; packed rows are not supported: drop --pack"
    )
  if run.train.loss != "subsequence":
    raise ValueError(f"preference training needs train.loss 'subsequence', got {run.train.loss}")
  if run.batch.rows % (2 * run.train.accum):
    raise ValueError(
      f"batch rows ({run.batch.rows}) must be divisible by 2 × accum ({run.train.accum}): "
      "every micro-batch holds whole pairs"
    )
  if jax.process_count() > 1:
    raise ValueError("preference training runs in a single process (any device mesh there)")


class PreferenceTask(Task):
  """What :func:`jaxnll.train.loop.fit` needs to train a policy on preference pairs.

  * :attr:`objective` (a :class:`Preference`);
  * :meth:`stream`: pair batches (rows ``2i``, ``2i + 1``) of the training pairs;
  * :meth:`prepare`: adds the reference model's per-row NLL (``ref_nll``) for DPO / IPO /
    hinge — a jitted forward of the frozen init run, outside the differentiated step;
  * :meth:`annotate`: the preference figures of each ``metrics.jsonl`` record;
  * :meth:`report`: held-out pair figures (``preference_accuracy``, ...).
  """

  def __init__(self, config: PreferenceConfig, run, out_dir: str, *, log=print):
    check_run(run)
    self.config = config
    self.fused = run.train.fused
    super().__init__(
      Preference(
        kind=config.kind,
        beta=config.beta,
        gamma=config.gamma,
        label_smoothing=config.label_smoothing,
        fused=self.fused,
      )
    )
    length = run.batch.length
    self.spec = dataclasses.replace(run.batch, pack=False)
    if config.data is None:
      train, heldout = embedded_pairs("train"), embedded_pairs("heldout")
    else:
      pairs = load_pairs(config.data)
      train, heldout = split_pairs(pairs, "train"), split_pairs(pairs, "heldout")
    train = [p for p in train if fits(p, length)]
    heldout = [p for p in heldout if fits(p, length)]
    self.train_samples = pair_samples(train, length)
    self.heldout = heldout
    self.heldout_rows = [s for pair in pair_samples(heldout, length) for s in pair]
    # The policy starts from the --init run; for DPO / IPO / hinge it is the frozen reference.
    self.start, step = start_model(config.init, run)
    self.reference = self.start if config.uses_reference else None
    self.ref_heldout = None
    log(
      f"policy: from {config.init} (step {step})"
      + (f"; reference: {count_params(self.start):,} parameters" if self.reference else "")
    )
    log(
      f"preference: {config.kind}, β={config.beta}"
      + (f", γ={config.gamma}" if config.kind == "simpo" else "")
      + f"; {len(self.train_samples)} training / {len(heldout)} held-out pairs"
    )
    if run.data is not None and not os.path.exists(run.data):  # for `jaxnll eval --run`
      data_lib.write_jsonl([p.example("chosen") for p in load_pairs(config.data)], run.data)

  def initialize(self, model) -> None:
    copy_params(self.start, model)

  def stream(self, samples, spec, *, seed: int, start_step: int = 0):
    del samples
    return pair_stream(self.train_samples, self.spec, seed=seed, start_step=start_step)

  def prepare(self, batch: Batch, model=None, step: int = 0) -> Batch:
    if self.reference is None:
      return batch
    sums, _ = eval_step(self.reference, batch, fused=self.fused)
    return {**batch, "ref_nll": np.asarray(jax.device_get(sums))[:, 0]}

  def annotate(self, record: dict[str, Any], out: dict[str, Any], sample_ids) -> dict[str, Any]:
    """Adds the number of pairs and the per-row ``sample_pair_loss`` (``accuracy``,
    ``margin``, ... are the objective's means, recorded by the loop)."""
    record["pairs"] = int(out["accuracy_count"])
    keep = np.asarray(sample_ids)[:, 0] >= 0
    record["sample_pair_loss"] = [
      round(float(x), 5) for x in np.asarray(out["sample_pair_loss"])[keep, 0]
    ]
    return record

  def report(self, model) -> dict[str, float]:
    sums, counts = sequence_nlls(model, self.heldout_rows, self.spec, fused=self.fused)
    if self.reference is not None and self.ref_heldout is None:
      # The reference scored like the policy — same head path, same placement of the
      # parameters — so that at the start, where the two are equal, every margin is exactly
      # 0 (not ± rounding, which a sharded and an unsharded evaluation differ by).
      placed = _placed_like(self.reference, model)
      self.ref_heldout = sequence_nlls(placed, self.heldout_rows, self.spec, fused=self.fused)[0]
    return pair_figures(self.config.kind, self.config.beta, sums, counts, self.ref_heldout)

  def plot(self, records, out_dir: str) -> None:
    plot_margins(records, out_dir)


def _placed_like(model: nnx.Module, like: nnx.Module) -> nnx.Module:
  """``model`` with each array on the devices and with the sharding of ``like``'s."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  targets = jax.tree.leaves(nnx.state(like))
  placed = [jax.device_put(x, t.sharding) for x, t in zip(leaves, targets, strict=True)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, placed))


def plot_margins(records: Sequence[dict[str, Any]], out_dir: str) -> str:
  """``margins.png``: the implicit reward margin and the pair accuracy per step."""
  from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

  path = os.path.join(out_dir, "margins.png")
  steps = [r["step"] for r in records]
  fig = Figure(figsize=(10, 4), dpi=110)
  a, b = fig.subplots(1, 2)
  a.plot(steps, [r.get("margin", np.nan) for r in records], lw=0.8, label="margin")
  a.plot(steps, [r.get("chosen_reward", np.nan) for r in records], lw=0.8, label="chosen reward")
  a.plot(steps, [r.get("rejected_reward", np.nan) for r in records], lw=0.8, label="rejected")
  a.set_xlabel("step")
  a.set_title("implicit rewards (training batches)")
  a.legend(fontsize=8)
  a.grid(alpha=0.3)
  b.plot(steps, [r.get("accuracy", np.nan) for r in records], lw=0.8, color="tab:green")
  b.set_ylim(0, 1.02)
  b.set_xlabel("step")
  b.set_title("pairs ranked right (training batches)")
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  return path


# ----------------------------------------------------------------------------- the mode


class PreferenceMode(Mode):
  """``--loss dpo|ipo|simpo|orpo --init RUN_DIR``: a trained run optimised on answer pairs."""

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
      "preference optimisation (--loss dpo|ipo|simpo|orpo: train a trained run on answer pairs)"
    )
    g.add_argument("--beta", type=float, help="β of the loss (default: 0.1; simpo 2.0)")
    g.add_argument("--gamma", type=float, help="SimPO's target margin γ (default: 0.5)")
    g.add_argument(
      "--label-smoothing", type=float, help="conservative DPO's ε in [0, 0.5) (default: 0)"
    )

  def selected(self, args) -> bool:
    return args.loss in KINDS

  def settings(self, args) -> dict[str, Any] | None:
    """``RunConfig.preference`` from parsed arguments (``None`` for the other losses)."""
    given = given_options(
      args,
      ("beta", "gamma", "label_smoothing"),
      enabled=self.selected(args),
      needs="--loss dpo|ipo|simpo|orpo",
    )
    if not self.selected(args):
      return None
    if args.init is None:
      raise ValueError(f"--loss {args.loss} needs --init RUN_DIR (a trained run to start from)")
    data = None if args.data is None else os.path.abspath(args.data)
    return PreferenceConfig(
      init=os.path.abspath(args.init), kind=args.loss, data=data, **given
    ).to_dict()

  def configure(self, config: RunConfig, settings, out_dir: str) -> RunConfig:
    """``config`` for a preference run: the init run's model and row length, and as ``data``
    the chosen answers (``out_dir/chosen.jsonl``, written when the run starts, for a pairs
    file; the embedded SFT set, whose answers are the chosen ones, otherwise)."""
    p = PreferenceConfig.from_dict(settings)
    init = load_run(p.init, weights=False).config
    batch = dataclasses.replace(config.batch, length=init.batch.length)
    data = None if p.data is None else os.path.join(os.path.abspath(out_dir), "chosen.jsonl")
    config = dataclasses.replace(
      config, model=init.model, batch=batch, data=data, preference=settings
    )
    check_run(config)  # before the run loop's own checks: the pair layout's reasons first
    return config

  def loss(self, config: RunConfig) -> str:
    return config.preference["kind"]

  def data(self, config: RunConfig) -> str | None:
    return config.preference["data"]

  def examples(self, config: RunConfig):
    """The chosen answers of the pairs, split like the pairs (the embedded SFT set)."""
    p = PreferenceConfig.from_dict(config.preference)
    if p.data is None:
      return load_examples(None)
    chosen = [q.example("chosen") for q in load_pairs(p.data)]
    if len(chosen) < 10:
      raise data_lib.DataError(
        f"{p.data}: {len(chosen)} pair(s); every tenth pair is held out for evaluation, so at "
        "least 10 are needed"
      )
    return data_lib.split_examples(chosen, "train"), data_lib.split_examples(chosen, "heldout")

  def task(self, config: RunConfig, train_examples, out_dir: str, *, log=print):
    del train_examples
    settings = PreferenceConfig.from_dict(config.preference)
    return PreferenceTask(settings, config, out_dir, log=log)


MODE = PreferenceMode(
  "preference",
  section="preference",
  losses=CLI_KINDS,
  files=("margins.png", "chosen.jsonl"),
  defaults={"steps": DEFAULT_STEPS, "learning_rate": DEFAULT_LR},
  saved={k: k for k in ("beta", "gamma", "label_smoothing", "init")},
  paths=("init",),
)
