"""Tests of jaxnll/nll.py against float64 NumPy, the plain reference and optax."""

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
from jaxnll import nll, reference

# ----------------------------------------------------------------------------- float64 oracle


def np_token_nll(logits, targets):
  z = np.asarray(logits, np.float64)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]


def np_softmax(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_sequence_nll(logits, targets, mask, reduction="sum"):
  w = np.asarray(mask, np.float64)
  tok = np.where(w != 0, np_token_nll(logits, np.where(w != 0, targets, 0)), 0.0)
  total = (tok * w).sum(-1)
  if reduction == "sum":
    return total
  count = w.sum(-1)
  return np.where(count != 0, total / np.where(count != 0, count, 1), 0.0)


def make(seed=0, b=3, t=7, v=11, dtype=jnp.float32, scale=3.0, p=0.6):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  logits = (scale * jax.random.normal(k1, (b, t, v))).astype(dtype)
  targets = jax.random.randint(k2, (b, t), 0, v)
  mask = jax.random.bernoulli(k3, p, (b, t))
  return logits, targets, mask


def grad_sum(fn, logits, *args, **kw):
  return jax.jit(jax.grad(lambda x: fn(x, *args, **kw).sum()))(logits)


# ----------------------------------------------------------------------------- token_nll


def test_book_token_costs():
  logits = jnp.log(jnp.array([[0.8, 0.2]] * 2))
  np.testing.assert_allclose(jaxnll.token_nll(logits, jnp.array([0, 1])), [0.223, 1.609], atol=5e-4)


def test_token_nll_matches_float64_and_optax():
  logits, targets, _ = make(v=37)
  ours = jax.jit(jaxnll.token_nll)(logits, targets)
  np.testing.assert_allclose(ours, np_token_nll(logits, targets), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    ours, optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-6
  )
  g = grad_sum(jaxnll.token_nll, logits, targets)
  g_optax = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).sum())(
    logits
  )
  np.testing.assert_allclose(g, g_optax, atol=1e-6)
  onehot = np.eye(37)[np.asarray(targets)]
  np.testing.assert_allclose(g, np_softmax(logits) - onehot, atol=1e-6)


@pytest.mark.parametrize(
  "opts",
  [
    dict(z_loss=1e-2),
    dict(label_smoothing=0.1),
    dict(logit_softcap=2.5),
    dict(z_loss=1e-3, label_smoothing=0.2, logit_softcap=5.0),
  ],
)
def test_token_options_match_reference(opts):
  logits, targets, _ = make(v=19)
  ours = jax.jit(functools.partial(jaxnll.token_nll, **opts))(logits, targets)
  ref = reference.token_nll(logits, targets, **opts)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    grad_sum(jaxnll.token_nll, logits, targets, **opts),
    jax.grad(lambda x: reference.token_nll(x, targets, **opts).sum())(logits),
    atol=2e-6,
  )


def test_label_smoothing_is_optax_smooth_labels():
  logits, targets, _ = make(v=13)
  alpha = 0.3
  labels = optax.smooth_labels(jax.nn.one_hot(targets, 13), alpha)
  np.testing.assert_allclose(
    jaxnll.token_nll(logits, targets, label_smoothing=alpha),
    optax.softmax_cross_entropy(logits, labels),
    rtol=1e-5,
  )


def test_z_loss_adds_squared_logsumexp():
  logits, targets, _ = make(v=13)
  lse = jax.nn.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(
    jaxnll.token_nll(logits, targets, z_loss=1e-2),
    jaxnll.token_nll(logits, targets) + 1e-2 * lse**2,
    rtol=1e-5,
  )


def test_check_grads_numerically():
  logits, targets, _ = make(b=2, t=3, v=5)
  for opts in (dict(), dict(z_loss=0.1, label_smoothing=0.2, logit_softcap=3.0)):
    # check_grads perturbs NumPy copies; the annotations ask for jax arrays.
    f = lambda x, opts=opts: jaxnll.token_nll(jnp.asarray(x), targets, **opts)  # noqa: E731
    check_grads(f, (logits,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- sequence_nll


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_nll_matches_float64(reduction):
  logits, targets, mask = make(b=4, t=9, v=23)
  mask = mask.at[0].set(False)  # one empty span
  ours = jax.jit(functools.partial(jaxnll.sequence_nll, reduction=reduction))(logits, targets, mask)
  assert ours.dtype == jnp.float32 and ours.shape == (4,)
  np.testing.assert_allclose(ours, np_sequence_nll(logits, targets, mask, reduction), rtol=1e-6)
  assert float(ours[0]) == 0.0


def test_book_sequence_numbers():
  p = jnp.exp(-jnp.array([[0.1, 0.3, 0.2, 0.4]]))
  logits = jnp.log(jnp.stack([p, 1 - p], axis=-1))
  targets, span = jnp.zeros((1, 4), int), jnp.ones((1, 4), bool)
  np.testing.assert_allclose(jaxnll.sequence_nll(logits, targets, span), [1.0], rtol=1e-6)
  np.testing.assert_allclose(
    jaxnll.sequence_nll(logits, targets, span, reduction="mean"), [0.25], rtol=1e-6
  )


def test_gradient_is_softmax_minus_onehot_inside_and_exactly_zero_outside():
  logits, targets, mask = make(b=3, t=8, v=17)
  g = np.asarray(grad_sum(jaxnll.sequence_nll, logits, targets, mask))
  expected = np_softmax(logits) - np.eye(17)[np.asarray(targets)]
  inside = np.asarray(mask)
  np.testing.assert_allclose(g[inside], expected[inside], atol=1e-6)
  assert np.all(g[~inside] == 0.0)


def test_mean_gradient_scales_by_the_span_length():
  logits, targets, mask = make(b=2, t=6, v=7, p=1.0)
  g_sum = grad_sum(jaxnll.sequence_nll, logits, targets, mask)
  g_mean = grad_sum(jaxnll.sequence_nll, logits, targets, mask, reduction="mean")
  np.testing.assert_allclose(g_mean, g_sum / 6.0, rtol=1e-6)


def test_float_weights():
  logits, targets, _ = make(b=2, t=5, v=7)
  w = jnp.array([[0.0, 0.5, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(
    jaxnll.sequence_nll(logits, targets, w), np_sequence_nll(logits, targets, w), rtol=1e-6
  )
  np.testing.assert_allclose(
    jaxnll.sequence_nll(logits, targets, w, reduction="mean"),
    np_sequence_nll(logits, targets, w, "mean"),
    rtol=1e-6,
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_logits_accumulate_in_f32(dtype):
  logits, targets, mask = make(b=2, t=64, v=512, dtype=dtype)
  out = jax.jit(jaxnll.sequence_nll)(logits, targets, mask)
  assert out.dtype == jnp.float32
  # Exact with respect to the (rounded) input: same as float64 on the upcast logits.
  np.testing.assert_allclose(
    out, np_sequence_nll(np.asarray(logits, np.float64), targets, mask), rtol=2e-6
  )
  g = grad_sum(jaxnll.sequence_nll, logits, targets, mask)
  assert g.dtype == dtype
  expected = (np_softmax(np.asarray(logits, np.float64)) - np.eye(512)[np.asarray(targets)]) * (
    np.asarray(mask)[..., None]
  )
  # |g| <= 1: rounding to `dtype` costs at most eps/2, the f32 softmax a few f32 ulps.
  bound = float(jnp.finfo(dtype).eps) / 2 + 1e-6
  np.testing.assert_allclose(np.asarray(g, np.float64), expected, rtol=0, atol=bound)


def test_large_logits_stay_exact():
  logits, targets, mask = make(b=2, t=5, v=9, scale=1e4)
  out = jaxnll.sequence_nll(logits, targets, mask)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, np_sequence_nll(logits, targets, mask), rtol=1e-6)
  g = grad_sum(jaxnll.sequence_nll, logits, targets, mask)
  assert np.all(np.isfinite(g))


def test_empty_spans_and_all_masked_batch_are_exactly_zero():
  logits, targets, _ = make()
  mask = jnp.zeros(targets.shape, bool)
  for reduction in ("sum", "mean"):
    out = jaxnll.sequence_nll(logits, targets, mask, reduction=reduction)
    np.testing.assert_array_equal(out, 0.0)
    g = grad_sum(jaxnll.sequence_nll, logits, targets, mask, reduction=reduction)
    np.testing.assert_array_equal(g, 0.0)
  sums, counts = nll.sequence_nll_and_count(logits, targets, mask)
  for normalize in ("tokens", "samples", "sum"):
    assert float(jaxnll.batch_loss(sums, counts, normalize=normalize)) == 0.0


def test_non_finite_logits_and_any_target_outside_the_span_never_leak():
  logits, targets, mask = make(b=2, t=6, v=7)
  outside = ~mask
  poisoned = jnp.where(outside[..., None], jnp.nan, logits)
  poisoned = poisoned.at[:, :, 0].set(jnp.where(outside, jnp.inf, poisoned[:, :, 0]))
  bad_targets = jnp.where(outside, -100, targets)
  for reduction in ("sum", "mean"):
    clean = jaxnll.sequence_nll(logits, targets, mask, reduction=reduction)
    out = jax.jit(functools.partial(jaxnll.sequence_nll, reduction=reduction))(
      poisoned, bad_targets, mask
    )
    np.testing.assert_array_equal(out, clean)
    g = grad_sum(jaxnll.sequence_nll, poisoned, bad_targets, mask, reduction=reduction)
    g_clean = grad_sum(jaxnll.sequence_nll, logits, targets, mask, reduction=reduction)
    np.testing.assert_array_equal(g, g_clean)


def test_out_of_range_target_inside_the_span_makes_only_that_sample_nan():
  logits, targets, _ = make(b=3, t=4, v=5)
  mask = jnp.ones(targets.shape, bool)
  for bad in (5, -1):
    out = jaxnll.sequence_nll(logits, targets.at[1, 2].set(bad), mask)
    assert np.isnan(out[1]) and np.all(np.isfinite(np.asarray(out)[[0, 2]]))
  out = jaxnll.token_nll(logits, targets.at[1, 2].set(99))
  assert np.isnan(out[1, 2]) and np.isfinite(np.delete(np.asarray(out).ravel(), 6)).all()


def test_nan_logits_inside_the_span_make_that_sample_nan():
  logits, targets, _ = make(b=2, t=3, v=4)
  mask = jnp.ones(targets.shape, bool)
  out = jaxnll.sequence_nll(logits.at[0, 1, 2].set(jnp.nan), targets, mask)
  assert np.isnan(out[0]) and np.isfinite(out[1])


def test_checked_path_names_the_problem():
  logits, targets, mask = make(b=2, t=4, v=5, p=1.0)
  safe = jaxnll.checked(jaxnll.sequence_nll)
  np.testing.assert_allclose(
    safe(logits, targets, mask), jaxnll.sequence_nll(logits, targets, mask)
  )
  with pytest.raises(
    checkify.JaxRuntimeError, match=r"targets hold 7 at \[1, 1\] \(flat position 5\)"
  ):
    safe(logits, targets.at[1, 1].set(7), mask)
  with pytest.raises(checkify.JaxRuntimeError, match=r"logits hold NaN or \+inf at \[0, 2\]"):
    safe(logits.at[0, 2, 1].set(jnp.inf), targets, mask)
  # Outside the span anything goes, and the checked path agrees.
  out = safe(logits, targets.at[1, 1].set(-100), mask.at[1, 1].set(False))
  assert np.all(np.isfinite(out))
  # Under the user's own jit and checkify.
  f = jax.jit(
    checkify.checkify(lambda x, t, m: (nll.check_inputs(x, t, m), jaxnll.sequence_nll(x, t, m))[1])
  )
  err, _ = f(logits, targets.at[0, 0].set(-3), mask)
  with pytest.raises(checkify.JaxRuntimeError, match="targets hold -3"):
    err.throw()


# ----------------------------------------------------------------------------- selective


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_selective_value_over_valid_gradient_of_span(reduction):
  logits, targets, span = make(b=3, t=8, v=13)
  valid = span | jax.random.bernoulli(jax.random.PRNGKey(9), 0.5, span.shape)
  sel = functools.partial(jaxnll.selective_sequence_nll, reduction=reduction)
  value = jax.jit(sel)(logits, targets, span, valid)
  np.testing.assert_allclose(value, np_sequence_nll(logits, targets, valid, reduction), rtol=1e-6)
  g_sel = jax.jit(jax.grad(lambda x: sel(x, targets, span, valid).sum()))(logits)
  g_span = grad_sum(jaxnll.sequence_nll, logits, targets, span, reduction=reduction)
  np.testing.assert_allclose(g_sel, g_span, atol=1e-7)
  np.testing.assert_allclose(
    value,
    reference.selective_sequence_nll(logits, targets, span, valid, reduction=reduction),
    rtol=1e-6,
  )
  # Default valid mask: every position.
  np.testing.assert_allclose(
    jaxnll.selective_sequence_nll(logits, targets, span, reduction=reduction),
    np_sequence_nll(logits, targets, np.ones(span.shape), reduction),
    rtol=1e-6,
  )


# ----------------------------------------------------------------------------- packed rows


def test_packed_equals_unpacked_per_sample_losses():
  rng = np.random.default_rng(0)
  vocab, length = 29, 16
  samples = []
  for _ in range(7):
    nx, ny = rng.integers(1, 6), rng.integers(0, 5)
    tokens, span = jaxnll.concat_sample(
      jnp.asarray(rng.integers(0, vocab, nx)), jnp.asarray(rng.integers(0, vocab, ny))
    )
    samples.append((np.asarray(tokens), np.asarray(span)))
  packed = jaxnll.pack_samples(samples, length)
  # A fixed "model": logits depend on the token and its position in its own sample only.
  table = jax.random.normal(jax.random.PRNGKey(1), (vocab, length, vocab))

  def logits_of(tokens, positions):
    return table[tokens, positions]

  targets, mask = jaxnll.shift_targets(packed.tokens, packed.span_mask, packed.segment_ids)
  num_segments = max(len(r) for r in packed.sample_index)
  per_segment = jaxnll.segment_nll(
    logits_of(packed.tokens, packed.positions),
    targets,
    mask,
    packed.segment_ids,
    num_segments=num_segments,
  )
  np.testing.assert_allclose(
    per_segment,
    reference.segment_nll(
      logits_of(packed.tokens, packed.positions),
      targets,
      mask,
      jnp.asarray(packed.segment_ids),
      num_segments=num_segments,
    ),
    rtol=1e-6,
  )
  for row, members in enumerate(packed.sample_index):
    for seg, i in enumerate(members):
      tokens, span = samples[i]
      t, m = jaxnll.shift_targets(jnp.asarray(tokens)[None], jnp.asarray(span)[None])
      alone = jaxnll.sequence_nll(logits_of(tokens, np.arange(len(tokens)))[None], t, m)
      np.testing.assert_allclose(per_segment[row, seg], alone[0], rtol=1e-6, atol=1e-6)
  means = jaxnll.segment_nll(
    logits_of(packed.tokens, packed.positions),
    targets,
    mask,
    packed.segment_ids,
    num_segments=num_segments,
    reduction="mean",
  )
  assert np.all(np.isfinite(means))


# ----------------------------------------------------------------------------- batch reduction


def test_token_normalisation_is_exact_under_accumulation():
  # Micro-batch 1: 2 target tokens at NLL 1; micro-batch 2: 8 tokens at NLL 3.
  parts = [(jnp.array([2.0]), jnp.array([2.0])), (jnp.array([24.0]), jnp.array([8.0]))]
  num = sum(nll.loss_terms(s, c)[0] for s, c in parts)
  den = sum(nll.loss_terms(s, c)[1] for s, c in parts)
  assert float(nll.finish_loss(num, den)) == pytest.approx(2.6)
  averaged = np.mean([float(jaxnll.batch_loss(s, c)) for s, c in parts])
  assert averaged == pytest.approx(2.0)  # the averaging-of-averages bug
  full = jaxnll.batch_loss(jnp.array([2.0, 24.0]), jnp.array([2.0, 8.0]))
  assert float(full) == pytest.approx(2.6)


def test_batch_loss_modes():
  sums, counts = jnp.array([2.0, 24.0, 0.0]), jnp.array([2.0, 8.0, 0.0])
  assert float(jaxnll.batch_loss(sums, counts, normalize="samples")) == pytest.approx(2.0)
  assert float(jaxnll.batch_loss(sums, counts, normalize="sum")) == pytest.approx(26.0)
  with pytest.raises(ValueError, match="normalize must be one of"):
    jaxnll.batch_loss(sums, counts, normalize="batch")


# ----------------------------------------------------------------------------- transformations


def test_jit_vmap_grad_without_retracing():
  logits, targets, mask = make(b=2, t=5, v=7)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(x, t, m):
    return jax.value_and_grad(lambda x: jaxnll.sequence_nll(x, t, m).sum())(x)

  for seed in range(3):
    x, t, m = make(seed=seed, b=2, t=5, v=7)
    loss(x, t, m)
  # vmap over an extra leading axis agrees with a loop.
  stacked = jnp.stack([logits, logits * 2])
  out = jax.vmap(lambda x: jaxnll.sequence_nll(x, targets, mask))(stacked)
  np.testing.assert_allclose(out[1], jaxnll.sequence_nll(logits * 2, targets, mask), rtol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_arguments_and_shapes():
  logits, targets, mask = make(b=2, t=5, v=7)
  with pytest.raises(TypeError, match="logits must be a floating array.*int32"):
    jaxnll.sequence_nll(targets[..., None], targets, mask)
  with pytest.raises(TypeError, match="targets must be an integer array"):
    jaxnll.sequence_nll(logits, targets.astype(jnp.float32), mask)
  with pytest.raises(TypeError, match="span_mask must be a bool mask"):
    jaxnll.sequence_nll(logits, targets, mask.astype(jnp.int32))
  with pytest.raises(ValueError, match=r"logits must have shape \[B, T, V\], got shape \(5, 7\)"):
    jaxnll.sequence_nll(logits[0], targets[0], mask[0])
  with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and targets \(2, 4\)"):
    jaxnll.sequence_nll(logits, targets[:, :4], mask)
  with pytest.raises(ValueError, match=r"targets \(2, 5\) and span_mask \(2, 4\)"):
    jaxnll.sequence_nll(logits, targets, mask[:, :4])
  with pytest.raises(ValueError, match="reduction must be one of"):
    jaxnll.sequence_nll(logits, targets, mask, reduction="avg")
  with pytest.raises(TypeError, match="unexpected keyword"):
    jaxnll.sequence_nll(logits, targets, mask, z_los=0.1)
  with pytest.raises(
    ValueError, match=r"label_smoothing must be a finite float in \[0, 1\], got 1.5"
  ):
    jaxnll.token_nll(logits, targets, label_smoothing=1.5)
  with pytest.raises(
    ValueError, match=r"logit_softcap must be a finite float in \(0, inf\), got 0.0"
  ):
    jaxnll.token_nll(logits, targets, logit_softcap=0.0)
  with pytest.raises(ValueError, match="valid_mask"):
    jaxnll.selective_sequence_nll(logits, targets, mask, mask[:1])
  with pytest.raises(ValueError, match="segment_ids"):
    jaxnll.segment_nll(logits, targets, mask, targets[:, :2], num_segments=2)
  with pytest.raises(ValueError, match="num_segments"):
    jaxnll.segment_nll(logits, targets, mask, targets, num_segments=0)
  # Under jit the same errors surface at trace time.
  with pytest.raises(ValueError, match="span_mask"):
    jax.jit(jaxnll.sequence_nll)(logits, targets, mask[:, :4])


# ----------------------------------------------------------------------------- properties


@st.composite
def problems(draw):
  # A few sizes each (compiles are cached per shape), the values and masks drawn freely.
  b = draw(st.sampled_from([1, 3]))
  t = draw(st.sampled_from([1, 4, 9]))
  v = draw(st.sampled_from([1, 2, 40]))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  scale = draw(st.sampled_from([0.1, 3.0, 50.0]))
  logits = jnp.asarray(scale * rng.standard_normal((b, t, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = draw(hnp.arrays(np.bool_, (b, t)))
  return logits, targets, jnp.asarray(mask)


_jit_sequence_nll = jax.jit(jaxnll.sequence_nll, static_argnames="reduction")


@given(problems(), st.sampled_from(["sum", "mean"]))
def test_property_matches_float64_reference(problem, reduction):
  logits, targets, mask = problem
  out = _jit_sequence_nll(logits, targets, mask, reduction=reduction)
  # `lse - z[target]` cancels in f32: the absolute error per token is a few ulps of |z|.
  atol = 4 * float(jnp.finfo(jnp.float32).eps) * float(jnp.abs(logits).max()) * logits.shape[1]
  np.testing.assert_allclose(
    out, np_sequence_nll(logits, targets, mask, reduction), rtol=2e-6, atol=atol
  )


@given(problems())
def test_property_masked_equals_sliced(problem):
  logits, targets, mask = problem
  out = _jit_sequence_nll(logits, targets, mask)
  for b in range(logits.shape[0]):
    keep = np.flatnonzero(np.asarray(mask[b]))
    sliced = _jit_sequence_nll(
      logits[b, keep][None], targets[b, keep][None], jnp.ones((1, len(keep)), bool)
    )
    np.testing.assert_allclose(out[b], sliced[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- vocabulary shards


@pytest.mark.parametrize("vocab", [16, 13])  # divisible by the 8 shards, and padded to 16
@pytest.mark.parametrize(
  "opts", [dict(), dict(z_loss=1e-2, label_smoothing=0.1, logit_softcap=4.0)]
)
def test_vocab_parallel_equals_single_device(vocab, opts):
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  logits, targets, mask = make(b=4, t=5, v=vocab)
  padded_vocab = 16
  padded = jnp.pad(logits, [(0, 0), (0, 0), (0, padded_vocab - vocab)], constant_values=jnp.nan)

  def local_loss(x, t, m):
    return jaxnll.sequence_nll(x, t, m, vocab_axis="model", vocab_size=vocab, **opts)

  sharded = jax.shard_map(
    local_loss,
    mesh=mesh,
    in_specs=(P("data", None, "model"), P("data"), P("data")),
    out_specs=P("data"),
  )
  value, grad = jax.jit(jax.value_and_grad(lambda x: sharded(x, targets, mask).sum()))(padded)
  ref_value, ref_grad = jax.value_and_grad(
    lambda x: jaxnll.sequence_nll(x, targets, mask, **opts).sum()
  )(logits)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(grad[..., :vocab], ref_grad, atol=1e-6)
  np.testing.assert_array_equal(grad[..., vocab:], 0.0)  # padding columns get nothing
  per_sample = jax.jit(sharded)(padded, targets, mask)
  np.testing.assert_allclose(
    per_sample, jaxnll.sequence_nll(logits, targets, mask, **opts), rtol=1e-6
  )


def test_vocab_size_larger_than_the_columns_is_an_error():
  logits, targets, mask = make(v=7)
  with pytest.raises(ValueError, match="vocab_size 9 is larger than the 7"):
    jaxnll.sequence_nll(logits, targets, mask, vocab_size=9)


# ----------------------------------------------------------------------------- gradient precision


def test_gradient_is_the_exact_softmax_at_bf16_max_logits():
  """exp(z - lse) with a rounded f32 lse gives [-1, 1, 1, 1] here; the softmax is [0, ⅓, ⅓, ⅓]."""
  big = float(jnp.finfo(jnp.bfloat16).max)
  logits = jnp.array([[[0.0, big, big, big]]], jnp.bfloat16)
  targets, span = jnp.zeros((1, 1), int), jnp.ones((1, 1), bool)
  for fn in (
    lambda x: nll.token_nll(x, targets).sum(),
    lambda x: nll.sequence_nll(x, targets, span).sum(),
    lambda x: nll.selective_sequence_nll(x, targets, span).sum(),
  ):
    g = jax.jit(jax.grad(fn))(logits)
    np.testing.assert_allclose(np.asarray(g, np.float32)[0, 0], [-1, 1 / 3, 1 / 3, 1 / 3], 4e-3)


def test_gradient_error_at_f32_logits_near_1e4_matches_optax():
  logits = 1e4 + 3 * jax.random.normal(jax.random.key(0), (4, 1000))
  targets = jnp.arange(4)
  want = np_softmax(logits) - np.eye(1000)[np.asarray(targets)]
  err = lambda g: np.abs(np.asarray(g, np.float64) - want).max()
  ours = err(grad_sum(jaxnll.token_nll, logits, targets))
  theirs = err(
    jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).sum())(logits)
  )
  assert ours < 1e-7 and ours <= 2 * theirs + 1e-8, (ours, theirs)


# ----------------------------------------------------------------------------- temperature


def np_scored(logits, tau, cap=None):
  z = np.asarray(logits, np.float64)
  if cap is not None:
    z = cap * np.tanh(z / cap)
  return z / tau


@pytest.mark.parametrize("tau,cap", [(0.5, None), (2.0, 4.0)])
def test_temperature_scores_logits_over_tau_after_the_cap(tau, cap):
  logits, targets, mask = make(seed=31)
  z = np_scored(logits, tau, cap)
  kw = dict(temperature=tau, logit_softcap=cap)
  np.testing.assert_allclose(
    jax.jit(lambda x: nll.token_nll(x, targets, **kw))(logits),
    np_token_nll(z, targets),
    rtol=1e-5,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    nll.sequence_nll(logits, targets, mask, **kw), np_sequence_nll(z, targets, mask), rtol=1e-5
  )
  # Gradient: (softmax(z) - onehot)·dz/dx, dz/dx = (1 - tanh²(x/c)) / τ.
  dzdx = (
    1.0 / tau if cap is None else (1 - np.tanh(np.asarray(logits, np.float64) / cap) ** 2) / tau
  )
  want = np.where(
    np.asarray(mask)[..., None], (np_softmax(z) - np.eye(11)[np.asarray(targets)]) * dzdx, 0.0
  )
  np.testing.assert_allclose(
    grad_sum(nll.sequence_nll, logits, targets, mask, **kw), want, 1e-5, 1e-6
  )
  sel = grad_sum(nll.selective_sequence_nll, logits, targets, mask, **kw)
  np.testing.assert_allclose(sel, want, 1e-5, 1e-6)
  seg = jnp.asarray(np.arange(7) % 2 + 1)[None].repeat(3, 0)
  per_seg = nll.segment_nll(logits, targets, mask, seg, num_segments=2, **kw)
  for s in (1, 2):
    m = np.asarray(mask) & (np.asarray(seg) == s)
    np.testing.assert_allclose(per_seg[:, s - 1], np_sequence_nll(z, targets, m), rtol=1e-5)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_outside_its_domain_is_refused(tau):
  logits, targets, _ = make()
  with pytest.raises(ValueError, match="temperature"):
    nll.token_nll(logits, targets, temperature=tau)


def test_exact_softmax_backward_needs_no_logits_sized_buffer():
  """Forward + backward temp memory (compile only) stays a small fraction of the bf16 logits:
  the row statistics the backward reads must not bring a ``[..., V]`` f32 broadcast along."""
  shapes = (
    jax.ShapeDtypeStruct((4, 64, 4096), jnp.bfloat16),
    jax.ShapeDtypeStruct((4, 64), jnp.int32),
    jax.ShapeDtypeStruct((4, 64), jnp.bool_),
  )
  step = jax.value_and_grad(lambda z, y, m: jnp.sum(jnp.where(m, nll.token_nll(z, y), 0.0)))
  temp = jax.jit(step).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * 64 * 4096 * 2 / 16, temp


# ----------------------------------------------------------------------------- forward mode


def _fwd_entries():
  _, targets, mask = make(b=2, t=3, v=5)
  w = mask * jnp.array([0.5, 2.0, 1.0])
  seg = jnp.array([[1, 1, 2], [2, 0, 1]])
  opts = dict(z_loss=0.1, label_smoothing=0.2, logit_softcap=3.0, temperature=0.7)
  return [
    ("token_nll", lambda x: jaxnll.token_nll(x, targets)),
    ("token_nll_opts", lambda x: jaxnll.token_nll(x, targets, **opts)),
    ("sequence_nll", lambda x: jaxnll.sequence_nll(x, targets, mask)),
    ("sequence_nll_mean_w", lambda x: jaxnll.sequence_nll(x, targets, w, reduction="mean")),
    # Its value is over valid_mask and its gradient the span's: one function when they agree.
    ("selective", lambda x: jaxnll.selective_sequence_nll(x, targets, mask, mask)),
    ("segment_nll", lambda x: jaxnll.segment_nll(x, targets, mask, seg, num_segments=2)),
  ]


@pytest.mark.parametrize("entry", _fwd_entries(), ids=lambda e: e[0])
def test_forward_and_reverse_mode_to_second_order(entry):
  logits, _, _ = make(b=2, t=3, v=5)
  f = lambda x: entry[1](jnp.asarray(x))  # noqa: E731
  # The library computes in float32: steps of 3e-3 keep the finite differences above its noise.
  check_grads(f, (logits,), order=2, modes=("fwd", "rev"), eps=3e-3, atol=1e-2, rtol=1e-2)


def test_jvp_hessian_and_jacfwd_equal_the_plain_log_softmax():
  logits, targets, mask = make(b=2, t=3, v=5)
  tangent = jax.random.normal(jax.random.PRNGKey(7), logits.shape)

  def plain(x):
    tok = -jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(mask, tok, 0.0), axis=-1)

  ours = lambda x: jaxnll.sequence_nll(x, targets, mask)  # noqa: E731
  out, t = jax.jvp(ours, (logits,), (tangent,))
  out_p, t_p = jax.jvp(plain, (logits,), (tangent,))
  np.testing.assert_allclose(out, out_p, rtol=1e-6)
  np.testing.assert_allclose(t, t_p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jacfwd(ours)(logits), jax.jacrev(plain)(logits), atol=1e-6)
  h = jax.jit(jax.hessian(lambda x: ours(x).sum()))(logits)
  np.testing.assert_allclose(h, jax.hessian(lambda x: plain(x).sum())(logits), atol=1e-6)
  # Hessian-vector product, forward over reverse.
  hvp = jax.jvp(jax.grad(lambda x: ours(x).sum()), (logits,), (tangent,))[1]
  np.testing.assert_allclose(hvp, jnp.einsum("abcdef,def->abc", h, tangent), atol=1e-5)


def test_forward_mode_keeps_the_bad_value_rules():
  logits, targets, mask = make(b=2, t=3, v=5)
  mask = mask.at[:, 0].set(True)
  bad = jnp.where(mask[..., None], logits, jnp.nan).at[0, 0, 1].set(jnp.nan)
  out, t = jax.jvp(lambda x: jaxnll.sequence_nll(x, targets, mask), (bad,), (jnp.ones_like(bad),))
  assert np.isnan(out[0]) and np.isnan(t[0])  # a NaN inside sample 0's span is loud
  assert np.isfinite(out[1]) and np.isfinite(t[1])  # NaN outside sample 1's span reaches nothing
  bad_id = targets.at[1, 0].set(5)
  out, t = jax.jvp(lambda x: jaxnll.sequence_nll(x, bad_id, mask), (logits,), (logits,))
  assert np.isnan(t[1]) and np.isfinite(t[0])


def test_fused_entries_name_the_logits_entries_for_forward_mode():
  h, w = jnp.ones((1, 2, 3)), jnp.ones((3, 5))
  y, m = jnp.zeros((1, 2), int), jnp.ones((1, 2), bool)
  calls = [
    lambda h: jaxnll.linear_sequence_nll(h, w, y, m, implementation="chunked"),
    lambda h: jaxnll.linear_nll_loss(h, w, y, m)[0],
    lambda h: jaxnll.linear_token_nll(h, w, y, m),
  ]
  for f in calls:
    with pytest.raises(TypeError, match=r"reverse-mode only.*jaxnll\.sequence_nll\(hidden @"):
      jax.jvp(f, (h,), (h,))
  # The plain path too: its matmul is gated on the per-row cotangent (a custom_vjp).
  with pytest.raises(TypeError, match="reverse-mode only"):
    jax.jvp(lambda h: jaxnll.linear_sequence_nll(h, w, y, m, implementation="xla"), (h,), (h,))
  # The way the message names: the loss from logits, forward mode included.
  _, tangent = jax.jvp(lambda h: jaxnll.sequence_nll(h @ w, y, m), (h,), (h,))
  assert np.isfinite(tangent).all()


# ----------------------------------------------------------------------------- loud reductions


def test_batch_loss_names_integer_sums():
  with pytest.raises(TypeError, match="sums must be a floating array"):
    jaxnll.batch_loss(jnp.array([2, 24]), jnp.array([2.0, 8.0]))
  ints = jaxnll.batch_loss(jnp.array([2.0, 24.0]), jnp.array([2, 8]))  # integer counts are fine
  assert ints == jaxnll.batch_loss(jnp.array([2.0, 24.0]), jnp.array([2.0, 8.0]))


def test_mean_of_a_span_whose_weights_sum_to_zero_is_loud():
  # A span is empty by its positions: [1, -1] is two positions with no mean; [0, 0] is empty.
  logits, targets, _ = make(b=3, t=3, v=5)
  w = jnp.array([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
  f = lambda x: jaxnll.sequence_nll(x, targets, w, reduction="mean")  # noqa: E731
  out = f(logits)
  assert np.isnan(out[0]) and out[1] == 0 and np.isfinite(out[2])
  g = lambda ct: jax.grad(lambda x: jnp.vdot(f(x), ct))(logits)  # noqa: E731
  assert np.isnan(g(jnp.array([1.0, 0.0, 0.0]))).any()  # loud in the gradient
  clean = g(jnp.array([0.0, 0.0, 1.0]))
  assert np.isfinite(clean).all() and np.all(clean[:2] == 0)  # nothing leaks from it
  ones = jnp.ones((3, 3), int)
  seg = jaxnll.segment_nll(logits, targets, w, ones, num_segments=1, reduction="mean")
  np.testing.assert_array_equal(np.isnan(seg[:, 0]), [True, False, False])


def test_negative_segment_id_inside_the_span_is_loud_not_dropped():
  logits, targets, _ = make(b=2, t=3, v=5)
  span = jnp.ones((2, 3), bool)
  seg = jnp.array([[1, -1, 2], [1, 1, 2]])
  out = jaxnll.segment_nll(logits, targets, span, seg, num_segments=2)
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
  g = jax.grad(lambda x: jaxnll.segment_nll(x, targets, span, seg, num_segments=2)[0].sum())
  assert np.isnan(g(logits)).any()
  g1 = jax.grad(lambda x: jaxnll.segment_nll(x, targets, span, seg, num_segments=2)[1].sum())
  assert np.isfinite(g1(logits)).all()
  # Outside the span a negative id is padding like any other: nothing happens.
  quiet = jaxnll.segment_nll(logits, targets, span.at[0, 1].set(False), seg, num_segments=2)
  assert np.isfinite(quiet).all()
  with pytest.raises(checkify.JaxRuntimeError, match=r"segment_ids hold -1 at \[0, 1\]"):
    jaxnll.checked(jaxnll.segment_nll)(logits, targets, span, seg, num_segments=2)
  dist = jaxnll.distill.segment_distill_cross_entropy(logits, logits, span, seg, num_segments=2)
  assert np.isnan(dist[0]).all() and np.isfinite(dist[1]).all()
