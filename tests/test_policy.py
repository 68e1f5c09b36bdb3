"""Tests of jaxnll/policy.py: the clipped policy-gradient loss, k3 KL, group advantages and
their batch normalisation (exact under accumulation and over 8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxnll
from jaxnll import parallel, reference
from jaxnll.nll import finish_loss, span_counts
from jaxnll.policy import group_advantages, k3_kl, policy_loss_terms, ppo_clip_loss


def np_ppo(new, old, adv, mask, lo, hi, ref=None, beta=0.0):
  """float64 NumPy value and d/d(new) of the clipped loss with the k3 term, per token."""
  new, old, mask = (np.asarray(x, np.float64) for x in (new, old, mask))
  adv = np.asarray(adv, np.float64)
  adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, new.shape)
  inside = mask != 0
  new, old, adv = (np.where(inside, x, 0.0) for x in (new, old, adv))
  r = np.exp(old - new)
  unclipped, clipped = r * adv, np.clip(r, 1 - lo, 1 + hi) * adv
  tok = -np.minimum(unclipped, clipped)
  # d(-r A)/d new = r A where the unclipped branch is the minimum, else the clip is flat.
  grad = np.where(unclipped <= clipped, r * adv, 0.0)
  if ref is not None:
    d = new - np.where(inside, np.asarray(ref, np.float64), 0.0)
    tok = tok + beta * (np.exp(d) - d - 1)
    grad = grad + beta * (np.exp(d) - 1)
  value = np.where(inside, tok * mask, 0.0).sum(-1)
  return value, np.where(inside, grad * mask, 0.0), (unclipped > clipped) & inside


def make(seed=0, b=6, t=7):
  k = jax.random.split(jax.random.key(seed), 5)
  new = jax.random.uniform(k[0], (b, t), minval=0.1, maxval=3.0)
  old = new + 0.6 * jax.random.normal(k[1], (b, t))  # ratios well outside [0.8, 1.2]
  ref = new + 0.3 * jax.random.normal(k[2], (b, t))
  adv = jax.random.normal(k[3], (b, t))
  mask = jax.random.bernoulli(k[4], 0.7, (b, t)).at[1].set(False)  # one empty span
  return new, old, ref, adv, mask


@pytest.mark.parametrize("per_token", [True, False])
def test_ppo_clip_loss_matches_float64_formula(per_token):
  new, old, ref, adv, mask = make()
  if not per_token:
    adv = jnp.array([0.7, -1.2, 1.5, -0.4, 0.9, -0.8])
  kw = dict(clip_low=0.2, clip_high=0.28, ref_token_nll=ref, kl_coef=0.05)
  f = jax.jit(jax.value_and_grad(lambda x: ppo_clip_loss(x, old, adv, mask, **kw).sum()))
  value, grad = f(new)
  want, want_grad, clipped = np_ppo(new, old, adv, mask, 0.2, 0.28, ref, 0.05)
  # Clipping is active on both sides: ratios below 1 - ε_low with A < 0, above 1 + ε_high
  # with A > 0 (a per-sample A is constant over a row, so both signs need both rows).
  a = np.broadcast_to(np.asarray(adv)[:, None] if adv.ndim == 1 else adv, mask.shape)
  r = np.exp(np.asarray(old) - np.asarray(new))
  assert np.any(clipped & (r > 1.28) & (a > 0)) and np.any(clipped & (r < 0.8) & (a < 0))
  np.testing.assert_allclose(value, want.sum(), rtol=1e-5)
  np.testing.assert_allclose(ppo_clip_loss(new, old, adv, mask, **kw), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  # The clipped branch passes no gradient (without the KL term, which always does).
  no_kl = jax.grad(lambda x: ppo_clip_loss(x, old, adv, mask, clip_high=0.28).sum())(new)
  assert np.all(np.asarray(no_kl)[clipped] == 0.0) and np.any(np.asarray(no_kl)[~clipped] != 0)
  ref_value = reference.ppo_clip_loss(new, old, adv, mask, **kw)
  np.testing.assert_allclose(ppo_clip_loss(new, old, adv, mask, **kw), ref_value, rtol=1e-5)


def test_on_policy_gradient_is_reinforce_and_float_weights():
  new, _, _, adv, mask = make(seed=1)
  weights = jnp.where(mask, 0.5, 0.0)
  grad = jax.grad(lambda x: ppo_clip_loss(x, x + 0.0, adv, weights).sum())(new)
  np.testing.assert_allclose(grad, np.where(mask, 0.5 * np.asarray(adv), 0.0), rtol=1e-6)
  value = ppo_clip_loss(new, new, adv[:, 0], mask)
  np.testing.assert_allclose(value, -np.asarray(adv[:, 0]) * np.asarray(mask).sum(-1), rtol=1e-6)


def test_nan_outside_the_span_never_leaks():
  new, old, ref, adv, mask = make(seed=2)
  bad = lambda x: jnp.where(mask, x, jnp.nan)
  kw = dict(clip_low=0.1, clip_high=0.3, kl_coef=0.1)

  loss = lambda x, o, a, r: ppo_clip_loss(x, o, a, mask, ref_token_nll=r, **kw).sum()
  clean = jax.value_and_grad(loss)(new, old, adv, ref)
  dirty = jax.value_and_grad(loss)(bad(new), bad(old), jnp.where(mask, adv, jnp.inf), bad(ref))
  assert np.isfinite(dirty[0]) and np.all(np.isfinite(dirty[1]))
  np.testing.assert_array_equal(dirty[0], clean[0])
  np.testing.assert_array_equal(dirty[1], clean[1])
  assert np.all(np.asarray(dirty[1])[~np.asarray(mask)] == 0.0)
  assert float(ppo_clip_loss(new, old, adv, mask)[1]) == 0.0  # the empty span


def test_k3_sign_is_kl_of_policy_to_reference():
  """Sampled from π, the mean of k3 estimates KL(π ‖ π_ref) — not KL(π_ref ‖ π)."""
  p = np.array([0.8, 0.15, 0.05])
  q = np.array([0.3, 0.3, 0.4])  # the reference; KL(p‖q) = 0.577, KL(q‖p) = 0.746
  ys = np.random.default_rng(0).choice(3, size=200_000, p=p)
  new = jnp.asarray(-np.log(p[ys]), jnp.float32)[None]
  ref = jnp.asarray(-np.log(q[ys]), jnp.float32)[None]
  est = float(k3_kl(new, ref, jnp.ones(new.shape, bool))[0]) / ys.size
  kl_pq, kl_qp = float(np.sum(p * np.log(p / q))), float(np.sum(q * np.log(q / p)))
  assert abs(est - kl_pq) < 0.02 and abs(est - kl_qp) > 0.1
  penalty = ppo_clip_loss(new, new, jnp.zeros(1), jnp.ones(new.shape, bool))
  with_kl = ppo_clip_loss(
    new, new, jnp.zeros(1), jnp.ones(new.shape, bool), ref_token_nll=ref, kl_coef=1.0
  )
  np.testing.assert_allclose(with_kl - penalty, est * ys.size, rtol=1e-4)


def test_group_advantages_zero_spread_and_formula():
  rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 3.0, 1.0, 2.0, 2.0])
  got = group_advantages(rewards, 4)
  x = np.asarray(rewards, np.float64).reshape(3, 4)
  std = x.std(1, keepdims=True)
  want = (x - x.mean(1, keepdims=True)) / np.where(std > 0, std, 1.0)
  want[1] = 0.0  # zero spread: 0, not NaN and not ±1 from rounding in the mean
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-6)
  assert np.all(np.asarray(got[4:8]) == 0.0)
  np.testing.assert_allclose(got, reference.group_advantages(rewards, 4), rtol=1e-6)
  centred = group_advantages(rewards, 4, normalize_std=False)
  np.testing.assert_allclose(centred, (x - x.mean(1, keepdims=True)).reshape(-1), atol=1e-6)
  assert np.all(np.asarray(centred[4:8]) == 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_nan_or_inf_reward_makes_its_group_nan(bad, normalize_std):
  """A broken reward is loud for its own group (it used to give that group advantages 0, as
  if it carried no signal); the other groups are unchanged."""
  rewards = jnp.array([1.0, 0.0, 1.0, 0.5, 2.0, 2.0])
  got = group_advantages(rewards.at[1].set(bad), 2, normalize_std=normalize_std)
  want = group_advantages(rewards, 2, normalize_std=normalize_std)
  assert np.isnan(got[:2]).all()
  np.testing.assert_array_equal(got[2:], want[2:])


def test_bad_arguments_are_clear_errors():
  new, old, ref, adv, mask = make()
  with pytest.raises(ValueError, match="advantages must have shape"):
    ppo_clip_loss(new, old, adv[:, :3], mask)
  with pytest.raises(ValueError, match="old_token_nll must have the shape"):
    ppo_clip_loss(new, old[:2], adv, mask)
  with pytest.raises(ValueError, match=r"clip_low must be a finite float in \[0, 1\)"):
    ppo_clip_loss(new, old, adv, mask, clip_low=1.0)
  with pytest.raises(ValueError, match="clip_high must be a finite float"):
    ppo_clip_loss(new, old, adv, mask, clip_high=float("nan"))
  with pytest.raises(ValueError, match="needs ref_token_nll"):
    ppo_clip_loss(new, old, adv, mask, kl_coef=0.1)
  with pytest.raises(TypeError, match="kl_coef must be a Python float"):
    ppo_clip_loss(new, old, adv, mask, ref_token_nll=ref, kl_coef=jnp.float32(0.1))
  with pytest.raises(ValueError, match="divide the number of rewards"):
    group_advantages(jnp.ones(6), 4)
  with pytest.raises(ValueError, match="normalize must be one of"):
    policy_loss_terms(jnp.ones(2), jnp.ones(2), normalize="constant")
  with pytest.raises(ValueError, match=r"constant must be a finite float in \(0, inf\)"):
    policy_loss_terms(jnp.ones(2), jnp.ones(2), normalize="sum", constant=0.0)


# ----------------------------------------------------------------------------- normalisation


def policy_batch(seed=0, b=16, t=9, d=5, v=11):
  """A shared head ``w`` (the differentiated parameter) and a batch of very unequal spans."""
  k = jax.random.split(jax.random.key(seed), 6)
  hidden = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v))
  targets = jax.random.randint(k[2], (b, t), 0, v)
  lengths = jnp.array([1, 8, 2, 7, 0, 9, 3, 5, 1, 6, 4, 9, 2, 8, 1, 3])[:b]
  mask = jnp.arange(t)[None] < lengths[:, None]
  rewards = jax.random.bernoulli(k[3], 0.5, (b,)).astype(jnp.float32)
  adv = group_advantages(rewards, 4)
  old_w = w + 0.3 * jax.random.normal(k[4], w.shape)
  ref_w = w + 0.2 * jax.random.normal(k[5], w.shape)
  nll = lambda w: jaxnll.token_nll(hidden @ w, targets)
  return w, dict(old=nll(old_w), ref=nll(ref_w), adv=adv, mask=mask, hidden=hidden, targets=targets)


def terms(w, bt, normalize, constant):
  token = jaxnll.token_nll(bt["hidden"] @ w, bt["targets"])
  sums = ppo_clip_loss(
    token, bt["old"], bt["adv"], bt["mask"], clip_high=0.28, ref_token_nll=bt["ref"], kl_coef=0.1
  )
  return policy_loss_terms(sums, span_counts(bt["mask"]), normalize=normalize, constant=constant)


NORMALIZE = ["tokens", "samples", "sum"]


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_accumulation_and_devices_equal_the_full_batch(normalize):
  w, bt = policy_batch()
  constant = 9.0 * 16  # Dr. GRPO: generation budget x responses of the whole step

  def full(w):
    return finish_loss(*terms(w, bt, normalize, constant), normalize=normalize)

  def accumulated(w, k=4):
    parts = [
      terms(w, jax.tree.map(lambda x, i=i: x[i::k], bt), normalize, constant) for i in range(k)
    ]
    num, den = (sum(p[j] for p in parts) for j in range(2))
    return finish_loss(num, den, normalize=normalize)

  mesh = parallel.make_mesh("data=8")

  def local(w, bt):
    num, den = terms(w, bt, normalize, constant)
    return jax.lax.psum(num, "data"), jax.lax.psum(den, "data")

  def devices(w):
    spec = jax.tree.map(lambda _: P("data"), bt)
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=(P(), P()))(w, bt)
    return finish_loss(*out, normalize=normalize)

  want = jax.jit(jax.value_and_grad(full))(w)
  for fn in (accumulated, devices):
    got = jax.jit(jax.value_and_grad(fn))(w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)

  # Averaging the micro-batch losses instead is not the same loss (the test can fail).
  if normalize != "sum":
    naive = np.mean(
      [
        finish_loss(
          *terms(w, jax.tree.map(lambda x, i=i: x[i::4], bt), normalize, constant),
          normalize=normalize,
        )
        for i in range(4)
      ]
    )
    assert abs(naive - float(want[0])) > 1e-3


def test_normalisations_weigh_long_and_short_responses_differently():
  """Per-token loss 1 on a 2-token and an 8-token response: the token mean gives each token
  1/10, the per-sample mean 1/4 to a short-response token and 1/16 to a long one."""
  mask = jnp.arange(8)[None] < jnp.array([[2], [8]])
  new = jnp.zeros((2, 8))

  def grads(normalize):
    def loss(x):
      sums = ppo_clip_loss(x, x + 0.0, jnp.array([-1.0, -1.0]), mask)
      num, den = policy_loss_terms(sums, span_counts(mask), normalize=normalize, constant=16.0)
      return finish_loss(num, den, normalize=normalize)

    g = jax.grad(loss)(new)
    return float(g[0, 0]), float(g[1, 0])

  np.testing.assert_allclose(grads("tokens"), (-0.1, -0.1), rtol=1e-6)
  np.testing.assert_allclose(grads("samples"), (-0.25, -0.0625), rtol=1e-6)
  np.testing.assert_allclose(grads("sum"), (-1 / 16, -1 / 16), rtol=1e-6)
