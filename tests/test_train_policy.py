"""Tests for jaxnll/train/modes/policy.py: the Policy objective (exact under accumulation for each
normalisation), rewards, and `jaxnll train --loss grpo --init RUN_DIR` (records, summary,
exact resume with the sampling keys)."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnll import cli
from jaxnll.train import data as data_lib
from jaxnll.train import modes
from jaxnll.train.model import ModelConfig, make_model
from jaxnll.train.modes import policy as policy_train
from jaxnll.train.modes.base import start_model
from jaxnll.train.run import RunConfig
from jaxnll.train.step import accumulate_gradients, micro_batches

TINY = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _policy_batch(model, ref_model, rows=8, length=48):
  examples = [
    ex for ex in data_lib.embedded_examples("train") if len(data_lib.encode(ex)[0]) <= length
  ]
  picked = examples[::97][:rows]
  batch = data_lib.pad_batch(
    data_lib.encode_all(picked, length), list(range(rows)), rows=rows, length=length
  )
  args = (batch["tokens"], batch["span_mask"], batch["segment_ids"])
  old = policy_train._answer_nll(model, *args)
  # A perturbed "old" policy so ratios differ from 1 and clipping happens.
  old = old + 0.5 * jax.random.normal(jax.random.key(3), old.shape)
  ref = policy_train._answer_nll(ref_model, *args)
  adv = jnp.asarray([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0][:rows])
  return {
    **batch,
    "advantages": np.asarray(adv),
    "old_nll": np.asarray(old),
    "ref_nll": np.asarray(ref),
  }


@pytest.mark.parametrize("normalize", policy_train.NORMALIZE)
def test_policy_objective_is_exact_under_accumulation(normalize):
  model, ref_model = make_model(TINY, seed=0), make_model(TINY, seed=1)
  batch = _policy_batch(model, ref_model)
  objective = policy_train.Policy(
    policy_train.PolicyConfig(init="unused", normalize=normalize, kl_coef=0.1, max_new=20)
  )

  @jax.jit
  def run(batch):
    grads, totals, _ = accumulate_gradients(model, batch, objective)
    den = totals["denominator"]
    return jax.tree.map(lambda g: g / den, grads), totals["loss_sum"] / den, totals

  full = run(micro_batches(batch, 1))
  accum = run(micro_batches(batch, 4))
  np.testing.assert_allclose(accum[1], full[1], rtol=1e-5)
  for a, f in zip(jax.tree.leaves(accum[0]), jax.tree.leaves(full[0]), strict=True):
    np.testing.assert_allclose(a, f, rtol=1e-4, atol=1e-7)
  totals = full[2]
  counts = np.asarray(batch["span_mask"]).sum(-1)  # shifted counts equal span lengths
  want_den = {"tokens": counts.sum(), "samples": (counts > 0).sum(), "sum": 20 * 8}
  assert float(totals["denominator"]) == want_den[normalize]
  assert 0 < float(totals["clip_sum"]) < float(totals["clip_count"])
  assert float(totals["kl_sum"]) > 0 and float(totals["entropy_sum"]) > 0


def test_policy_objective_old_nll_defaults_to_this_steps_nll():
  """One update per batch: without ``old_nll`` the ratio is exactly 1 (``old`` is the
  step's own NLL under ``stop_gradient``), and with no ``ref_nll`` there is no KL term."""
  model, ref_model = make_model(TINY, seed=0), make_model(TINY, seed=1)
  batch = _policy_batch(model, ref_model)
  args = (batch["tokens"], batch["span_mask"], batch["segment_ids"])
  config = policy_train.PolicyConfig(init="unused")
  own = np.asarray(policy_train._answer_nll(model, *args, temperature=config.temperature))
  objective = policy_train.Policy(config)
  lean = {k: v for k, v in batch.items() if k not in ("old_nll", "ref_nll")}
  explicit = dict(lean, old_nll=own)
  (g1, t1), (g2, t2) = (
    jax.jit(lambda b: accumulate_gradients(model, b, objective)[:2])(micro_batches(b, 1))
    for b in (lean, explicit)
  )
  np.testing.assert_allclose(t1["loss_sum"], t2["loss_sum"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert "kl_sum" not in t1 and float(t1["clip_sum"]) == 0.0
  with pytest.raises(ValueError, match="kl_coef > 0 needs"):
    kl = policy_train.Policy(policy_train.PolicyConfig(init="unused", kl_coef=0.1))
    accumulate_gradients(model, micro_batches(lean, 1), kl)


def test_reward_windows_average_the_sampled_reward_per_window():
  records = [{"step": s, "reward": float(s % 2)} for s in range(1, 24)]
  got = policy_train.reward_windows(records)
  assert list(got) == ["1-10", "11-20", "21-23"]
  assert got["1-10"] == 0.5 and got["21-23"] == pytest.approx(2 / 3)


def test_reward_is_exact_match():
  assert policy_train.reward("42", "42") == 1.0
  assert policy_train.reward("42 ", "42") == 1.0
  assert policy_train.reward("421", "42") == 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("rl")
  data = str(root / "answers.jsonl")
  with open(data, "w") as f:  # the {"prompt", "answer"} form of a verifiable data set
    for ex in data_lib.embedded_examples("all")[::70]:
      f.write(json.dumps({"prompt": ex.prompt, "answer": ex.response}) + "\n")
  args = ["train", "--data", data, "--d-model", "16", "--layers", "1", "--batch-size", "8"]
  args += ["--no-progress", "--eval-every", "0", "--table-rows", "0"]
  assert cli.main(args + ["--out", str(root / "sft"), "--steps", "3"]) == 0
  return root, args


def test_train_grpo_logs_rewards_and_resumes_exactly(runs):
  root, args = runs
  rl = ["--loss", "grpo", "--init", str(root / "sft"), "--group-size", "4"]
  rl += ["--prompts-per-step", "2", "--kl-coef", "0.05", "--normalize", "samples"]
  out = root / "grpo"
  assert cli.main(args + ["--out", str(out), "--steps", "3"] + rl) == 0
  config = json.load(open(out / "config.json"))
  assert config["policy"]["group_size"] == 4 and config["policy"]["normalize"] == "samples"
  assert config["batch"]["rows"] == 8 and config["train"]["loss"] == "subsequence"
  records = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    for key in ("reward", "kl", "clip_fraction", "entropy", "response_length"):
      assert np.isfinite(r[key]), key
    assert 0.0 <= r["reward"] <= 1.0 and r["clip_fraction"] == 0.0  # one update per batch
  summary = json.load(open(out / "summary.json"))
  assert "reward_before" in summary and "reward_after" in summary
  window = summary["sampled_reward_after"]
  assert list(window) == ["1-3"]
  assert window["1-3"] == pytest.approx(np.mean([r["reward"] for r in records]), abs=1e-6)
  assert (out / "reward.png").exists()

  # Stopped after 1 step and resumed: the same answers (sampling keys) and losses.
  saved = RunConfig.from_dict(config)
  part = root / "part"
  modes.fit(saved, str(part), stop_after=1, progress=False, log=lambda _: None)
  modes.fit(saved, str(part), resume=True, progress=False, log=lambda _: None)
  again = [json.loads(line) for line in open(part / "metrics.jsonl")]
  for a, b in zip(again, records, strict=True):
    for key in ("loss", "reward", "kl", "entropy", "response_length", "sample_nll"):
      assert a[key] == b[key], (key, a[key], b[key])


@pytest.mark.parametrize(
  "extra,match",
  [
    (["--loss", "grpo"], "needs --init"),
    (["--group-size", "4"], "--group-size need --loss grpo"),
    (["--loss", "grpo", "--init", "{root}/nowhere"], "--init .* no config.json"),
    (["--loss", "grpo", "--init", "{root}/sft", "--group-size", "1"], "group_size must be >= 2"),
  ],
)
def test_bad_policy_arguments_are_clear_errors(runs, capsys, extra, match):
  root, args = runs
  extra = [x.format(root=root) for x in extra]
  assert cli.main(args + ["--out", str(root / "bad"), "--steps", "1"] + extra) == 2
  assert re.search(match, capsys.readouterr().err)


def test_user_flags_win_over_the_rl_defaults(runs):
  """``--lr`` / ``--steps`` given on the command line are the user's choice, even where equal
  to the SFT defaults; left out, a mode's own defaults apply."""
  root, args = runs
  rl = ["--loss", "grpo", "--init", str(root / "sft"), "--out", str(root / "unused")]
  parse = lambda extra: modes.from_args(cli.build_parser().parse_args(args + rl + extra))
  given = parse(["--lr", "3e-3", "--steps", "400"])
  assert given.train.learning_rate == 3e-3 and given.steps == 400
  default = parse([])
  assert default.train.learning_rate == policy_train.RL_LR
  assert default.steps == policy_train.RL_STEPS
  assert default.train.warmup_steps == policy_train.RL_WARMUP
  assert default.model == RunConfig.from_dict(json.load(open(root / "sft" / "config.json"))).model


def test_start_model_refuses_another_architecture(runs):
  root, _ = runs
  other = RunConfig(model=dataclasses.replace(TINY, d_model=32, d_ff=64))
  with pytest.raises(ValueError, match="differs"):
    start_model(str(root / "sft"), other)
