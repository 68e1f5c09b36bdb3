"""Tests for jaxnll/preference.py (DPO / IPO / hinge / SimPO / ORPO per pair) and
jaxnll/train/modes/preference.py (pairs, the objective, `jaxnll train --loss dpo ...`)."""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnll
from jaxnll import cli, reference, train
from jaxnll.preference import dpo_loss, orpo_loss, preference_metrics, simpo_loss
from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train.model import ModelConfig, make_model
from jaxnll.train.modes import preference as pref_train

# ----------------------------------------------------------------------------- float64 papers


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(c, r, rc, rr, beta, kind="sigmoid", eps=0.0):
  """Rafailov et al. eq. 7 (cDPO: Mitchell 2023), Azar et al. eq. 17 (IPO), SLiC hinge."""
  log_ratio = (-c + rc) - (-r + rr)  # log π/π_ref (chosen) - log π/π_ref (rejected)
  if kind == "sigmoid":
    return -(1 - eps) * _logsig(beta * log_ratio) - eps * _logsig(-beta * log_ratio)
  if kind == "ipo":
    return (log_ratio - 1 / (2 * beta)) ** 2
  return np.maximum(0.0, 1.0 - beta * log_ratio)


def np_simpo(c, cn, r, rn, beta, gamma):
  """Meng et al. eq. 6: -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)."""
  return -_logsig(beta / cn * -c - beta / rn * -r - gamma)


def np_orpo(c, cn, r, rn, beta):
  """Hong et al. eq. 6-8: L_SFT + λ·L_OR, odds = P / (1 - P), P = exp(mean log-prob)."""
  pw, pl = np.exp(-c / cn), np.exp(-r / rn)
  log_or = np.log(pw / (1 - pw)) - np.log(pl / (1 - pl))
  return c / cn - beta * _logsig(log_or)


def _pairs(p=7, seed=0):
  rng = np.random.default_rng(seed)
  cn = rng.integers(1, 9, p).astype(np.float64)
  rn = rng.integers(1, 9, p).astype(np.float64)
  c = cn * rng.uniform(0.05, 3.0, p)
  r = rn * rng.uniform(0.05, 3.0, p)
  rc, rr = c + rng.normal(0, 2, p), r + rng.normal(0, 2, p)
  return c, cn, r, rn, rc, rr


f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


@pytest.mark.parametrize(
  "kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_the_paper_formula_in_float64(kind, eps, beta):
  c, cn, r, rn, rc, rr = _pairs()
  got = jax.jit(functools.partial(dpo_loss, beta=beta, kind=kind, label_smoothing=eps))(
    f32(c), f32(r), f32(rc), f32(rr)
  )
  want = np_dpo(c, r, rc, rr, beta, kind, eps)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  plain = reference.dpo_loss(
    f32(c), f32(r), f32(rc), f32(rr), beta=beta, kind=kind, label_smoothing=eps
  )
  np.testing.assert_allclose(plain, want, rtol=2e-5, atol=2e-5)
  assert got.dtype == jnp.float32 and got.shape == (7,)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (1.0, -0.3)])
def test_simpo_matches_the_paper_formula_in_float64(beta, gamma):
  c, cn, r, rn, _, _ = _pairs(seed=1)
  got = simpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta, gamma=gamma)
  want = np_simpo(c, cn, r, rn, beta, gamma)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  plain = reference.simpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta, gamma=gamma)
  np.testing.assert_allclose(plain, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_the_paper_formula_in_float64(beta):
  c, cn, r, rn, _, _ = _pairs(seed=2)
  got = orpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta)
  want = np_orpo(c, cn, r, rn, beta)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  plain = reference.orpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta)
  np.testing.assert_allclose(plain, want, rtol=2e-5, atol=2e-6)


def test_hand_computed_values():
  # DPO: chosen 2 (ref 3), rejected 6 (ref 5): log-ratio gap (3-2) - (5-6) = 2; β = 0.5 → h = 1.
  one = lambda x: jnp.array([x], jnp.float32)  # noqa: E731
  args = one(2.0), one(6.0), one(3.0), one(5.0)
  np.testing.assert_allclose(dpo_loss(*args, beta=0.5), [math.log1p(math.exp(-1.0))], rtol=1e-6)
  # cDPO ε = 0.25: 0.75·log(1 + e^-1) + 0.25·log(1 + e^1).
  want = 0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e)
  np.testing.assert_allclose(dpo_loss(*args, beta=0.5, label_smoothing=0.25), [want], rtol=1e-6)
  # IPO: (2 - 1/(2·0.5))² = 1;  hinge: max(0, 1 - 1) = 0.
  np.testing.assert_allclose(dpo_loss(*args, beta=0.5, kind="ipo"), [1.0], rtol=1e-6)
  np.testing.assert_allclose(dpo_loss(*args, beta=0.5, kind="hinge"), [0.0], atol=0)
  # SimPO: means 1 and 2, β = 2, γ = 0.5: -log σ(2·(2 - 1) - 0.5) = log(1 + e^-1.5).
  got = simpo_loss(one(3.0), one(3.0), one(8.0), one(4.0), beta=2.0, gamma=0.5)
  np.testing.assert_allclose(got, [math.log1p(math.exp(-1.5))], rtol=1e-6)
  # ORPO: P_w = 1/2 (odds 1), P_l = 1/5 (odds 1/4): log 2 + 0.1·log(1 + 1/4).
  got = orpo_loss(one(2 * math.log(2)), one(2.0), one(3 * math.log(5)), one(3.0), beta=0.1)
  np.testing.assert_allclose(got, [math.log(2) + 0.1 * math.log(1.25)], rtol=1e-6)
  # Diagnostics.
  m = preference_metrics(*args, beta=0.5)
  assert [float(m[k][0]) for k in ("chosen_reward", "rejected_reward", "margin")] == [
    0.5,
    -0.5,
    1.0,
  ]
  assert bool(m["ranked_right"][0]) and bool(m["valid"][0])


def test_large_margins_and_near_certain_answers_stay_finite():
  big = f32([-800.0, 800.0])
  z = jnp.zeros(2)
  for kind in ("sigmoid", "ipo", "hinge"):
    loss, g = jax.value_and_grad(lambda c, k=kind: dpo_loss(c, z, z, z, kind=k).sum())(big)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(dpo_loss(big, z, z, z), [0.0, 80.0], atol=1e-5)  # h = ±80
  # ORPO at probability ~1 (mean NLL 0 or 1e-7) and ~0: finite values and gradients.
  nll, n = f32([0.0, 1e-7, 1e-3, 60.0]), jnp.ones(4)
  loss, g = jax.value_and_grad(lambda c: orpo_loss(c, n, f32([0.5] * 4), n).sum())(nll)
  assert np.isfinite(loss) and np.all(np.isfinite(g))
  np.testing.assert_allclose(
    orpo_loss(nll[2:], n[2:], f32([0.5, 0.5]), n[2:]),
    np_orpo(np.array([1e-3, 60.0]), 1, 0.5, 1, 0.1),
    rtol=1e-4,
  )


# ----------------------------------------------------------------------------- empty pairs


def test_an_empty_pair_costs_exactly_zero_with_zero_gradients():
  nan = jnp.nan
  c, r = f32([2.0, nan, 0.0, 3.0]), f32([3.0, nan, 4.0, 0.0])
  cn, rn = f32([2.0, 0.0, 0.0, 3.0]), f32([2.0, 5.0, 2.0, 0.0])  # pairs 1-3 have an empty span
  rc, rr = f32([2.5, nan, 1.0, 1.0]), f32([2.0, nan, 1.0, 1.0])
  losses = {
    "dpo": lambda c, r: dpo_loss(c, r, rc, rr, chosen_count=cn, rejected_count=rn),
    "ipo": lambda c, r: dpo_loss(c, r, rc, rr, kind="ipo", chosen_count=cn, rejected_count=rn),
    "simpo": lambda c, r: simpo_loss(c, cn, r, rn),
    "orpo": lambda c, r: orpo_loss(c, cn, r, rn),
  }
  for name, fn in losses.items():
    loss = fn(c, r)
    assert np.isfinite(loss[0]) and loss[0] != 0, name
    assert np.all(np.asarray(loss[1:]) == 0.0), (name, loss)
    gc, gr = jax.grad(lambda c, r, f=fn: f(c, r).sum(), argnums=(0, 1))(c, r)
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr)), name
    assert np.all(np.asarray(gc[1:]) == 0.0) and np.all(np.asarray(gr[1:]) == 0.0), name
  m = preference_metrics(c, r, rc, rr, chosen_count=cn, rejected_count=rn)
  assert m["valid"].tolist() == [True, False, False, False]
  assert np.all(np.asarray(m["margin"][1:]) == 0.0) and not np.any(m["ranked_right"][1:])


@pytest.mark.parametrize("bad", [float("nan"), -1.0, -0.5, float("inf")])
def test_a_broken_token_count_is_nan_not_an_empty_pair(bad):
  """A NaN, negative or infinite count is broken input: the pair's loss and its gradient are
  NaN (it used to cost exactly 0, read as an empty span); the other pairs are unchanged."""
  c, cn, r, rn, rc, rr = (f32(x) for x in _pairs(p=3))
  bad_cn, bad_rn = cn.at[1].set(bad), rn.at[2].set(bad)
  losses = {
    "dpo": lambda c, r, cn, rn: dpo_loss(c, r, rc, rr, chosen_count=cn, rejected_count=rn),
    "hinge": lambda c, r, cn, rn: dpo_loss(
      c, r, rc, rr, kind="hinge", chosen_count=cn, rejected_count=rn
    ),
    "simpo": lambda c, r, cn, rn: simpo_loss(c, cn, r, rn),
    "orpo": lambda c, r, cn, rn: orpo_loss(c, cn, r, rn),
  }
  for name, fn in losses.items():
    want = fn(c, r, cn, rn)
    got = fn(c, r, bad_cn, bad_rn)
    assert np.isnan(got[1]) and np.isnan(got[2]), (name, got)
    assert float(got[0]) == float(want[0]), name
    gc, gr = jax.grad(lambda c, r, f=fn: f(c, r, bad_cn, bad_rn).sum(), argnums=(0, 1))(c, r)
    assert np.isnan(gc[1]) or np.isnan(gr[1]), name
    assert np.isnan(gc[2]) or np.isnan(gr[2]), name
  m = preference_metrics(c, r, rc, rr, chosen_count=bad_cn, rejected_count=bad_rn)
  assert np.isnan(m["margin"][1]) and np.isnan(m["margin"][2]) and np.isfinite(m["margin"][0])


def test_string_options_are_type_errors_naming_the_option():
  x = jnp.ones(3)
  for call, name in (
    (lambda: dpo_loss(x, x, x, x, beta="0.1"), "beta"),
    (lambda: simpo_loss(x, x, x, x, gamma="0.5"), "gamma"),
    (lambda: orpo_loss(x, x, x, x, beta=None), "beta"),
    (lambda: preference_metrics(x, x, beta=True), "beta"),
  ):
    with pytest.raises(TypeError, match=f"^{name} must be"):
      call()


def test_orpo_token_mean_convention_and_its_terms():
  """``nll_mean="tokens"``: the mean of the per-pair losses over the non-empty pairs is one
  token mean over every chosen token plus the mean odds-ratio term (TRL's / Liger's ORPO), in
  float64; ``return_terms`` gives the NLL and odds-ratio terms, which add up to the loss."""
  c, cn, r, rn, _, _ = _pairs(p=5, seed=3)
  cn[2] = 0.0  # an empty pair: out of every sum
  valid = cn > 0
  pw, pl = np.exp(-c / np.where(valid, cn, 1)), np.exp(-r / rn)
  log_or = np.log(pw / (1 - pw)) - np.log(pl / (1 - pl))
  beta = 0.2
  want = c[valid].sum() / cn[valid].sum() - beta * _logsig(log_or[valid]).mean()
  loss, terms = orpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta, nll_mean="tokens",
                          return_terms=True)  # fmt: skip
  assert loss[2] == 0 and all(float(t[2]) == 0 for t in terms.values())
  np.testing.assert_allclose(float(loss.sum()) / valid.sum(), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(terms["nll"] + terms["odds_ratio"]), loss, rtol=1e-6)
  np.testing.assert_allclose(terms["log_odds_ratio"][valid], log_or[valid], rtol=1e-5)
  np.testing.assert_allclose(terms["odds_ratio"][valid], -beta * _logsig(log_or[valid]), rtol=1e-5)
  # The default keeps its return type and the per-pair mean, which weighs lengths differently.
  pair = orpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta)
  assert isinstance(pair, jax.Array) and pair.shape == (5,)
  want_pair = np_orpo(c[valid], cn[valid], r[valid], rn[valid], beta)
  np.testing.assert_allclose(pair[valid], want_pair, rtol=1e-5)
  assert abs(float(pair.sum()) - float(loss.sum())) > 1e-3
  _, pair_terms = orpo_loss(f32(c), f32(cn), f32(r), f32(rn), beta=beta, return_terms=True)
  np.testing.assert_allclose(pair_terms["nll"][valid], c[valid] / cn[valid], rtol=1e-6)
  with pytest.raises(ValueError, match="nll_mean"):
    orpo_loss(f32(c), f32(cn), f32(r), f32(rn), nll_mean="batch")


def test_the_reference_receives_no_gradient():
  c, cn, r, rn, rc, rr = (f32(x) for x in _pairs())
  for kind in ("sigmoid", "ipo", "hinge"):
    g = jax.grad(lambda a, b, k=kind: dpo_loss(c, r, a, b, kind=k).sum(), argnums=(0, 1))(rc, rr)
    assert all(np.all(np.asarray(x) == 0.0) for x in g)
  g = jax.grad(lambda a: preference_metrics(c, r, a, rr)["margin"].sum())(rc)
  assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda x: dpo_loss(x, x, x, x, beta=0.0), "beta"),
    (lambda x: dpo_loss(x, x, x, x, beta=float("nan")), "beta"),
    (lambda x: dpo_loss(x, x, x, x, kind="kto"), "kind"),
    (lambda x: dpo_loss(x, x, x, x, label_smoothing=0.5), "label_smoothing"),
    (lambda x: dpo_loss(x, x, x, x, kind="ipo", label_smoothing=0.1), "label_smoothing"),
    (lambda x: dpo_loss(x, x, x, x, chosen_count=x), "rejected_count"),
    (lambda x: dpo_loss(x, x[:2], x, x), r"chosen_nll and rejected_nll .* \(3,\) and \(2,\)"),
    (lambda x: dpo_loss(x[None], x[None], x[None], x[None]), r"shape \[P\]"),
    (lambda x: simpo_loss(x, x, x, x, gamma=float("inf")), "gamma"),
    (lambda x: orpo_loss(x, x, x, x, beta=-1.0), "beta"),
    (lambda x: preference_metrics(x, x, length_normalize=True), "length_normalize"),
    (lambda x: preference_metrics(x, x, x), "ref_rejected_nll"),
  ],
)
def test_option_and_shape_errors_name_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    jax.jit(call)(jnp.ones(3))


# ----------------------------------------------------------------------------- fused entry


def _head_problem(pairs=3, t=10, d=8, v=24, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  rows = 2 * pairs
  hidden = jax.random.normal(k[0], (rows, t, d))
  weight = jax.random.normal(k[1], (d, v)) * 0.5
  targets = jax.random.randint(k[2], (rows, t), 0, v)
  starts = np.array([3, 4, 2, 6, 5, 5])[:rows]
  ends = np.array([9, 7, 10, 10, 8, 9])[:rows]
  span = jaxnll.spans_to_mask(jnp.asarray(starts), jnp.asarray(ends), t)
  ref = jax.random.uniform(k[3], (rows,), minval=5.0, maxval=25.0)
  return hidden, weight, targets, span, ref


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo", "orpo"])
def test_gradients_through_the_fused_entry_equal_those_on_logits(kind):
  hidden, weight, targets, span, ref = _head_problem()
  counts = jnp.sum(span, axis=-1, dtype=jnp.float32)
  obj = pref_train.Preference(kind=kind, beta=pref_train.DEFAULT_BETA[kind])

  def fused(h, w):
    nll = jaxnll.linear_sequence_nll(h, w, targets, span, token_chunk=4, vocab_chunk=16)
    return obj.pair_losses(nll, counts, ref)[0].sum()

  def plain(h, w):
    nll = jaxnll.sequence_nll(jnp.einsum("btd,dv->btv", h, w), targets, span)
    return obj.pair_losses(nll, counts, ref)[0].sum()

  (lf, gf), (lp, gp) = (
    jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, weight) for f in (fused, plain)
  )
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  for a, b in zip(gf, gp, strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  assert np.any(np.asarray(gf[0]) != 0)


def _memory(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_fused_dpo_needs_a_small_fraction_of_the_materialised_memory():
  """Compile-only temp bytes of DPO forward+backward, fused vs logits (bench at the 8B head:
  bench/preference_memory.py)."""
  path = os.path.join(os.path.dirname(__file__), "..", "bench", "preference_memory.py")
  spec = importlib.util.spec_from_file_location("preference_memory", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.check()
  args = bench.dpo_problem(rows=8, tokens=2048, d=256, v=32768, dtype=jnp.bfloat16)
  fused, plain = _memory(bench.fused_dpo_grad, *args), _memory(bench.logits_dpo_grad, *args)
  assert fused * 20 <= plain, (fused, plain)


# ----------------------------------------------------------------------------- pairs


def test_embedded_pairs_are_deterministic_wrong_and_split_like_the_sft_set():
  train_pairs, heldout = pref_train.embedded_pairs("train"), pref_train.embedded_pairs("heldout")
  assert len(train_pairs) == 3150 and len(heldout) == 350
  examples = data_lib.embedded_examples("heldout")
  assert [p.chosen for p in heldout] == [ex.response for ex in examples]
  assert all(p.rejected != p.chosen for p in train_pairs + heldout)
  again = pref_train.embedded_pairs("heldout")
  assert [p.rejected for p in again] == [p.rejected for p in heldout]
  by_family = {}
  for p in heldout:
    by_family.setdefault(p.family, p)
  assert set(by_family) == set(data_lib.FAMILIES)
  add = by_family["add"]
  assert 1 <= abs(int(add.rejected) - int(add.chosen)) <= 3
  rev = by_family["reverse"]
  assert sorted(rev.rejected) == sorted(rev.chosen)
  assert sum(a != b for a, b in zip(rev.rejected, rev.chosen, strict=True)) == 2
  assert by_family["lookup"].rejected in by_family["lookup"].context[-1].content
  assert by_family["upper"].rejected.lower() == by_family["upper"].chosen.lower()


def test_load_pairs_reads_both_formats_and_names_bad_lines(tmp_path):
  pairs = pref_train.embedded_pairs("all")[:3]
  chat = pref_train.Pair(
    (data_lib.Message("system", "be brief"), data_lib.Message("user", "2+2")), "4", "5"
  )
  path = tmp_path / "prefs.jsonl"
  pref_train.write_pairs(pairs + [chat], path)
  back = pref_train.load_pairs(path)
  assert [(p.context, p.chosen, p.rejected) for p in back] == [
    (p.context, p.chosen, p.rejected) for p in pairs + [chat]
  ]
  assert back[1].source == f"{path}:2"
  bad_lines = [
    ('{"prompt": "a", "chosen": "b"}', "no 'rejected'"),
    ('{"prompt": "a", "chosen": 1, "rejected": "c"}', "'chosen' must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "last message must be the assistant"),
    ('{"prompt": "a", "response": "b"}', "no 'chosen'"),
    ('{"text": "a"}', "expected"),
    ("{nope", "invalid JSON"),
  ]
  for line, match in bad_lines:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y", "rejected": "z"}\n\n' + line + "\n")
    with pytest.raises(data_lib.DataError, match=re.escape(f"{bad}:3: ") + ".*" + re.escape(match)):
      pref_train.load_pairs(bad)


def test_pair_stream_keeps_pairs_in_adjacent_rows_and_resumes():
  samples = pref_train.pair_samples(pref_train.embedded_pairs("train")[:9], 128)
  spec = data_lib.BatchSpec(rows=4, length=128)
  stream = pref_train.pair_stream(samples, spec, seed=3)
  steps = [next(stream) for _ in range(7)]
  ids = np.stack([s.batch["sample_ids"][:, 0] for s in steps])
  assert np.all((ids[:, 0::2] // 2 == ids[:, 1::2] // 2) | (ids[:, 0::2] < 0))
  assert np.all((ids[:, 0::2] % 2 == 0) | (ids[:, 0::2] < 0))
  assert [s.last_in_epoch for s in steps[:5]] == [False] * 4 + [True]
  assert sorted(i // 2 for i in ids[:5, 0::2].ravel() if i >= 0) == list(range(9))
  later = next(iter(pref_train.pair_stream(samples, spec, seed=3, start_step=5)))
  np.testing.assert_array_equal(later.batch["tokens"], steps[5].batch["tokens"])


# ----------------------------------------------------------------------------- objective, step

TINY = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _pair_batch(n_pairs=8, rows=16):
  pairs = [p for p in pref_train.embedded_pairs("train")[::29] if pref_train.fits(p, 64)]
  samples = pref_train.pair_samples(pairs[:n_pairs], 64)
  batch = pref_train.pair_batch(samples, range(n_pairs), rows=rows, length=64)
  reference_model = make_model(TINY, seed=1)
  ref = train.eval_step(reference_model, batch)[0][:, 0]
  return {**batch, "ref_nll": np.asarray(ref)}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _step(graphdef, state, batch, objective):
  return train.train_step_fn(graphdef, state, batch, objective=objective)


def _split():
  # Plain SGD: the new parameters are the old ones minus the step's gradient, so comparing them
  # compares gradients (Adam's first step ≈ lr·sign(g) would amplify round-off in tiny entries).
  return nnx.split(train.Trainer(make_model(TINY, seed=0), optax.sgd(1.0)))


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


def test_objective_is_the_per_pair_loss_over_nonempty_pairs():
  batch = _pair_batch(n_pairs=7)  # 7 pairs in 16 rows: the last pair of rows is empty
  model = make_model(TINY, seed=0)
  obj = pref_train.Preference(kind="dpo", beta=0.1)
  num, aux = obj(model, batch)
  targets, mask = shift_targets(batch["tokens"], batch["span_mask"], batch["segment_ids"])
  logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  nll = np.asarray(jaxnll.sequence_nll(logits, targets, mask), np.float64)
  ref = batch["ref_nll"].astype(np.float64)
  want = np_dpo(nll[0:14:2], nll[1:14:2], ref[0:14:2], ref[1:14:2], 0.1)
  np.testing.assert_allclose(num, want.sum(), rtol=1e-5)
  assert float(aux["denominator"]) == 7.0
  margin = 0.1 * ((ref[0:14:2] - nll[0:14:2]) - (ref[1:14:2] - nll[1:14:2]))
  np.testing.assert_allclose(aux["accuracy_sum"], np.sum(margin > 0))
  np.testing.assert_allclose(aux["margin_sum"], margin.sum(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["sample_pair_loss"][:14, 0], np.repeat(want, 2), rtol=1e-5)
  assert np.all(np.asarray(aux["sample_pair_loss"][14:]) == 0)


def _on_devices(state, batch, devices):
  """``state`` replicated and the micro-batched ``batch``'s rows split over ``devices``."""
  mesh = Mesh(np.asarray(devices), ("data",))
  batch = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
  return jax.device_put(state, NamedSharding(mesh, P())), batch


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_accumulation_and_eight_devices_equal_the_full_batch(kind):
  assert len(jax.devices()) == 8, "tests/conftest.py fakes 8 CPU devices"
  graphdef, state = _split()
  batch = _pair_batch(n_pairs=8, rows=16)
  obj = pref_train.Preference(kind=kind, beta=pref_train.DEFAULT_BETA[kind])
  counts = [int(np.sum(batch["span_mask"][k * 4 : (k + 1) * 4])) for k in range(4)]
  assert len(set(counts)) > 1  # micro-batches with unequal token counts
  full_state, full = _step(graphdef, state, train.micro_batches(batch, 1), obj)
  for accum in (2, 4):
    new_state, out = _step(graphdef, state, train.micro_batches(batch, accum), obj)
    np.testing.assert_allclose(out["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], full["accuracy"])
    _close(new_state["model"], full_state["model"])
  placed, sharded = _on_devices(state, train.micro_batches(batch, 1), jax.devices())
  assert len(sharded["tokens"].sharding.device_set) == 8
  new_state, out = _step(graphdef, placed, sharded, obj)
  np.testing.assert_allclose(out["loss"], full["loss"], rtol=1e-6)
  np.testing.assert_allclose(out["margin"], full["margin"], rtol=1e-5, atol=1e-7)
  _close(new_state["model"], full_state["model"])


def test_fused_objective_matches_the_logits_objective():
  batch = _pair_batch(n_pairs=6, rows=12)
  model = make_model(TINY, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  results = []
  for fused in (False, True):
    obj = pref_train.Preference(kind="simpo", beta=2.0, fused=fused)
    f = lambda p, o=obj: o(nnx.merge(graphdef, p, rest), batch)  # noqa: E731
    results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
  ((n0, a0), g0), ((n1, a1), g1) = results
  np.testing.assert_allclose(n1, n0, rtol=1e-5)
  np.testing.assert_allclose(a1["margin_sum"], a0["margin_sum"], rtol=1e-4, atol=1e-6)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_heldout_figures():
  sums = np.array([2.0, 3.0, 5.0, 4.0])  # pair 0 ranked right, pair 1 wrong
  counts = np.array([1.0, 2.0, 2.0, 2.0])
  ref = np.array([2.5, 2.0, 5.0, 5.0])
  f = pref_train.pair_figures("dpo", 0.5, sums, counts, ref)
  assert f["preference_accuracy"] == 0.5
  # margins: 0.5·((0.5) - (-1)) = 0.75 and 0.5·(0 - 1) = -0.5
  assert f["reward_accuracy"] == 0.5 and f["reward_margin"] == pytest.approx(0.125)
  assert f["chosen_nll"] == pytest.approx(7 / 3) and f["rejected_nll"] == pytest.approx(7 / 4)
  g = pref_train.pair_figures("simpo", 2.0, sums, counts)
  assert g["reward_accuracy"] == 0.0  # mean NLLs: 2 vs 1.5, 2.5 vs 2


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  data = str(root / "small.jsonl")
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::50], data)  # 63 train, 7 held out
  prefs = str(root / "prefs.jsonl")
  pref_train.write_pairs(pref_train.embedded_pairs("all")[::50], prefs)
  args = ["train", "--d-model", "16", "--layers", "1", "--batch-size", "8"]
  args += ["--no-progress", "--eval-every", "0", "--table-rows", "2"]
  assert cli.main(args + ["--data", data, "--out", str(root / "sft"), "--steps", "2"]) == 0
  return root, args + ["--data", prefs, "--init", str(root / "sft")]


def _records(path):
  return [json.loads(line) for line in open(path / "metrics.jsonl")]


@pytest.mark.default_compile
def test_train_dpo_from_an_sft_run_and_resume(runs):
  root, args = runs
  out = root / "dpo"
  dpo = [
    "--loss",
    "dpo",
    "--out",
    str(out),
    "--steps",
    "3",
    "--accum",
    "2",
    "--mesh",
    "data=2,model=4",
  ]
  assert cli.main(args + dpo) == 0
  saved = json.load(open(out / "config.json"))
  assert saved["preference"]["kind"] == "dpo" and saved["preference"]["beta"] == 0.1
  assert saved["model"] == json.load(open(root / "sft" / "config.json"))["model"]
  records = _records(out)
  assert [r["step"] for r in records] == [1, 2, 3]
  first = records[0]
  # Step 1 starts from the reference itself: every margin is 0 and the loss is log 2.
  assert first["margin"] == 0.0 and first["loss"] == pytest.approx(math.log(2), rel=1e-6)
  assert len(first["sample_pair_loss"]) == len(first["sample_ids"])
  summary = json.load(open(out / "summary.json"))
  assert summary["reward_accuracy_before"] == 0.0
  assert 0.0 <= summary["preference_accuracy_after"] <= 1.0
  assert summary["heldout_nll_start"] == pytest.approx(
    json.load(open(root / "sft" / "summary.json"))["heldout_nll_end"], rel=1e-5
  )
  assert (out / "margins.png").exists() and len(summary["samples"]) == 2
  # Resume continues from the last checkpoint with the saved preference settings.
  assert (
    cli.main(
      args
      + ["--loss", "dpo", "--out", str(out), "--steps", "4", "--resume", "--mesh", "data=2,model=4"]
    )
    == 0
  )
  assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]


@pytest.mark.default_compile
def test_a_resume_that_restarts_from_step_0_starts_from_the_init_run(runs):
  """``metrics.jsonl`` lost before the newest checkpoint: the run starts again from step 0,
  and step 0 of a preference run is the ``--init`` run's model (not a fresh random one)."""
  root, args = runs
  out = root / "dpo-lost"
  dpo = ["--loss", "dpo", "--out", str(out), "--steps", "2", "--table-rows", "0"]
  assert cli.main(args + dpo) == 0
  (out / "metrics.jsonl").write_text("")  # the records lost, the checkpoint of step 2 kept
  assert cli.main(args + dpo + ["--resume"]) == 0
  first = _records(out)[0]
  assert first["step"] == 1 and first["margin"] == 0.0
  assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_train_orpo_fused(runs):
  root, args = runs
  out = root / "orpo"
  assert cli.main(args + ["--loss", "orpo", "--out", str(out), "--steps", "2", "--fused"]) == 0
  r = _records(out)[0]
  # ORPO's loss is at least the chosen answers' mean NLL (the odds term is ≥ 0).
  assert r["loss"] > 0 and "accuracy" in r and "chosen_nll" in r


@pytest.mark.parametrize(
  "extra,match",
  [
    (["--loss", "dpo", "--pack"], "drop --pack"),
    (["--loss", "dpo", "--beta", "0"], "--beta must be a finite float > 0"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "label-smoothing"),
    (["--loss", "dpo", "--batch-size", "6", "--accum", "2"], r"2 × accum"),
    (["--loss", "dpo", "--init", "{root}/nowhere"], "no config.json"),
  ],
)
def test_bad_preference_arguments_are_clear_errors(runs, capsys, extra, match):
  root, args = runs
  extra = [x.format(root=root) for x in extra]
  assert cli.main(args + ["--out", str(root / "bad"), "--steps", "1"] + extra) == 2
  err = capsys.readouterr().err
  assert "jaxnll train: error:" in err and re.search(match, err), err
  # A refused command leaves no run behind: the corrected one needs no --overwrite.
  assert not (root / "bad" / "config.json").exists()


def test_preference_flags_need_a_preference_loss(capsys):
  assert cli.main(["train", "--beta", "0.2", "--out", "/nonexistent/x"]) == 2
  assert "--beta need --loss dpo" in capsys.readouterr().err
  assert cli.main(["train", "--loss", "dpo", "--out", "/nonexistent/x"]) == 2
  assert "needs --init RUN_DIR" in capsys.readouterr().err


def test_run_config_dataclass_round_trip():
  config = dataclasses.replace(train.RunConfig(), preference={"init": "/x", "kind": "simpo"})
  assert train.RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
