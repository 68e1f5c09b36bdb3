"""Tests for jaxnll/train/modes/distill.py: the objective, teacher answers, `--teacher`."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnll
from jaxnll import cli, train
from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train.model import ModelConfig, make_model
from jaxnll.train.modes import distill as distill_train
from jaxnll.train.modes.distill import DistillConfig

TINY = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32)
SPEC = data_lib.BatchSpec(rows=6, length=64, pack=True, segments=4)


def _batch(spec=SPEC, n=12):
  examples = [ex for ex in data_lib.embedded_examples("train") if len(data_lib.encode(ex)[0]) <= 64]
  samples = data_lib.encode_all(examples[::41][:n], 64)
  return next(iter(data_lib.epoch_batches(samples, spec, range(n)))), examples[::41][:n]


def _grads(fn, model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = lambda p: fn(nnx.merge(graphdef, p, rest), batch)  # noqa: E731
  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def _assert_grads_close(got, want):
  """Gradient leaves equal up to float32 summation order: relative 1e-4, and absolute 1e-5 of
  the leaf's largest entry (entries that cancel to near 0 keep the others' rounding)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


def _config(**kw):
  return DistillConfig(teacher="unused", **kw)


# ----------------------------------------------------------------------------- the objective


def test_alpha_zero_is_the_plain_training_loss():
  batch, _ = _batch()
  model = make_model(TINY, seed=0)
  teacher_logits = make_model(TINY, seed=1)(batch["tokens"], segment_ids=batch["segment_ids"])
  kd_batch = {**batch, "teacher_logits": teacher_logits}
  obj = distill_train.Distill(_config(kd_weight=0.0, temperature=3.0))
  (num, aux), g = _grads(obj, model, kd_batch)
  (num_ref, aux_ref), g_ref = _grads(lambda m, b: train.SFT()(m, b), model, batch)
  np.testing.assert_allclose(num, num_ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for key in aux_ref:  # every aux entry the train step reads means the same
    np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-6, err_msg=key)


def test_token_objective_is_mixed_nll_and_tau_squared_kd():
  batch, _ = _batch()
  model, teacher = make_model(TINY, seed=0), make_model(TINY, seed=1)
  lay = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
  teacher_logits = teacher(batch["tokens"], **lay)
  alpha, tau = 0.6, 2.0
  num, aux = distill_train.Distill(_config(kd_weight=alpha, temperature=tau))(
    model, {**batch, "teacher_logits": teacher_logits}
  )
  targets, mask = shift_targets(batch["tokens"], batch["span_mask"], batch["segment_ids"])
  logits = model(batch["tokens"], **lay)
  nll = jaxnll.sequence_nll(logits, targets, mask).sum()
  kd = jaxnll.distill_cross_entropy(logits, teacher_logits, mask, temperature=tau).sum()
  np.testing.assert_allclose(num, (1 - alpha) * nll + alpha * tau**2 * kd, rtol=1e-5)
  np.testing.assert_allclose(aux["kd_sum"], kd, rtol=1e-5)
  np.testing.assert_allclose(aux["denominator"], mask.sum(), rtol=1e-6)
  # Per sample: one value per packed segment, summing to the row totals.
  for s in range(SPEC.segments):
    seg_mask = mask & (batch["segment_ids"] == s + 1)
    want = jaxnll.distill_cross_entropy(logits, teacher_logits, seg_mask, temperature=tau)
    np.testing.assert_allclose(aux["sample_kd_sums"][:, s], want, rtol=1e-5, atol=1e-5)
  # The teacher gets no gradient even if it is differentiated through.
  g = jax.grad(
    lambda t: distill_train.Distill(_config())(model, {**batch, "teacher_logits": t})[0]
  )(teacher_logits)
  np.testing.assert_array_equal(g, 0.0)


def test_sequence_objective_is_the_nll_of_the_teacher_answers():
  spec = dataclasses.replace(SPEC, pack=False)
  batch, examples = _batch(spec, n=6)
  answers = [[97, 98], [], [99] * 5, [100], [101, 102, 103], [104]]
  samples = [
    distill_train.answer_sample(ex, a, 64) for ex, a in zip(examples, answers, strict=True)
  ]
  kd = data_lib.pad_batch(samples, list(range(6)), rows=6, length=64)
  full = {
    **batch,
    **{f"kd_{k}": kd[k] for k in ("tokens", "span_mask", "segment_ids", "positions")},
  }
  model = make_model(TINY, seed=0)
  alpha = 0.25
  num, aux = distill_train.Distill(_config(kd="sequence", kd_weight=alpha))(model, full)
  kd_targets, kd_mask = shift_targets(kd["tokens"], kd["span_mask"], kd["segment_ids"])
  kd_nll = jaxnll.sequence_nll(
    model(kd["tokens"], segment_ids=kd["segment_ids"]), kd_targets, kd_mask
  )
  np.testing.assert_allclose(aux["sample_kd_sums"][:, 0], kd_nll, rtol=1e-5)
  # Each answer's span is its tokens plus EOS.
  np.testing.assert_array_equal(aux["sample_kd_counts"][:, 0], [len(a) + 1 for a in answers])
  targets, mask = shift_targets(batch["tokens"], batch["span_mask"], batch["segment_ids"])
  nll = jaxnll.sequence_nll(model(batch["tokens"], segment_ids=batch["segment_ids"]), targets, mask)
  np.testing.assert_allclose(num, (1 - alpha) * nll.sum() + alpha * kd_nll.sum(), rtol=1e-5)
  want_den = (1 - alpha) * float(mask.sum()) + alpha * sum(len(a) + 1 for a in answers)
  np.testing.assert_allclose(aux["denominator"], want_den, rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_token_objective_equals_the_logits_path(tied):
  """``--fused``: the teacher's hidden states and frozen head in place of its logits give the
  logits path's numerator, aux (per packed sample) and student gradients (``ce``), and the
  teacher's head receives no gradient."""
  batch, _ = _batch()
  # A wider teacher (D_t = 24) than the student (D_s = 16); tied or untied student head.
  model = make_model(dataclasses.replace(TINY, tie_embeddings=tied), seed=0)
  teacher = make_model(dataclasses.replace(TINY, d_model=24, tie_embeddings=not tied), seed=1)
  lay = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
  hidden = teacher(batch["tokens"], return_hidden=True, **lay)
  head = distill_train.TeacherHead(*teacher.output_head())
  config = _config(kd_weight=0.6, temperature=2.0)
  fused = distill_train.Distill(config, head)
  plain = distill_train.Distill(config)
  (num, aux), g = _grads(fused, model, {**batch, "teacher_hidden": hidden})
  (num_ref, aux_ref), g_ref = _grads(
    plain, model, {**batch, "teacher_logits": teacher.logits(hidden)}
  )
  np.testing.assert_allclose(num, num_ref, rtol=1e-5)
  for key in aux_ref:
    np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-5, atol=1e-5, err_msg=key)
  _assert_grads_close(g, g_ref)
  dw = jax.grad(
    lambda w: distill_train.Distill(config, distill_train.TeacherHead(w, head.layout))(
      model, {**batch, "teacher_hidden": hidden}
    )[0]
  )(head.weight)
  np.testing.assert_array_equal(dw, 0.0)


def test_fused_token_objective_is_exact_under_accumulation():
  """Two micro-batches of unequal token counts give the full batch's sums and gradients, for
  every divergence."""
  from jaxnll.train import step as step_lib

  batch, _ = _batch()
  model, teacher = make_model(TINY, seed=0), make_model(TINY, seed=1)
  lay = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
  hidden = teacher(batch["tokens"], return_hidden=True, **lay)
  full = {**batch, "teacher_hidden": hidden}
  head = distill_train.TeacherHead(*teacher.output_head())
  for kind in ("reverse_kl", "jsd"):
    obj = distill_train.Distill(_config(kind=kind, temperature=1.5), head)
    one = step_lib.accumulate_gradients(model, step_lib.micro_batches(full, 1), obj)
    two = step_lib.accumulate_gradients(model, step_lib.micro_batches(full, 2), obj)
    for key in ("kd_sum", "target_sum", "denominator", "loss_sum"):
      np.testing.assert_allclose(one[1][key], two[1][key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(
      one[2]["sample_kd_sums"], two[2]["sample_kd_sums"], rtol=1e-5, atol=1e-6
    )
    _assert_grads_close(two[0], one[0])


# ----------------------------------------------------------------------------- teacher answers


class Chain(nnx.Module):
  """A fixed "language model": after ASSISTANT it says 'abc' then EOS."""

  def __init__(self):
    table = np.full((data_lib.VOCAB_SIZE, data_lib.VOCAB_SIZE), -10.0, np.float32)
    nxt = {data_lib.ASSISTANT: 97, 97: 98, 98: 99, 99: data_lib.EOS}
    for a in range(data_lib.VOCAB_SIZE):
      table[a, nxt.get(a, data_lib.PAD)] = 10.0
    self.table = nnx.Param(jnp.asarray(table))

  def __call__(self, tokens, **_):
    return self.table[...][tokens]


def test_teacher_answers_are_greedy_until_eos_and_fit_the_row():
  examples = [data_lib.Example.pair("x" * n, "ref") for n in (1, 30, 5, 50)]
  got = distill_train.teacher_answers(Chain(), examples, length=64, max_new=8, rows=3)
  assert got == [[97, 98, 99]] * 4
  assert distill_train.teacher_answers(Chain(), examples[:1], length=64, max_new=2) == [[97, 98]]
  tokens, span = distill_train.answer_sample(examples[0], [97, 98, 99], 64)
  prompt = data_lib.encode_prompt(examples[0])
  np.testing.assert_array_equal(tokens, list(prompt) + [97, 98, 99, data_lib.EOS])
  np.testing.assert_array_equal(span, [False] * len(prompt) + [True] * 4)
  # An answer too long for the row is cut, the closing EOS kept.
  tokens, span = distill_train.answer_sample(examples[3], [97] * 100, 64)
  assert len(tokens) == 64 and tokens[-1] == data_lib.EOS and span[-1]


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  data = str(root / "small.jsonl")
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::50], data)  # 63 train, 7 held out
  args = ["train", "--data", data, "--d-model", "16", "--layers", "1", "--batch-size", "8"]
  args += ["--no-progress", "--eval-every", "0"]
  assert cli.main(args + ["--out", str(root / "teacher"), "--steps", "3"]) == 0
  return root, args


def _records(path):
  return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_train_with_a_token_level_teacher_logs_both_losses_per_sample(runs):
  root, args = runs
  out = root / "token"
  kd = ["--teacher", str(root / "teacher"), "--kd-weight", "0.7", "--temperature", "2"]
  assert cli.main(args + ["--out", str(out), "--steps", "3"] + kd) == 0
  saved = json.load(open(out / "config.json"))["distill"]
  assert saved["kd"] == "token" and saved["kd_weight"] == 0.7 and saved["temperature"] == 2.0
  records = _records(out)
  assert len(records) == 3
  for r in records:
    n = len(r["sample_ids"])
    assert len(r["sample_nll"]) == len(r["sample_kd"]) == len(r["sample_kd_tokens"]) == n
    assert r["sample_kd_tokens"] == r["sample_tokens"]
    np.testing.assert_allclose(
      r["kd_loss"], sum(r["sample_kd"]) / sum(r["sample_tokens"]), rtol=1e-4
    )
    # loss = (1 - α)·NLL + α·τ²·KD per target token.
    np.testing.assert_allclose(
      r["loss"], 0.3 * r["target_loss"] + 0.7 * 4 * r["kd_loss"], rtol=1e-5
    )
  assert json.load(open(out / "summary.json"))["steps"] == 3


def test_train_fused_token_teacher_matches_the_logits_run(runs):
  """``--kd token --fused`` (teacher hidden states and head, no logits) trains the same
  student as the logits path at the same seed; other divergences run and are logged."""
  root, args = runs
  kd = ["--teacher", str(root / "teacher"), "--kd-weight", "0.7", "--temperature", "2"]
  logits_run, fused_run = root / "kd-logits", root / "kd-fused"
  assert cli.main(args + ["--out", str(logits_run), "--steps", "3"] + kd) == 0
  assert cli.main(args + ["--out", str(fused_run), "--steps", "3", "--fused"] + kd) == 0
  for a, b in zip(_records(logits_run), _records(fused_run), strict=True):
    for key in ("loss", "target_loss", "kd_loss"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=key)
  jsd = root / "kd-jsd"
  extra = ["--fused", "--kd-kind", "jsd", "--kd-beta", "0.3", "--accum", "2", "--batch-size", "16"]
  assert cli.main(args + ["--out", str(jsd), "--steps", "2"] + kd + extra) == 0
  saved = json.load(open(jsd / "config.json"))["distill"]
  assert saved["kind"] == "jsd" and saved["beta"] == 0.3
  for r in _records(jsd):
    np.testing.assert_allclose(
      r["loss"], 0.3 * r["target_loss"] + 0.7 * 4 * r["kd_loss"], rtol=1e-5
    )


def test_train_with_sequence_level_teacher_and_resume(runs):
  root, args = runs
  kd = ["--teacher", str(root / "teacher"), "--kd", "sequence", "--kd-weight", "0.5"]
  out = root / "sequence"
  assert cli.main(args + ["--out", str(out), "--steps", "2"] + kd) == 0
  lines = [json.loads(line) for line in open(out / "teacher_outputs.jsonl")]
  assert lines[0]["key"]["count"] == 63 and len(lines) == 64
  for r in _records(out):
    nll, kd_sum = sum(r["sample_nll"]), sum(r["sample_kd"])
    den = 0.5 * sum(r["sample_tokens"]) + 0.5 * sum(r["sample_kd_tokens"])
    np.testing.assert_allclose(r["loss"], (0.5 * nll + 0.5 * kd_sum) / den, rtol=1e-4)
  # Resuming keeps the teacher settings (from config.json) and reuses the decoded answers.
  assert cli.main(args + ["--out", str(out), "--steps", "3", "--resume"]) == 0
  records = _records(out)
  assert [r["step"] for r in records] == [1, 2, 3] and "kd_loss" in records[-1]


@pytest.mark.parametrize(
  "extra,match",
  [
    (["--kd-weight", "0.5"], "--kd-weight need --teacher"),
    (["--temperature", "2", "--kd", "token"], "--temperature, --kd need --teacher"),
    (["--teacher", "{root}/teacher", "--kd-weight", "1.5"], r"kd_weight \(α\) must be in \[0, 1\]"),
    (["--teacher", "{root}/teacher", "--temperature", "0"], "temperature"),
    (["--teacher", "{root}/nowhere"], "no config.json"),
    (["--teacher", "{root}/teacher", "--kd", "sequence", "--pack"], "drop --pack"),
    (["--teacher", "{root}/teacher", "--kd", "sequence", "--fused"], "fused only with --kd token"),
    (["--teacher", "{root}/teacher", "--kd-kind", "jsd"], "--kd-kind jsd needs --fused"),
    (["--teacher", "{root}/teacher", "--kd-beta", "0.2", "--fused"], "--kd-beta only applies"),
  ],
)
def test_bad_distillation_arguments_are_clear_errors(runs, capsys, extra, match):
  root, args = runs
  extra = [x.format(root=root) for x in extra]
  assert cli.main(args + ["--out", str(root / "bad"), "--steps", "1"] + extra) == 2
  err = capsys.readouterr().err
  assert "jaxnll train: error:" in err
  assert re.search(match, err), err
  # A refused command leaves no run behind: the corrected one needs no --overwrite.
  assert not (root / "bad" / "config.json").exists()
