"""Tests of jaxnll/distill.py against float64 NumPy, the plain reference and optax."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxnll
from jaxnll import distill, reference
from jaxnll.distill import segment_distill_cross_entropy

# ----------------------------------------------------------------------------- float64 oracle


def np_log_softmax(x, tau=1.0):
  z = np.asarray(x, np.float64) / tau
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_distill(student, teacher, mask, tau=1.0, reduction="sum", kind="cross_entropy"):
  logq, logp = np_log_softmax(student, tau), np_log_softmax(teacher, tau)
  p = np.exp(logp)
  tok = -(p * logq).sum(-1)
  if kind == "kl":
    tok = tok + (p * logp).sum(-1)
  w = np.asarray(mask, np.float64)
  total = np.where(w != 0, tok * w, 0.0).sum(-1)
  if reduction == "sum":
    return total
  count = w.sum(-1)
  return np.where(count != 0, total / np.where(count != 0, count, 1), 0.0)


def np_grad(student, teacher, mask, tau=1.0):
  """``∂/∂student`` of the summed loss: ``w (q - p) / τ``."""
  q, p = np.exp(np_log_softmax(student, tau)), np.exp(np_log_softmax(teacher, tau))
  return np.asarray(mask, np.float64)[..., None] * (q - p) / tau


def make(seed=0, b=3, t=7, v=11, dtype=jnp.float32, scale=3.0, p=0.6):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  student = (scale * jax.random.normal(k1, (b, t, v))).astype(dtype)
  teacher = (scale * jax.random.normal(k2, (b, t, v))).astype(dtype)
  mask = jax.random.bernoulli(k3, p, (b, t))
  return student, teacher, mask


def jit_loss(**kw):
  return jax.jit(functools.partial(jaxnll.distill_cross_entropy, **kw))


def grads(s, t, m, **kw):
  """Gradients of the summed loss with respect to student and teacher, through jit."""
  f = lambda s, t: jaxnll.distill_cross_entropy(s, t, m, **kw).sum()  # noqa: E731
  return jax.jit(jax.grad(f, argnums=(0, 1)))(s, t)


def optax_span_sum(s, t, m, tau):
  ce = optax.softmax_cross_entropy(s / tau, jax.nn.softmax(t / tau))
  return jnp.sum(jnp.where(m, ce, 0.0), axis=-1)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_equals_optax_softmax_cross_entropy_summed_over_the_span(tau):
  s, t, m = make(v=37)
  ours = jit_loss(temperature=tau)(s, t, m)
  assert ours.dtype == jnp.float32 and ours.shape == (3,)
  np.testing.assert_allclose(ours, optax_span_sum(s, t, m, tau), rtol=1e-6)
  np.testing.assert_allclose(ours, np_distill(s, t, m, tau), rtol=1e-6)
  g_s, _ = grads(s, t, m, temperature=tau)
  g_optax = jax.grad(lambda s: optax_span_sum(s, t, m, tau).sum())(s)
  # |g| <= 1/τ; both sides are a couple of f32 ulps of that from the float64 gradient.
  np.testing.assert_allclose(g_s, g_optax, atol=4e-7 / tau)
  np.testing.assert_allclose(g_s, np_grad(s, t, m, tau), atol=2.5e-7 / tau)


@pytest.mark.parametrize("kind", ["cross_entropy", "kl"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference_and_float64_with_float_weights(kind, reduction):
  s, t, _ = make(b=2, t=5, v=13)
  w = jnp.array([[0.0, 0.5, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
  kw = dict(temperature=2.0, reduction=reduction, kind=kind)
  ours = jit_loss(**kw)(s, t, w)
  np.testing.assert_allclose(ours, np_distill(s, t, w, 2.0, reduction, kind), rtol=1e-6)
  np.testing.assert_allclose(ours, reference.distill_cross_entropy(s, t, w, **kw), rtol=1e-6)
  g_ref = jax.grad(lambda s: reference.distill_cross_entropy(s, t, w, **kw).sum())(s)
  np.testing.assert_allclose(grads(s, t, w, **kw)[0], g_ref, atol=1e-7)


def test_teacher_gradient_is_exactly_zero_and_student_gradient_zero_outside_the_span():
  s, t, m = make(b=3, t=8, v=17)
  for kind in ("cross_entropy", "kl"):
    g_s, g_t = grads(s, t, m, temperature=1.5, kind=kind)
    np.testing.assert_array_equal(g_t, 0.0)
    assert g_t.shape == t.shape
    inside = np.asarray(m)
    assert np.all(np.asarray(g_s)[~inside] == 0.0)
    # Cross-entropy and KL differ by the teacher's entropy, a constant for the student.
    np.testing.assert_allclose(g_s, np_grad(s, t, m, 1.5), atol=1e-7)


def test_one_hot_teacher_reduces_to_sequence_nll():
  s, _, m = make(b=3, t=8, v=19)
  targets = jax.random.randint(jax.random.PRNGKey(5), m.shape, 0, 19)
  teacher = 1e4 * jax.nn.one_hot(targets, 19)  # softmax is exactly one-hot in float32
  for reduction in ("sum", "mean"):
    ours = jit_loss(reduction=reduction)(s, teacher, m)
    want = jaxnll.sequence_nll(s, targets, m, reduction=reduction)
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    g = jax.grad(
      lambda x, r=reduction: jaxnll.distill_cross_entropy(x, teacher, m, reduction=r).sum()
    )
    g_nll = jax.grad(lambda x, r=reduction: jaxnll.sequence_nll(x, targets, m, reduction=r).sum())
    np.testing.assert_allclose(jax.jit(g)(s), g_nll(s), atol=1e-7)
  # The KL to a one-hot teacher is the NLL too (a one-hot has no entropy).
  np.testing.assert_allclose(
    jit_loss(kind="kl")(s, teacher, m), jaxnll.sequence_nll(s, targets, m), rtol=1e-6
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_is_nonnegative_zero_for_equal_inputs_and_ce_minus_entropy(dtype):
  s, t, m = make(b=4, t=16, v=64, dtype=dtype, p=1.0)
  for tau in (0.5, 4.0):
    kl = jit_loss(temperature=tau, kind="kl")
    np.testing.assert_array_equal(kl(s, s, m), 0.0)
    value = kl(s, t, m)
    assert np.all(np.asarray(value) > 0.0)
    ce = jit_loss(temperature=tau)(s, t, m)
    entropy = jit_loss(temperature=tau)(t, t, m)  # CE of p against itself = H(p)
    np.testing.assert_allclose(value, ce - entropy, rtol=1e-5)
    np.testing.assert_allclose(value, np_distill(s, t, m, tau, kind="kl"), rtol=1e-5)
    # The gradient of the KL vanishes at student == teacher.
    np.testing.assert_allclose(
      grads(s, s, m, temperature=tau, kind="kl")[0].astype(float), 0.0, atol=1e-7
    )
  # Every token's KL is >= 0, even where student and teacher nearly agree (rounding).
  near = s + jnp.asarray(1e-3, dtype) * t
  tok = jit_loss(kind="kl")(near.reshape(-1, 1, 64), s.reshape(-1, 1, 64), m.reshape(-1, 1))
  assert np.all(np.asarray(tok) >= 0.0)


def test_temperature_convention_no_tau_squared():
  """The value is the plain tempered cross-entropy; ``τ²·loss`` is the Hinton-scaled one."""
  s, t, m = make(b=2, t=6, v=32, p=1.0, scale=1.0)
  s = s - s.mean(-1, keepdims=True)
  t = t - t.mean(-1, keepdims=True)
  tau = 1000.0
  # Unscaled: the gradient is (q - p) / τ, which shrinks like 1 / τ².
  g, _ = grads(s, t, m, temperature=tau)
  # q, p ~ 1/V: a few f32 ulps of 1/V, over τ.
  np.testing.assert_allclose(g, np_grad(s, t, m, tau), atol=4 * 1.2e-7 / (32 * tau))
  # Hinton et al.: with zero-mean logits and large τ, ∇ τ²·CE → (s - t) / V, the gradient of
  # logit matching, whatever τ: the reason for the τ² factor.
  want = np.asarray(s - t, np.float64) / 32
  np.testing.assert_allclose(tau**2 * np.asarray(g), want, atol=2e-3 * np.abs(want).max())
  # ... whereas the unscaled gradient vanishes like 1 / τ²: at τ = 100 it is ~100x larger.
  g100, _ = grads(s, t, m, temperature=100.0)
  ratio = np.abs(np.asarray(g100)).max() / np.abs(np.asarray(g)).max()
  assert 95 < ratio < 105


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_accumulate_in_f32(dtype):
  s, t, m = make(b=2, t=64, v=512, dtype=dtype)
  for tau in (1.0, 2.0):
    out = jit_loss(temperature=tau)(s, t, m)
    assert out.dtype == jnp.float32
    # Exact with respect to the (rounded) inputs: float64 on the upcast logits.
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    np.testing.assert_allclose(out, np_distill(s64, t64, m, tau), rtol=2e-6)
    g_s, g_t = grads(s, t, m, temperature=tau)
    assert g_s.dtype == dtype and g_t.dtype == dtype
    # |g| <= 1/τ: rounding to `dtype` costs at most eps/2 of it, the f32 softmaxes a few ulps.
    bound = (float(jnp.finfo(dtype).eps) / 2 + 1e-6) / tau
    np.testing.assert_allclose(
      np.asarray(g_s, np.float64), np_grad(s64, t64, m, tau), rtol=0, atol=bound
    )


def test_mixed_dtypes_student_bf16_teacher_f32():
  s, t, m = make(b=2, t=8, v=33)
  s = s.astype(jnp.bfloat16)
  out = jit_loss(temperature=1.5)(s, t, m)
  np.testing.assert_allclose(out, np_distill(np.asarray(s, np.float64), t, m, 1.5), rtol=2e-6)
  g_s, _ = grads(s, t, m, temperature=1.5)
  assert g_s.dtype == jnp.bfloat16


def test_large_logits_stay_exact():
  s, t, m = make(b=2, t=5, v=9, scale=1e4)
  for kind in ("cross_entropy", "kl"):
    out = jit_loss(kind=kind)(s, t, m)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_distill(s, t, m, kind=kind), rtol=1e-6)
    assert np.all(np.isfinite(grads(s, t, m, kind=kind)[0]))


def test_minus_inf_vocabulary_padding_in_both_models_counts_for_nothing():
  s, t, m = make(b=2, t=5, v=12)
  pad = jnp.arange(12) >= 9
  s_pad, t_pad = jnp.where(pad, -jnp.inf, s), jnp.where(pad, -jnp.inf, t)
  for kind in ("cross_entropy", "kl"):
    out = jit_loss(kind=kind, temperature=2.0)(s_pad, t_pad, m)
    want = jit_loss(kind=kind, temperature=2.0)(s[..., :9], t[..., :9], m)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    g, _ = grads(s_pad, t_pad, m, kind=kind, temperature=2.0)
    np.testing.assert_allclose(
      g[..., :9], grads(s[..., :9], t[..., :9], m, kind=kind, temperature=2.0)[0], atol=1e-7
    )
    np.testing.assert_array_equal(g[..., 9:], 0.0)


def test_segment_losses_equal_one_call_per_segment():
  s, t, m = make(b=3, t=10, v=13, p=0.8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1] * 10, [2, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
  for reduction, kind in (("sum", "cross_entropy"), ("mean", "kl")):
    kw = dict(temperature=1.5, reduction=reduction, kind=kind)
    out = jax.jit(
      lambda s, t, m, g, kw=kw: distill.segment_distill_cross_entropy(
        s, t, m, g, num_segments=3, **kw
      )
    )(s, t, m, seg)
    assert out.shape == (3, 3) and out.dtype == jnp.float32
    for k in range(1, 4):
      alone = jaxnll.distill_cross_entropy(s, t, m & (seg == k), **kw)
      np.testing.assert_allclose(out[:, k - 1], alone, rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda x: distill.segment_distill_cross_entropy(x, t, m, seg, num_segments=3).sum())(
    s
  )
  in_segment = np.asarray(m & (seg > 0))
  np.testing.assert_allclose(g, np_grad(s, t, in_segment), atol=2.5e-7)
  with pytest.raises(ValueError, match="segment_ids must have the shape of span_mask"):
    distill.segment_distill_cross_entropy(s, t, m, seg[:, :4], num_segments=3)
  with pytest.raises(ValueError, match="num_segments"):
    distill.segment_distill_cross_entropy(s, t, m, seg, num_segments=0)


# ----------------------------------------------------------------------------- degenerate input


def test_empty_spans_and_all_masked_batch_are_exactly_zero():
  s, t, _ = make()
  m = jnp.zeros((3, 7), bool)
  for reduction, kind in (("sum", "kl"), ("mean", "cross_entropy")):
    out = jit_loss(reduction=reduction, kind=kind)(s, t, m)
    np.testing.assert_array_equal(out, 0.0)
    g_s, g_t = grads(s, t, m, reduction=reduction, kind=kind)
    np.testing.assert_array_equal(g_s, 0.0)
    np.testing.assert_array_equal(g_t, 0.0)
  # One empty row among others.
  s, t, m = make(b=3, t=6, v=7, p=1.0)
  m = m.at[1].set(False)
  out = jit_loss(reduction="mean")(s, t, m)
  assert float(out[1]) == 0.0 and np.all(np.asarray(out)[[0, 2]] > 0)


def test_non_finite_logits_outside_the_span_never_leak():
  s, t, m = make(b=2, t=6, v=7)
  outside = ~m[..., None]
  s_bad = jnp.where(outside, jnp.nan, s).at[:, :, 0].set(jnp.where(~m, jnp.inf, s[:, :, 0]))
  t_bad = jnp.where(outside, jnp.nan, t).at[:, :, 1].set(jnp.where(~m, -jnp.inf, t[:, :, 1]))
  for reduction, kind in (("sum", "cross_entropy"), ("mean", "kl")):
    kw = dict(reduction=reduction, kind=kind, temperature=0.7)
    np.testing.assert_array_equal(jit_loss(**kw)(s_bad, t_bad, m), jit_loss(**kw)(s, t, m))
    g_bad, g_t = grads(s_bad, t_bad, m, **kw)
    np.testing.assert_array_equal(g_bad, grads(s, t, m, **kw)[0])
    np.testing.assert_array_equal(g_t, 0.0)


def test_nan_inside_the_span_makes_only_that_sample_nan():
  s, t, _ = make(b=2, t=3, v=4)
  m = jnp.ones((2, 3), bool)
  for kind in ("cross_entropy", "kl"):
    out = jit_loss(kind=kind)(s.at[0, 1, 2].set(jnp.nan), t, m)
    assert np.isnan(out[0]) and np.isfinite(out[1])
    out = jit_loss(kind=kind)(s, t.at[1, 0, 0].set(jnp.nan), m)
    assert np.isnan(out[1]) and np.isfinite(out[0])


def test_checked_path_names_the_problem():
  s, t, m = make(b=2, t=4, v=5, p=1.0)
  safe = jaxnll.checked(distill.distill_cross_entropy)
  np.testing.assert_allclose(safe(s, t, m, temperature=2.0), jit_loss(temperature=2.0)(s, t, m))
  with pytest.raises(
    checkify.JaxRuntimeError,
    match=r"student_logits hold NaN or \+inf at \[1, 1\] \(flat position 5\)",
  ):
    safe(s.at[1, 1, 0].set(jnp.nan), t, m)
  with pytest.raises(checkify.JaxRuntimeError, match=r"teacher_logits are all -inf at \[0, 2\]"):
    safe(s, t.at[0, 2].set(-jnp.inf), m)
  with pytest.raises(checkify.JaxRuntimeError, match="student_logits are -inf where the teacher"):
    safe(s.at[0, 3, 4].set(-jnp.inf), t, m)
  # -inf in both (vocabulary padding) and anything outside the span pass.
  ok = safe(s.at[..., 4].set(-jnp.inf), t.at[..., 4].set(-jnp.inf), m.at[0, 0].set(False))
  assert np.all(np.isfinite(ok))
  ok = safe(s.at[0, 0].set(jnp.nan), t, m.at[0, 0].set(False))
  assert np.all(np.isfinite(ok))


# ----------------------------------------------------------------------------- memory


def test_forward_backward_keeps_no_float32_copy_of_the_logits():
  b, t, v = 2, 128, 2048
  bf16 = jax.ShapeDtypeStruct((b, t, v), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)

  def temp(fn):
    step = jax.value_and_grad(lambda s, t, m: jnp.sum(fn(s, t, m)))
    return jax.jit(step).lower(bf16, bf16, mask).compile().memory_analysis().temp_size_in_bytes

  f32_copy = b * t * v * 4
  for kind in ("cross_entropy", "kl"):
    ours = temp(
      lambda s, t, m, k=kind: jaxnll.distill_cross_entropy(s, t, m, temperature=2.0, kind=k)
    )
    assert ours < f32_copy / 16
  optax_bytes = temp(lambda s, t, m: optax_span_sum(s, t, m, 2.0))
  assert optax_bytes > f32_copy


# ----------------------------------------------------------------------------- transformations


def test_jit_vmap_grad_without_retracing():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, t, m):
    return jax.value_and_grad(
      lambda s: jaxnll.distill_cross_entropy(s, t, m, temperature=2.0).sum()
    )(s)

  for seed in range(3):
    step(*make(seed=seed, b=2, t=5, v=7))
  s, t, m = make(b=2, t=5, v=7)
  out = jax.vmap(lambda x: jaxnll.distill_cross_entropy(x, t, m))(jnp.stack([s, 2 * s]))
  np.testing.assert_allclose(out[1], jaxnll.distill_cross_entropy(2 * s, t, m), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "change,error,match",
  [
    (
      dict(s=jnp.zeros((3, 7, 11), jnp.int32)),
      TypeError,
      "student_logits must be a floating.*int32",
    ),
    (dict(t=jnp.zeros((3, 7, 11), jnp.int32)), TypeError, "teacher_logits must be a floating"),
    (
      dict(s=jnp.zeros((7, 11))),
      ValueError,
      r"student_logits must have shape \[B, T, V\], got shape \(7, 11\)",
    ),
    (
      dict(t=jnp.zeros((3, 7, 12))),
      ValueError,
      r"student_logits and teacher_logits must have the same shape, got \(3, 7, 11\) and \(3, 7, 1",
    ),
    (
      dict(m=jnp.ones((3, 6), bool)),
      ValueError,
      r"student_logits \(3, 7, 11\) and span_mask \(3, 6\)",
    ),
    (dict(m=jnp.ones((3, 7), jnp.int32)), TypeError, "span_mask must be a bool mask"),
    (
      dict(temperature=0.0),
      ValueError,
      r"temperature must be a finite float in \[1e-06, inf\), got 0.0",
    ),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite float in"),
    (dict(temperature=jnp.array(2.0)), TypeError, "temperature must be a Python float"),
    (dict(temperature=True), TypeError, "temperature must be a Python float"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(kind="js"), ValueError, r"kind must be one of \('cross_entropy', 'kl'\)"),
  ],
)
def test_bad_input_errors_name_arguments_and_shapes(change, error, match):
  s, t, m = make()
  s, t, m = change.pop("s", s), change.pop("t", t), change.pop("m", m)
  with pytest.raises(error, match=match):
    jaxnll.distill_cross_entropy(s, t, m, **change)
  # Under jit the same errors surface at trace time.
  with pytest.raises(error, match=match):
    jax.jit(lambda s, t, m: jaxnll.distill_cross_entropy(s, t, m, **change))(s, t, m)


# ----------------------------------------------------------------------------- properties


@st.composite
def problems(draw):
  b = draw(st.sampled_from([1, 3]))
  t = draw(st.sampled_from([1, 6]))
  v = draw(st.sampled_from([1, 2, 40]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
  student = jnp.asarray(scale * rng.standard_normal((b, t, v)), jnp.float32)
  teacher = jnp.asarray(scale * rng.standard_normal((b, t, v)), jnp.float32)
  mask = jnp.asarray(draw(hnp.arrays(np.bool_, (b, t))))
  return student, teacher, mask


_jit_distill = jax.jit(
  jaxnll.distill_cross_entropy, static_argnames=("temperature", "reduction", "kind")
)


@given(
  problems(),
  st.sampled_from([0.5, 2.0]),
  st.sampled_from(["sum", "mean"]),
  st.sampled_from(["cross_entropy", "kl"]),
)
def test_property_matches_float64_and_masked_equals_sliced(problem, tau, reduction, kind):
  s, t, m = problem
  kw = dict(temperature=tau, reduction=reduction, kind=kind)
  out = _jit_distill(s, t, m, **kw)
  # A few f32 ulps of the largest tempered logit per token.
  atol = 8 * float(jnp.finfo(jnp.float32).eps) * float(jnp.abs(s).max() + jnp.abs(t).max()) / tau
  np.testing.assert_allclose(
    out, np_distill(s, t, m, tau, reduction, kind), rtol=2e-6, atol=atol * s.shape[1]
  )
  if kind == "kl":
    assert np.all(np.asarray(out) >= 0.0)
  for b in range(s.shape[0]):
    keep = np.flatnonzero(np.asarray(m[b]))
    ones = jnp.ones((1, len(keep)), bool)
    sliced = _jit_distill(s[b, keep][None], t[b, keep][None], ones, **kw)
    np.testing.assert_allclose(out[b], sliced[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("kind", ["cross_entropy", "kl"])
def test_forward_and_reverse_mode_to_second_order(kind):
  s, t, m = make(b=2, t=3, v=5)
  seg = jnp.array([[1, 1, 2], [2, 0, 1]])
  for f in (
    lambda x: jaxnll.distill_cross_entropy(jnp.asarray(x), t, m, kind=kind, temperature=2.0),
    lambda x: jaxnll.distill_cross_entropy(jnp.asarray(x), t, m * 0.5, reduction="mean"),
    lambda x: segment_distill_cross_entropy(jnp.asarray(x), t, m, seg, num_segments=2),
  ):
    check_grads(f, (s,), order=2, modes=("fwd", "rev"), eps=3e-3, atol=1e-2, rtol=1e-2)


def test_jvp_equals_the_float64_gradient_and_the_teacher_stays_constant():
  s, t, m = make(b=2, t=3, v=5)
  ds, dt = jax.random.normal(jax.random.PRNGKey(3), (2, *s.shape))
  f = lambda s, t: jaxnll.distill_cross_entropy(s, t, m, temperature=1.5)  # noqa: E731
  _, tangent = jax.jvp(f, (s, t), (ds, dt))
  want = np.einsum("btv,btv->b", np_grad(s, t, m, 1.5), np.asarray(ds, np.float64))
  np.testing.assert_allclose(tangent, want, rtol=1e-5, atol=1e-6)
