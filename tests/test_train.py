"""Tests for jaxnll/train.py: exact accumulation, devices, export, resume, skipped steps."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnll import train
from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train.model import ModelConfig, make_model

TINY = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32)
SPEC = data_lib.BatchSpec(rows=8, length=64, pack=True, segments=8)


def _samples(n=40):
  examples = [ex for ex in data_lib.embedded_examples("train") if len(data_lib.encode(ex)[0]) <= 64]
  return data_lib.encode_all(examples[::37][:n], 64)


def _batch(spec=SPEC, n=40, pack=None):
  spec = spec if pack is None else dataclasses.replace(spec, pack=pack)
  return next(iter(data_lib.epoch_batches(_samples(n), spec, range(n))))


def _split(model_config=TINY, tx=None, seed=0):
  model = make_model(model_config, seed=seed)
  trainer = train.Trainer(model, tx or optax.adamw(1e-2))
  return nnx.split(trainer)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("loss", "fused"))
def _step(graphdef, state, batch, loss="subsequence", fused=False):
  return train.train_step_fn(graphdef, state, batch, objective=train.SFT(loss, fused))


def _params(state):
  return jax.tree.leaves(state["model"])


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- exactness


class Bigram(nnx.Module):
  """Logits = a learned table row per input token (enough to pin each token's NLL)."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def __call__(self, tokens, *, segment_ids=None, positions=None, span_mask=None, **_):
    return self.table[...][tokens]


def _log_probs(vocab, target, nll):
  p = np.full(vocab, (1.0 - np.exp(-nll)) / (vocab - 1))
  p[target] = np.exp(-nll)
  return np.log(p)


def test_accumulation_uses_the_global_token_mean():
  """2 target tokens at NLL 1 and 8 at NLL 3, in separate micro-batches, give 2.6."""
  vocab = 8
  table = np.zeros((vocab, vocab))
  table[1] = _log_probs(vocab, 2, 1.0)  # after token 1, token 2 has NLL exactly 1
  table[3] = _log_probs(vocab, 4, 3.0)  # after token 3, token 4 has NLL exactly 3
  rows, length = 2, 16
  tokens = np.zeros((rows, length), np.int32)
  span = np.zeros((rows, length), bool)
  tokens[0, :4] = [1, 2, 1, 2]
  span[0, :4] = [0, 1, 0, 1]
  tokens[1] = [3, 4] * 8
  span[1] = [0, 1] * 8
  seg = np.zeros((rows, length), np.int32)
  seg[0, :4], seg[1] = 1, 1
  batch = {
    "tokens": tokens,
    "span_mask": span,
    "segment_ids": seg,
    "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
    "sample_ids": np.asarray([[0], [1]], np.int32),
  }
  graphdef, state = nnx.split(train.Trainer(Bigram(table), optax.sgd(1.0)))
  results = {}
  for accum in (1, 2):
    new, out = _step(graphdef, state, train.micro_batches(batch, accum))
    results[accum] = new, out
    assert float(out["loss"]) == pytest.approx(2.6, abs=1e-5)
    assert out["target_count"] == 10
    np.testing.assert_allclose(out["sample_sums"][:, 0], [2.0, 24.0], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_counts"][:, 0], [2, 8])
  # Averaging the two micro-batch means would have given (1 + 3) / 2 = 2.0.
  # The gradient (SGD with lr 1: new = old - grad) is that of the token mean, in float64:
  # d/dlogits of the summed NLL is softmax - onehot at every target, divided by 10.
  grad = np.zeros((vocab, vocab))
  for row, target, count in ((1, 2, 2), (3, 4, 8)):
    p = np.exp(table[row]) / np.exp(table[row]).sum()
    grad[row] = count * (p - np.eye(vocab)[target]) / 10.0
  for accum in (1, 2):
    new_table = np.asarray(results[accum][0]["model"]["table"][...])
    np.testing.assert_allclose(table - new_table, grad, rtol=1e-5, atol=1e-7)


def test_accumulation_matches_the_full_batch_on_the_model():
  graphdef, state = _split()
  batch = _batch()
  counts = [
    int(shift_targets(m["tokens"], m["span_mask"], m["segment_ids"])[1].sum())
    for m in _micro(batch, 4)
  ]
  assert len(set(counts)) > 1  # micro-batches with unequal target-token counts
  ref_state, ref = _step(graphdef, state, train.micro_batches(batch, 1))
  new_state, out = _step(graphdef, state, train.micro_batches(batch, 4))
  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(out["sample_sums"], ref["sample_sums"], rtol=1e-5, atol=1e-5)
  _assert_trees_close(_params(new_state), _params(ref_state))


def _micro(batch, accum):
  mb = train.micro_batches(batch, accum)
  return [{k: v[i] for k, v in mb.items()} for i in range(accum)]


def _on_devices(state, batch, devices):
  """``state`` replicated and the micro-batched ``batch``'s rows split over ``devices``."""
  mesh = Mesh(np.asarray(devices), ("data",))
  batch = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
  return jax.device_put(state, NamedSharding(mesh, P())), batch


def test_eight_devices_give_the_single_device_result():
  assert len(jax.devices()) == 8, "tests/conftest.py fakes 8 CPU devices"
  graphdef, state = _split()
  batch = train.micro_batches(_batch(), 1)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    placed, sharded = _on_devices(state, batch, devices)
    assert len(sharded["tokens"].sharding.device_set) == len(devices)
    results.append(_step(graphdef, placed, sharded))
  (s1, o1), (s8, o8) = results
  np.testing.assert_allclose(o8["loss"], o1["loss"], rtol=1e-6)
  np.testing.assert_allclose(o8["sample_sums"], o1["sample_sums"], rtol=1e-5, atol=1e-5)
  _assert_trees_close(_params(s8), _params(s1))


# ----------------------------------------------------------------------------- loss modes


def test_selective_has_the_subsequence_gradient_and_logs_the_full_value():
  graphdef, state = _split(tx=optax.sgd(1.0))
  batch = train.micro_batches(_batch(), 1)
  sub_state, sub = _step(graphdef, state, batch, loss="subsequence")
  sel_state, sel = _step(graphdef, state, batch, loss="selective")
  full_state, full = _step(graphdef, state, batch, loss="full")
  _assert_trees_close(_params(sel_state), _params(sub_state))
  np.testing.assert_allclose(sel["loss"], sub["loss"], rtol=1e-6)
  np.testing.assert_allclose(sel["full_loss"], full["loss"], rtol=1e-6)
  assert full["loss"] == full["full_loss"] and "full_loss" not in sub
  assert not np.allclose(_params(full_state)[0], _params(sub_state)[0])


@pytest.mark.parametrize("loss, pack", [("subsequence", True), ("full", False)])
def test_fused_matches_the_logits_path(loss, pack):
  graphdef, state = _split(tx=optax.sgd(1.0))
  batch = train.micro_batches(_batch(pack=pack), 2)
  ref_state, ref = _step(graphdef, state, batch, loss=loss)
  new_state, out = _step(graphdef, state, batch, loss=loss, fused=True)
  for key in ("loss", "target_loss", "sample_sums"):
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5)
  _assert_trees_close(_params(new_state), _params(ref_state), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "config", [TINY, dataclasses.replace(TINY, kind="lstm")], ids=["transformer", "lstm"]
)
def test_packed_and_padded_batches_give_the_same_per_sample_losses(config):
  model = make_model(config)
  samples = _samples()
  per = {}
  for pack in (False, True):
    spec = dataclasses.replace(SPEC, pack=pack)
    sums = np.full(len(samples), np.nan)
    counts = np.full(len(samples), np.nan)
    for batch in data_lib.epoch_batches(samples, spec, range(len(samples))):
      s, c = train.eval_step(model, batch)
      ids = batch["sample_ids"]
      sums[ids[ids >= 0]], counts[ids[ids >= 0]] = s[ids >= 0], c[ids >= 0]
    per[pack] = sums, counts
  np.testing.assert_allclose(per[True][0], per[False][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(per[True][1], per[False][1])
  assert np.all(per[False][1] > 0)


# ----------------------------------------------------------------------------- robustness


def test_non_finite_step_is_skipped_with_parameters_unchanged():
  model = make_model(TINY)
  trainer = train.Trainer(model, optax.adamw(1e-2))
  before = jax.tree.map(np.asarray, nnx.state(trainer))
  batch = _batch()
  bad = dict(batch, span_mask=batch["span_mask"].astype(np.float32))
  r, t = np.argwhere(batch["span_mask"])[3]
  bad["span_mask"][r, t] = np.inf  # one target weighted by inf: loss and gradients blow up
  out = train.train_step(trainer, train.micro_batches(bad, 1))
  assert not bool(out["finite"])
  after = jax.tree.map(np.asarray, nnx.state(trainer))
  assert int(after["skipped"][...]) == 1
  for path in ("model", "optimizer"):
    for x, y in zip(jax.tree.leaves(before[path]), jax.tree.leaves(after[path]), strict=True):
      np.testing.assert_array_equal(x, y)
  out = train.train_step(trainer, train.micro_batches(batch, 1))
  assert bool(out["finite"]) and int(trainer.skipped[...]) == 1
  assert int(trainer.optimizer.step[...]) == 1
  moved = jax.tree.leaves(nnx.state(trainer, nnx.Param))
  assert any(
    not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["model"]), moved, strict=True)
  )


def test_nnx_jit_step_equals_the_functional_step():
  graphdef, state = _split()
  batch = train.micro_batches(_batch(), 2)
  ref_state, ref = _step(graphdef, state, batch)
  trainer = nnx.merge(graphdef, state, copy=True)
  out = train.train_step(trainer, batch)
  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-6)
  _assert_trees_close(jax.tree.leaves(nnx.state(trainer.model)), _params(ref_state))


def test_export_for_cpu_cuda_and_tpu():
  graphdef, state = _split()
  batch = train.micro_batches(_batch(), 2)
  exported = train.export_train_step(graphdef, state, batch)
  assert tuple(exported.platforms) == ("cpu", "cuda", "tpu")
  restored = jax.export.deserialize(exported.serialize())
  leaves, out = restored.call(jax.tree.leaves(state), batch)
  ref_state, ref = _step(graphdef, state, batch)
  np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-6)
  _assert_trees_close(leaves, jax.tree.leaves(ref_state))


# ----------------------------------------------------------------------------- the run loop


def _run_config(**kw):
  return train.RunConfig(
    model=ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64),
    train=train.TrainConfig(learning_rate=1e-2, warmup_steps=5),
    batch=data_lib.BatchSpec(rows=16, pack=True),
    eval_every=0,
    checkpoint_every=4,
    table_rows=0,
    **kw,
  )


def test_loss_decreases_on_the_embedded_task(tmp_path):
  summary = train.fit(_run_config(steps=40), str(tmp_path), progress=False, log=lambda s: None)
  losses = [r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5
  assert summary["heldout_nll_end"] < summary["heldout_nll_start"] - 1.5
  assert summary["skipped_steps"] == 0


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
  path = str(tmp_path / "small.jsonl")  # a small data file keeps the held-out evals short
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::25], path)
  config = _run_config(steps=7, data=path)
  quiet = dict(progress=False, log=lambda s: None)
  train.fit(config, str(tmp_path / "a"), **quiet)
  train.fit(config, str(tmp_path / "b"), stop_after=3, **quiet)
  train.fit(config, str(tmp_path / "b"), resume=True, **quiet)
  read = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]
  a, b = read("a"), read("b")
  assert [r["step"] for r in b] == list(range(1, 8))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  assert [r["sample_nll"] for r in a] == [r["sample_nll"] for r in b]


def test_train_config_errors():
  with pytest.raises(ValueError, match="loss"):
    train.TrainConfig(loss="causal")
  with pytest.raises(ValueError, match="selective"):
    train.TrainConfig(loss="selective", fused=True)
  with pytest.raises(ValueError, match="accum"):
    train.TrainConfig(accum=0)
