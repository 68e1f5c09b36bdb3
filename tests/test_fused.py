"""Tests of jaxnll/fused.py: the fused head + loss against the materialised-logits reference."""

import os

# Multi-device tests fake 8 CPU devices; conftest.py sets this too (kept for running alone).
_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import chex  # noqa: E402
import hypothesis.extra.numpy as hnp  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jax.experimental import checkify  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import jaxnll  # noqa: E402
from jaxnll import fused, reference  # noqa: E402
from jaxnll.fused import (  # noqa: E402
  linear_nll_loss,
  linear_segment_nll,
  linear_sequence_nll,
  linear_token_nll,
)

B, T, D, V = 3, 7, 8, 36  # N = 21 positions


def make(seed=0, b=B, t=T, d=D, v=V, p=0.6, dtype=jnp.float32, with_bias=True):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (b, t, d)).astype(dtype)
  weight = (jax.random.normal(k[1], (d, v)) / np.sqrt(d) * 2).astype(dtype)
  bias = (0.3 * jax.random.normal(k[2], (v,))).astype(dtype) if with_bias else None
  targets = jax.random.randint(k[3], (b, t), 0, v)
  mask = jax.random.bernoulli(k[4], p, (b, t))
  return hidden, weight, bias, targets, mask


def ref_seq(hidden, weight, bias, targets, mask, **kw):
  """The plain reference: materialised f32 logits, then reference.sequence_nll."""
  logits = jnp.einsum("btd,dv->btv", hidden, weight, precision="highest")
  if bias is not None:
    logits = logits + bias
  return reference.sequence_nll(logits, targets, mask, **kw)


def value_and_grads(fn, hidden, weight, bias, *, jit=True):
  """Value and (dhidden, dweight, dbias) of ``sum(fn(hidden, weight, bias))``."""
  argnums = (0, 1) if bias is None else (0, 1, 2)
  f = jax.value_and_grad(lambda h, w, b: jnp.sum(fn(h, w, b)), argnums=argnums)
  return (jax.jit(f) if jit else f)(hidden, weight, bias)


def assert_close(got, want, rtol=1e-5, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol, atol)


def np_sequence_nll(hidden, weight, bias, targets, mask):
  """Float64 NumPy oracle of the summed span NLL."""
  z = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
  if bias is not None:
    z = z + np.asarray(bias, np.float64)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  tok = lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]
  return np.where(np.asarray(mask), tok, 0.0).sum(-1)


# ----------------------------------------------------------------------------- values and grads

# (token_chunk, vocab_chunk): N = 21 positions (13 targets), V = 36.
CHUNKS = [(7, 12), (4, 10), (21, 36), (1, 5), (64, 64)]


@pytest.mark.parametrize("token_chunk,vocab_chunk", CHUNKS)
def test_matches_reference_for_chunks_that_do_and_dont_divide(token_chunk, vocab_chunk):
  hidden, weight, bias, targets, mask = make()
  kw = dict(token_chunk=token_chunk, vocab_chunk=vocab_chunk)
  got = value_and_grads(
    lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, **kw), hidden, weight, bias
  )
  want = value_and_grads(lambda h, w, b: ref_seq(h, w, b, targets, mask), hidden, weight, bias)
  assert_close(got, want)
  per_sample = jax.jit(lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, **kw))
  np.testing.assert_allclose(
    per_sample(hidden, weight, bias),
    np_sequence_nll(hidden, weight, bias, targets, mask),
    rtol=2e-6,
    atol=2e-6,
  )


_HYP_FUSED = jax.jit(
  jax.value_and_grad(
    lambda h, w, b, y, m: jnp.sum(
      linear_sequence_nll(h, w, y, m, bias=b, token_chunk=4, vocab_chunk=10)
    ),
    argnums=(0, 1, 2),
  )
)
_HYP_REF = jax.jit(
  jax.value_and_grad(lambda h, w, b, y, m: jnp.sum(ref_seq(h, w, b, y, m)), argnums=(0, 1, 2))
)


@given(hnp.arrays(np.bool_, (B, T)), st.integers(0, 2**16))
def test_any_mask_matches_reference(mask, seed):
  """Masks nobody thought of (fixed shapes: one compilation for all examples)."""
  hidden, weight, bias, targets, _ = make(seed=seed % 7)
  args = (hidden, weight, bias, targets, jnp.asarray(mask))
  assert_close(_HYP_FUSED(*args), _HYP_REF(*args))


def test_gradient_is_analytic_and_zero_outside_span():
  hidden, weight, _, targets, mask = make(seed=1, with_bias=False)
  fn = jax.jit(
    jax.grad(
      lambda h: linear_sequence_nll(h, weight, targets, mask, token_chunk=4, vocab_chunk=10).sum()
    )
  )
  dh = fn(hidden)
  z = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = p - np.eye(V)[np.asarray(targets)]
  want = np.where(np.asarray(mask)[..., None], g @ np.asarray(weight, np.float64).T, 0.0)
  np.testing.assert_allclose(dh, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(dh)[~np.asarray(mask)] == 0.0)


def test_numerical_gradients():
  hidden, weight, bias, targets, mask = make(seed=2, b=2, t=3, d=4, v=9)
  fn = jax.jit(
    lambda h, w, b: linear_sequence_nll(
      h, w, targets, mask, bias=b, token_chunk=2, vocab_chunk=4, z_loss=1e-2
    )
  )
  check_grads(fn, (hidden, weight, bias), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
  "opts",
  [
    dict(z_loss=1e-2),
    dict(label_smoothing=0.1),
    dict(logit_softcap=2.5),
    dict(reduction="mean"),
    dict(z_loss=1e-3, label_smoothing=0.2, logit_softcap=4.0, reduction="mean"),
  ],
  ids=lambda o: ",".join(o),
)
def test_options_match_reference(opts):
  hidden, weight, bias, targets, mask = make(seed=3)
  kw = dict(token_chunk=4, vocab_chunk=10)
  got = value_and_grads(
    lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, **kw, **opts),
    hidden,
    weight,
    bias,
  )
  want = value_and_grads(
    lambda h, w, b: ref_seq(h, w, b, targets, mask, **opts), hidden, weight, bias
  )
  assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_float_weights_mask(reduction):
  hidden, weight, bias, targets, mask = make(seed=4)
  weights = jnp.where(mask, jax.random.uniform(jax.random.key(9), mask.shape), 0.0)
  kw = dict(reduction=reduction, token_chunk=5, vocab_chunk=7)
  got = value_and_grads(
    lambda h, w, b: linear_sequence_nll(h, w, targets, weights, bias=b, **kw), hidden, weight, bias
  )
  want = value_and_grads(
    lambda h, w, b: ref_seq(h, w, b, targets, weights, reduction=reduction), hidden, weight, bias
  )
  assert_close(got, want)


def test_implementation_xla_is_jaxnll_sequence_nll():
  hidden, weight, bias, targets, mask = make(seed=5)
  got = linear_sequence_nll(hidden, weight, targets, mask, bias=bias, implementation="xla")
  want = jaxnll.sequence_nll(hidden @ weight + bias, targets, mask)
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_span_is_exactly_zero_with_zero_grads(reduction):
  hidden, weight, bias, targets, mask = make(seed=6)
  mask = mask.at[1].set(False)
  kw = dict(reduction=reduction, token_chunk=4, vocab_chunk=10)
  fn = lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, **kw)
  val, (dh, _, _) = value_and_grads(fn, hidden, weight, bias)
  assert float(jax.jit(fn)(hidden, weight, bias)[1]) == 0.0
  assert np.all(np.asarray(dh[1]) == 0.0)
  assert np.isfinite(float(val))


def test_all_masked_batch_is_zero_never_nan():
  hidden, weight, bias, targets, _ = make(seed=7)
  mask = jnp.zeros((B, T), bool)
  hidden = hidden.at[0, 0].set(jnp.nan)
  fn = lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, token_chunk=4)
  np.testing.assert_array_equal(jax.jit(fn)(hidden, weight, bias), np.zeros(B))
  _, grads = value_and_grads(fn, hidden, weight, bias)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))
  (loss, sums), grads = jax.jit(
    jax.value_and_grad(
      lambda h, w, b: linear_nll_loss(h, w, targets, mask, bias=b), argnums=(0, 1, 2), has_aux=True
    )
  )(hidden, weight, bias)
  assert float(loss) == 0.0 and np.all(np.asarray(sums) == 0.0)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


def test_nan_and_inf_outside_span_never_reach_values_or_grads():
  hidden, weight, bias, targets, mask = make(seed=8)
  outside = ~np.asarray(mask)
  dirty = jnp.where(outside[..., None], jnp.nan, hidden).at[0, 0, 0].set(jnp.inf)
  dirty = jnp.where(jnp.asarray(outside)[..., None], dirty, hidden)
  bad_targets = jnp.where(mask, targets, -100)
  fn = lambda h, w, b, y: linear_sequence_nll(h, w, y, mask, bias=b, token_chunk=4, vocab_chunk=7)
  clean = value_and_grads(lambda h, w, b: fn(h, w, b, targets), hidden, weight, bias)
  got = value_and_grads(lambda h, w, b: fn(h, w, b, bad_targets), dirty, weight, bias)
  assert_close(got, clean, rtol=0, atol=0)


def test_out_of_range_target_inside_span_makes_that_sample_nan():
  hidden, weight, bias, targets, _ = make(seed=9)
  mask = jnp.ones((B, T), bool)
  targets = targets.at[1, 3].set(V).at[2, 0].set(-1)
  out = jax.jit(lambda *a: linear_sequence_nll(*a, bias=bias, token_chunk=4))(
    hidden, weight, targets, mask
  )
  assert np.isfinite(float(out[0]))
  assert np.isnan(float(out[1])) and np.isnan(float(out[2]))
  loss, sums = linear_nll_loss(hidden, weight, targets, mask, bias=bias, token_chunk=4)
  assert np.isnan(float(loss)) and np.isnan(float(sums[1])) and np.isfinite(float(sums[0]))


def test_checked_path_names_the_first_bad_position():
  hidden, weight, bias, targets, mask = make(seed=18)
  mask = jnp.ones((B, T), bool).at[0, :2].set(False)
  safe = jaxnll.checked(linear_nll_loss)
  loss, _ = safe(hidden, weight, targets.at[0, 0].set(-100), mask, bias=bias)  # outside: fine
  assert np.isfinite(float(loss))
  with pytest.raises(
    checkify.JaxRuntimeError, match=rf"targets hold {V} at \[1, 2\] \(flat position 9\)"
  ):
    safe(hidden, weight, targets.at[1, 2].set(V), mask)
  with pytest.raises(checkify.JaxRuntimeError, match=r"hidden is not finite at \[0, 3\]"):
    safe(hidden.at[0, 3, 1].set(jnp.inf), weight, targets, mask)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("entry", ["per_sample", "scalar"])
def test_bf16_inputs_accumulate_in_f32_and_return_input_dtype_grads(entry):
  hidden, weight, bias, targets, mask = make(seed=10, d=32, v=300, dtype=jnp.bfloat16)
  if entry == "per_sample":
    fn = lambda h, w, b: linear_sequence_nll(h, w, targets, mask, bias=b, vocab_chunk=128)
  else:
    fn = lambda h, w, b: linear_nll_loss(h, w, targets, mask, bias=b, normalize="sum")[0]
  val, grads = value_and_grads(fn, hidden, weight, bias)
  assert jax.eval_shape(fn, hidden, weight, bias).dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  # The same bf16 numbers in float32: f32 accumulation puts the value within f32 rounding.
  up = [x.astype(jnp.float32) for x in (hidden, weight, bias)]
  want_val, want_grads = value_and_grads(
    lambda h, w, b: ref_seq(h, w, b, targets, mask), *up, jit=False
  )
  np.testing.assert_allclose(val, want_val, rtol=1e-5)
  for g, w in zip(grads, want_grads, strict=True):
    # bf16 has an 8-bit mantissa: gradients agree to bf16 rounding of the f32 ones.
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2 * np.abs(w).max())


# ----------------------------------------------------------------------------- scalar entry


def _scalar_pair(targets, mask, normalize, schedule, **opts):
  def fused_loss(h, w, b):
    kw = dict(normalize=normalize, schedule=schedule, token_chunk=4, vocab_chunk=10)
    return linear_nll_loss(h, w, targets, mask, bias=b, **kw, **opts)

  def ref_loss(h, w, b):
    sums = ref_seq(h, w, b, targets, mask, **opts)
    return jaxnll.batch_loss(sums, mask.sum(1).astype(jnp.float32), normalize=normalize), sums

  return fused_loss, ref_loss


@pytest.mark.parametrize(
  "schedule,normalize",
  [("one_pass", "tokens"), ("two_pass", "tokens"), ("one_pass", "samples"), ("two_pass", "sum")],
)
def test_scalar_entry_matches_reference(schedule, normalize):
  hidden, weight, bias, targets, mask = make(seed=11)
  mask = mask.at[2].set(False)
  fused_loss, ref_loss = _scalar_pair(
    targets, mask, normalize, schedule, z_loss=1e-3, label_smoothing=0.1
  )
  vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  assert_close(vg(fused_loss)(hidden, weight, bias), vg(ref_loss)(hidden, weight, bias))


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_scalar_entry_aux_is_differentiable_and_primal_needs_no_grads(schedule):
  hidden, weight, bias, targets, mask = make(seed=19)
  fused_loss, ref_loss = _scalar_pair(targets, mask, "tokens", schedule, logit_softcap=3.0)
  # The aux output is differentiable too (one extra recomputing pass).
  both = lambda f: jax.jit(
    jax.grad(lambda *a: (lambda loss, sums: loss + jnp.sum(sums**2))(*f(*a)), argnums=(0, 1, 2))
  )
  assert_close(both(fused_loss)(hidden, weight, bias), both(ref_loss)(hidden, weight, bias))
  # Primal only (no gradient pass).
  assert_close(jax.jit(fused_loss)(hidden, weight, bias), ref_loss(hidden, weight, bias))


@pytest.mark.parametrize(
  "implementation,schedule",
  [("chunked", "one_pass"), ("chunked", "two_pass"), ("token_chunked", "auto"),
   ("pallas_tpu", "auto"), ("xla", "auto")],
)  # fmt: skip
def test_scalar_entry_sums_per_segment_in_the_same_pass(implementation, schedule):
  """With ``segment_ids`` the scalar entry's aux is per segment (equal to ``segment_nll`` on
  the logits, in value and in gradients for its own cotangent); the loss is unchanged, and a
  span position of segment 0 counts in the loss and in no segment."""
  hidden, weight, bias, targets, mask = make(seed=23)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3], [0, 0, 3, 3, 3, 3, 1]])
  ct = jax.random.normal(jax.random.key(5), (B, 3))
  kw = dict(implementation=implementation, schedule=schedule, token_chunk=4, vocab_chunk=10)

  def fused_fn(h, w, b):
    loss, sums = linear_nll_loss(
      h, w, targets, mask, bias=b, segment_ids=seg, num_segments=3, z_loss=1e-3, **kw
    )
    return loss + jnp.sum(sums * ct), (loss, sums)

  def logits_fn(h, w, b):
    logits = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b
    sums, counts = jaxnll.nll.sequence_nll_and_count(logits, targets, mask, z_loss=1e-3)
    loss = jaxnll.batch_loss(sums, counts)
    per = jaxnll.segment_nll(logits, targets, mask, seg, num_segments=3, z_loss=1e-3)
    return loss + jnp.sum(per * ct), (loss, per)

  run = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  assert_close(run(fused_fn)(hidden, weight, bias), run(logits_fn)(hidden, weight, bias))
  # Primal only, and the aux without its cotangent (what has_aux passes): the loss's gradient.
  loss_only = lambda f: jax.jit(jax.grad(lambda *a: f(*a)[1][0], argnums=(0, 1, 2)))
  assert_close(
    loss_only(fused_fn)(hidden, weight, bias), loss_only(logits_fn)(hidden, weight, bias)
  )


def test_scalar_entry_segments_need_both_arguments():
  hidden, weight, _, targets, mask = make(seed=23)
  with pytest.raises(ValueError, match="num_segments is given without segment_ids"):
    linear_nll_loss(hidden, weight, targets, mask, num_segments=2)
  with pytest.raises(ValueError, match="num_segments"):
    linear_nll_loss(hidden, weight, targets, mask, segment_ids=jnp.ones((B, T), int))


def test_scalar_entry_reference_implementation():
  hidden, weight, bias, targets, mask = make(seed=12)
  got = linear_nll_loss(hidden, weight, targets, mask, bias=bias, implementation="xla")
  sums, counts = jaxnll.nll.sequence_nll_and_count(hidden @ weight + bias, targets, mask)
  np.testing.assert_array_equal(got[0], jaxnll.batch_loss(sums, counts))
  np.testing.assert_array_equal(got[1], sums)


def test_scalar_entry_without_bias_and_f32_default_schedule():
  hidden, weight, _, targets, mask = make(seed=13, with_bias=False)
  fn = lambda h, w: linear_nll_loss(h, w, targets, mask, vocab_chunk=10)[0]
  got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, weight)
  want = jax.value_and_grad(
    lambda h, w: jnp.sum(ref_seq(h, w, None, targets, mask)) / jnp.sum(mask), argnums=(0, 1)
  )(hidden, weight)
  assert_close(got, want)


@pytest.mark.parametrize("argnums", [0, (1, 2)])
def test_gradient_of_a_subset_of_inputs(argnums):
  """A frozen head (or hidden) skips its gradient matmul; the others are unchanged."""
  hidden, weight, bias, targets, mask = make(seed=17)
  kw = dict(bias=None, token_chunk=4, vocab_chunk=10)

  def per_sample(h, w, b):
    return jnp.sum(linear_sequence_nll(h, w, targets, mask, **(kw | dict(bias=b))))

  def scalar(h, w, b, schedule):
    return linear_nll_loss(h, w, targets, mask, schedule=schedule, **(kw | dict(bias=b)))[0]

  def ref(h, w, b):
    return jnp.sum(ref_seq(h, w, b, targets, mask))

  args = (hidden, weight, bias)
  want = jax.grad(ref, argnums)(*args)
  assert_close(jax.jit(jax.grad(per_sample, argnums))(*args), want)
  n = jnp.sum(mask)
  for schedule in ("one_pass", "two_pass"):
    got = jax.jit(jax.grad(lambda *a, s=schedule: scalar(*a, s), argnums))(*args)
    assert_close(jax.tree.map(lambda g: g * n, got), want)


# ----------------------------------------------------------------------------- transformations


def test_vmap_jit_grad_without_retracing():
  hidden, weight, bias, targets, mask = make(seed=14)
  hs = jnp.stack([hidden, 2 * hidden])
  ms = jnp.stack([mask, ~mask])
  ys = jnp.stack([targets, targets[::-1]])

  def fused_fn(h, w):
    per = jax.vmap(
      lambda h, y, m: linear_sequence_nll(h, w, y, m, bias=bias, token_chunk=4, vocab_chunk=10)
    )(h, ys, ms)
    loss = jax.vmap(
      lambda h, y, m: linear_nll_loss(h, w, y, m, bias=bias, token_chunk=4, vocab_chunk=10)[0]
    )(h, ys, ms)
    return jnp.sum(per) + jnp.sum(loss)

  def ref_fn(h, w):
    per = jax.vmap(lambda h, y, m: ref_seq(h, w, bias, y, m))(h, ys, ms)
    loss = jax.vmap(lambda s, m: jnp.sum(s) / jnp.sum(m))(per, ms)
    return jnp.sum(per) + jnp.sum(loss)

  grad = jax.jit(
    chex.assert_max_traces(lambda h, w: jax.value_and_grad(fused_fn, (0, 1))(h, w), n=1)
  )
  for h in (hs, hs + 1.0):  # same shapes: traced once
    assert_close(grad(h, weight), jax.value_and_grad(ref_fn, argnums=(0, 1))(h, weight))


def test_shard_map_with_batch_sharded():
  n = len(jax.devices())
  assert n == 8, "conftest / this file fake 8 CPU devices"
  hidden, weight, bias, targets, mask = make(seed=15, b=8, t=5)
  mesh = jax.make_mesh((n,), ("b",), axis_types=(jax.sharding.AxisType.Explicit,))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(hidden, P("b")), put(weight, P()), put(bias, P()))
  ys, ms = put(targets, P("b")), put(mask, P("b"))

  def local(h, w, b, y, m):
    per = linear_sequence_nll(h, w, y, m, bias=b, token_chunk=3, vocab_chunk=10)
    loss, _ = linear_nll_loss(h, w, y, m, bias=b, normalize="sum", token_chunk=3, vocab_chunk=10)
    return per, jax.lax.psum(loss, "b")

  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P("b"), P(), P(), P("b"), P("b")),
    out_specs=(P("b"), P()),
  )

  def total(h, w, b):
    per, loss = sharded(h, w, b, ys, ms)
    return jnp.sum(per) + loss, per

  (val, per), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(*args)
  want_per = ref_seq(hidden, weight, bias, targets, mask)
  want = jax.value_and_grad(
    lambda h, w, b: 2 * jnp.sum(ref_seq(h, w, b, targets, mask)), argnums=(0, 1, 2)
  )(hidden, weight, bias)
  np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-5, atol=1e-5)
  assert_close((val, grads), want)


# ----------------------------------------------------------------------------- cost follows targets


def test_compaction_puts_targets_first_and_counts_chunks():
  hidden, weight, bias, targets, _ = make(seed=16)
  mask = jnp.zeros((B, T), bool).at[0, 5].set(True).at[2, 1:4].set(True)
  plan = fused.compact.Plan(fused.compact.TokenOptions(), token_chunk=2, vocab_chunk=8)
  bt = fused.compact.Compacted(plan, hidden, weight, bias, targets, mask)
  np.testing.assert_array_equal(bt.order[:4], [5, 2 * T + 1, 2 * T + 2, 2 * T + 3])
  assert int(bt.num_chunks) == 2  # 4 targets in chunks of 2: the other 9 chunks never run
  np.testing.assert_array_equal(bt.valid.sum(), 4)


def test_every_implementation_is_a_kernel_of_one_table():
  """``implementation=`` names the rows of one table; each row satisfies the written
  ``Kernel`` protocol, each compacted kernel module the ``Passes`` protocol."""
  assert fused.IMPLEMENTATIONS == tuple(fused.api.TABLE)
  for name, impl in fused.api.TABLE.items():
    assert isinstance(impl, fused.kernel.Kernel), name
  for module in (fused.chunked, fused.token_chunked, fused.pallas_tpu):
    assert isinstance(module, fused.kernel.Passes), module.__name__


def test_default_chunks():
  llama = jax.ShapeDtypeStruct((4096, 128256), jnp.bfloat16)
  # 16-bit weights: the gradient pass writes the weight gradient in wider pieces.
  assert fused.kernel.chunks(None, None, 16384, llama) == (512, 2048, 4096)
  assert fused.kernel.chunks(None, None, 100, llama.update(dtype=jnp.float32)) == (100, 2048, 2048)
  assert fused.kernel.chunks(64, 1000, 16384, llama) == (64, 1000, 1000)  # explicit: as given
  small = jax.ShapeDtypeStruct((256, 3000), jnp.bfloat16)
  assert fused.kernel.chunks(None, None, 10, small) == (10, 2048, 3000)


def test_memory_is_a_fraction_of_the_materialised_path():
  b, t, d, v = 2, 256, 64, 8192
  shapes = (
    jax.ShapeDtypeStruct((b, t, d), jnp.float32),
    jax.ShapeDtypeStruct((d, v), jnp.float32),
    jax.ShapeDtypeStruct((b, t), jnp.int32),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
  )

  def temp(fn):
    step = jax.value_and_grad(lambda h, w, y, m: jnp.sum(fn(h, w, y, m)), argnums=(0, 1))
    return jax.jit(step).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  fused_bytes = temp(lambda *a: linear_sequence_nll(*a, token_chunk=128, vocab_chunk=1024))
  ref_bytes = temp(lambda *a: linear_sequence_nll(*a, implementation="xla"))
  logits_bytes = b * t * v * 4
  assert fused_bytes < logits_bytes / 4 < ref_bytes


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "change,error,match",
  [
    (dict(hidden=jnp.zeros((3, 7))), ValueError, r"hidden must have shape \[B, T, D\]"),
    (dict(weight=jnp.zeros((5, V))), ValueError, r"D = hidden.shape\[-1\] = 8"),
    (dict(weight=jnp.zeros((D, V), jnp.int32)), TypeError, "weight must be a floating"),
    (dict(targets=jnp.zeros((B, T))), TypeError, "targets must be an integer"),
    (dict(targets=jnp.zeros((B, T + 1), int)), ValueError, r"targets must have shape \[B, T\]"),
    (dict(span_mask=jnp.zeros((B, 1), bool)), ValueError, r"span_mask must have shape"),
    (dict(bias=jnp.zeros((V + 1,))), ValueError, r"bias must have shape \[V\] = \(36,\)"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
    (dict(implementation="pallas"), ValueError, "implementation must be one of"),
    (dict(token_chunk=0), ValueError, "token_chunk must be a positive"),
    (dict(vocab_chunk=2.5), ValueError, "vocab_chunk must be a positive"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
  ],
)
def test_trace_time_errors_name_the_argument(change, error, match):
  hidden, weight, bias, targets, mask = make()
  kw = dict(hidden=hidden, weight=weight, targets=targets, span_mask=mask, bias=bias)
  kw.update(change)
  args = [kw.pop(k) for k in ("hidden", "weight", "targets", "span_mask")]
  with pytest.raises(error, match=match):
    jax.jit(lambda *a: linear_sequence_nll(*a, **kw)).lower(*args)


def test_scalar_entry_errors():
  hidden, weight, _, targets, mask = make()
  with pytest.raises(ValueError, match="normalize must be one of"):
    linear_nll_loss(hidden, weight, targets, mask, normalize="mean")
  with pytest.raises(ValueError, match="schedule must be one of"):
    linear_nll_loss(hidden, weight, targets, mask, schedule="fast")


# ----------------------------------------------------------------------------- gradient precision


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
def test_gradient_is_the_exact_softmax_at_bf16_max_logits(implementation):
  """A rounded f32 log-sum-exp drops log 3 next to bf16-max logits: exp(z - lse) is 1, not 1/3."""
  big = float(jnp.finfo(jnp.bfloat16).max)
  h, w = jnp.zeros((1, 1, 8), jnp.bfloat16), jnp.zeros((8, 4), jnp.bfloat16)
  bias = jnp.array([0.0, big, big, big], jnp.bfloat16)
  y, m = jnp.zeros((1, 1), int), jnp.ones((1, 1), bool)
  for fn in (
    lambda b: linear_sequence_nll(h, w, y, m, bias=b, implementation=implementation).sum(),
    lambda b: linear_nll_loss(h, w, y, m, bias=b, implementation=implementation)[0],
  ):
    g = jax.jit(jax.grad(fn))(bias)
    np.testing.assert_allclose(np.asarray(g, np.float32), [-1, 1 / 3, 1 / 3, 1 / 3], rtol=4e-3)


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_gradient_error_at_f32_logits_near_1e4_is_f32_rounding(schedule):
  """Logits near 1e4 (hidden 0, the bias carries them): the gradient is within ~1e-7 of the
  float64 softmax (``exp(z - lse)`` with a rounded lse was off by ~2e-4)."""
  v = 1000
  bias = 1e4 + 3 * jax.random.normal(jax.random.key(0), (v,))
  h, w = jnp.zeros((1, 4, 8)), jnp.zeros((8, v))
  y, m = jnp.arange(4)[None], jnp.ones((1, 4), bool)
  z = np.asarray(bias, np.float64)
  p = np.exp(z - z.max())
  p /= p.sum()
  want = 4 * p - np.eye(v)[:4].sum(0)
  kw = dict(bias=None, vocab_chunk=128, token_chunk=2)
  per_sample = lambda b: linear_sequence_nll(h, w, y, m, **(kw | dict(bias=b))).sum()
  scalar = lambda b: linear_nll_loss(
    h, w, y, m, normalize="sum", schedule=schedule, **kw | {"bias": b}
  )[0]
  for fn in (per_sample, scalar):
    g = jax.jit(jax.grad(fn))(bias)
    assert np.abs(np.asarray(g, np.float64) - want).max() < 2e-7


# ----------------------------------------------------------------------------- weight_layout="vd"


@pytest.mark.parametrize("implementation", ["chunked", "xla", "reference"])
def test_vd_layout_on_the_transpose_equals_dv(implementation):
  """Every entry: a ``[V, D]`` table read in place equals the ``[D, V]`` kernel (values and all
  gradients; the weight gradient comes back ``[V, D]``)."""
  hidden, weight, bias, targets, mask = make(seed=20)
  seg = jnp.asarray(np.arange(B * T).reshape(B, T) % 3)
  kw = dict(implementation=implementation, bias=None)
  if implementation == "chunked":
    kw.update(token_chunk=4, vocab_chunk=10)

  def entries(h, w, b, layout):
    o = kw | dict(bias=b, weight_layout=layout, logit_softcap=4.0, temperature=0.8)
    nll, ent = linear_token_nll(h, w, targets, mask, return_entropy=True, **o)
    out = [linear_sequence_nll(h, w, targets, mask, **o), nll, ent]
    if implementation != "chunked":  # one materialised matmul serves every entry
      return out
    out.append(linear_segment_nll(h, w, targets, mask, seg, num_segments=2, **o))
    for schedule in ("one_pass", "two_pass"):
      out.append(linear_nll_loss(h, w, targets, mask, schedule=schedule, **o)[0])
    return out

  def total(h, w, b, layout):
    return sum(jnp.sum(x * (k + 1)) for k, x in enumerate(entries(h, w, b, layout)))

  vg = lambda layout: jax.jit(
    jax.value_and_grad(lambda h, w, b: total(h, w, b, layout), argnums=(0, 1, 2))
  )
  val, (dh, dw, db) = vg("vd")(hidden, weight.T, bias)
  want_val, (want_dh, want_dw, want_db) = vg("dv")(hidden, weight, bias)
  assert dw.shape == (V, D)
  assert_close((val, dh, dw.T, db), (want_val, want_dh, want_dw, want_db))


def test_vd_layout_makes_no_transposed_copy_at_the_gemma2_head():
  """Compile-only fwd+bwd temp memory of the scalar loss at the Gemma-2 head (4 x 2048 tokens,
  D 2304, V 256000, bf16): a ``[V, D]`` table costs what a ``[D, V]`` kernel does (passing
  ``E.T`` as a ``[D, V]`` kernel costs a 1.1 GiB transposed copy)."""
  n, d, v = 4 * 2048, 2304, 256000
  bf = jnp.bfloat16
  h = jax.ShapeDtypeStruct((4, n // 4, d), bf)
  y, m = jax.ShapeDtypeStruct((4, n // 4), jnp.int32), jax.ShapeDtypeStruct((4, n // 4), bool)

  def temp(weight, layout):
    def loss(h, w, y, m):
      return linear_nll_loss(h, w, y, m, weight_layout=layout)[0]

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return step.lower(h, weight, y, m).compile().memory_analysis().temp_size_in_bytes

  dv = temp(jax.ShapeDtypeStruct((d, v), bf), "dv")
  vd = temp(jax.ShapeDtypeStruct((v, d), bf), "vd")
  assert abs(vd - dv) <= 0.05 * dv, (vd / 2**20, dv / 2**20)


# ----------------------------------------------------------------------------- linear_segment_nll


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_segment_entry_matches_segment_nll_on_logits(reduction):
  """Per-(row, segment) values and gradients (a different cotangent per output) equal
  ``jaxnll.segment_nll`` on the materialised logits; segment 0 (padding) never counts."""
  hidden, weight, bias, targets, mask = make(seed=21)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3], [0, 0, 3, 3, 3, 3, 1]])
  weights = jnp.where(mask, jax.random.uniform(jax.random.key(3), mask.shape), 0.0)
  ct = jax.random.normal(jax.random.key(4), (B, 3))
  opts = dict(reduction=reduction, z_loss=1e-3, label_smoothing=0.1, temperature=1.5)

  def fused_fn(h, w, b):
    kw = dict(bias=b, token_chunk=4, vocab_chunk=10, **opts)
    return linear_segment_nll(h, w, targets, weights, seg, num_segments=3, **kw)

  def logits_fn(h, w, b):
    logits = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b
    return jaxnll.segment_nll(logits, targets, weights, seg, num_segments=3, **opts)

  run = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2)))
  assert_close(run(fused_fn)(hidden, weight, bias), run(logits_fn)(hidden, weight, bias))
  got = jax.jit(fused_fn)(hidden, weight, bias)
  assert_close(got, logits_fn(hidden, weight, bias))
  if reduction == "sum":  # the segments add up to the whole row
    whole = linear_sequence_nll(
      hidden,
      weight,
      targets,
      jnp.where(seg > 0, weights, 0.0),
      bias=bias,
      **{k: v for k, v in opts.items() if k != "reduction"},
    )
    np.testing.assert_allclose(got.sum(1), whole, rtol=1e-5)


# ----------------------------------------------------------------------------- linear_token_nll


def np_token_outputs(hidden, weight, bias, targets, mask, tau, cap=None):
  """Float64 per-token NLL and entropy of softmax(cap(x) / tau), 0 outside the span."""
  x = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
  if cap is not None:
    x = cap * np.tanh(x / cap)
  z = x / tau
  m = z.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
  logp = z - lse[..., None]
  nll = lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]
  ent = -(np.exp(logp) * logp).sum(-1)
  inside = np.asarray(mask) != 0
  return np.where(inside, nll, 0.0), np.where(inside, ent, 0.0), np.exp(logp), logp, ent


@pytest.mark.parametrize("tau,cap", [(0.6, None), (2.5, 3.0)])
def test_token_entry_values_entropy_and_gradients(tau, cap):
  hidden, weight, bias, targets, mask = make(seed=22)
  k = jax.random.split(jax.random.key(5), 2)
  ct_nll, ct_ent = (jax.random.normal(kk, (B, T)) for kk in k)
  kw = dict(temperature=tau, logit_softcap=cap, token_chunk=4, vocab_chunk=10)

  def fused_fn(h, w, b):
    return linear_token_nll(h, w, targets, mask, bias=b, return_entropy=True, **kw)

  nll, ent = jax.jit(fused_fn)(hidden, weight, bias)
  want_nll, want_ent, p, logp, full_ent = np_token_outputs(
    hidden, weight, bias, targets, mask, tau, cap
  )
  np.testing.assert_allclose(nll, want_nll, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(ent, want_ent, rtol=2e-6, atol=2e-6)
  # The logits path agrees (token_nll at the same temperature), and the NLL alone too.
  logits = jnp.einsum("btd,dv->btv", hidden, weight, precision="highest") + bias
  on_logits = jaxnll.token_nll(logits, targets, temperature=tau, logit_softcap=cap)
  np.testing.assert_allclose(nll, jnp.where(mask, on_logits, 0.0), rtol=1e-5, atol=1e-6)
  alone = jax.jit(lambda *a: linear_token_nll(*a, bias=bias, **kw))(hidden, weight, targets, mask)
  np.testing.assert_allclose(alone, nll, rtol=1e-6, atol=1e-6)

  # Gradients with per-token cotangents for both outputs, against autodiff of the plain path.
  def plain_fn(h, w, b):
    x = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b
    if cap is not None:
      x = cap * jnp.tanh(x / cap)
    logp = jax.nn.log_softmax(x / tau, axis=-1)
    tok = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    h_ = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.where(mask, tok, 0.0), jnp.where(mask, h_, 0.0)

  def weighted(f):
    def g(*a):
      a_, b_ = f(*a)
      return jnp.sum(a_ * ct_nll) + jnp.sum(b_ * ct_ent)

    return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))

  got = weighted(fused_fn)(hidden, weight, bias)
  assert_close(got, weighted(plain_fn)(hidden, weight, bias))
  # Float64 bias gradient: ct·(p - onehot)/τ' + ct_H·(-p (log p + H))/τ' with the cap's chain rule.
  onehot = np.eye(V)[np.asarray(targets)]
  dz = np.asarray(ct_nll)[..., None] * (p - onehot) - np.asarray(ct_ent)[..., None] * p * (
    logp + full_ent[..., None]
  )
  dz = np.where(np.asarray(mask)[..., None], dz, 0.0) / tau
  if cap is not None:
    x = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64) + np.asarray(bias)
    dz = dz * (1 - np.tanh(x / cap) ** 2)
  np.testing.assert_allclose(got[1][2], dz.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_token_entry_implementations_agree():
  hidden, weight, bias, targets, mask = make(seed=23)
  outs = {
    impl: jax.jit(
      lambda h, impl=impl: linear_token_nll(
        h, weight, targets, mask, bias=bias, temperature=0.7, return_entropy=True,
        implementation=impl,
      )
    )(hidden)
    for impl in ("chunked", "xla", "reference")
  }  # fmt: skip
  assert_close(outs["xla"], outs["reference"])
  assert_close(outs["chunked"], outs["reference"])


# ----------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
@pytest.mark.parametrize("implementation", ["chunked", "xla", "reference"])
def test_every_entry_accepts_empty_batches_and_rows(shape, implementation):
  b, t = shape
  hidden, weight = jnp.ones((b, t, D)), jnp.ones((D, V))
  targets, mask, seg = jnp.zeros(shape, int), jnp.ones(shape, bool), jnp.ones(shape, int)
  kw = dict(implementation=implementation)
  entries = {
    "sequence": (lambda h, w: linear_sequence_nll(h, w, targets, mask, **kw), (b,)),
    "loss": (lambda h, w: linear_nll_loss(h, w, targets, mask, **kw)[0], ()),
    "segment": (
      lambda h, w: fused.linear_segment_nll(h, w, targets, mask, seg, num_segments=2, **kw),
      (b, 2),
    ),
    "token": (
      lambda h, w: fused.linear_token_nll(h, w, targets, mask, return_entropy=True, **kw)[1],
      (b, t),
    ),
  }
  for name, (fn, out_shape) in entries.items():  # eager: nothing to compile for no positions
    out = fn(hidden, weight)
    assert out.shape == out_shape and out.dtype == jnp.float32, name
    assert np.all(np.asarray(out) == 0.0), name
    dh, dw = jax.grad(lambda h, w, fn=fn: jnp.sum(fn(h, w)), argnums=(0, 1))(hidden, weight)
    assert dh.shape == hidden.shape and np.all(np.asarray(dw) == 0.0), name


# ----------------------------------------------------------------------------- NaN at context


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_nan_hidden_at_context_never_reaches_the_materialised_paths_gradients(implementation):
  hidden, weight, bias, targets, mask = make(seed=24)
  outside = ~np.asarray(mask)
  dirty = jnp.where(outside[..., None], jnp.nan, hidden).at[0, 0, 0].set(jnp.inf)
  dirty = jnp.where(jnp.asarray(outside)[..., None], dirty, hidden)
  seg = jnp.ones((B, T), int)
  kw = dict(implementation=implementation)

  def total(h, w, b):
    y = jnp.where(mask, targets, -100)
    out = jnp.sum(linear_sequence_nll(h, w, y, mask, bias=b, **kw))
    out += linear_nll_loss(h, w, y, mask, bias=b, **kw)[0]
    out += jnp.sum(linear_segment_nll(h, w, y, mask, seg, num_segments=1, bias=b, **kw))
    nll, ent = linear_token_nll(h, w, y, mask, bias=b, return_entropy=True, **kw)
    return out + jnp.sum(nll) + jnp.sum(ent)

  vg = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))
  got, clean = vg(dirty, weight, bias), vg(hidden, weight, bias)
  assert np.isfinite(float(got[0]))
  assert_close(got, clean, rtol=0, atol=0)


def test_token_entry_entropy_is_exact_at_logits_near_1e4():
  """The entropy is summed relative to the row max (``log s - Σ p (z - m)``): nothing of size
  1e4 rounds, so it (and its gradient) stays within f32 rounding of float64."""
  v = 1000
  bias = 1e4 + 2 * jax.random.normal(jax.random.key(7), (v,))
  h, w = jnp.zeros((1, 3, 8)), jnp.zeros((8, v))
  y, m = jnp.arange(3)[None], jnp.ones((1, 3), bool)
  f = lambda b: linear_token_nll(h, w, y, m, bias=b, return_entropy=True, vocab_chunk=96)[1]
  ent, grad = jax.jit(jax.value_and_grad(lambda b: f(b).sum()))(bias)
  z = np.asarray(bias, np.float64)
  logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
  p, want = np.exp(logp), -(np.exp(logp) * logp).sum()
  np.testing.assert_allclose(ent, 3 * want, rtol=1e-6)
  np.testing.assert_allclose(grad, -3 * p * (logp + want), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- gradient rows
#
# The contract's bad-input rules in value *and* gradient, for every implementation: a target
# id outside [0, V) inside the span makes its sample's loss NaN and the gradient that flows
# from that loss NaN; a sample whose loss gets a zero cotangent leaks nothing.

GRAD_IMPLS = ["chunked", "token_chunked", "xla", "reference", "auto", "pallas_tpu"]
BAD_IDS = (-1, -100, V + 1, 2**31 - 1, -(2**31))


def _vjp_fn(implementation, mask, **kw):
  """jitted ``(out, (dh, dw, db))`` of ``linear_sequence_nll`` under cotangent ``ct``."""

  def run(h, w, b, y, ct):
    f = lambda h, w, b: linear_sequence_nll(
      h, w, y, mask, bias=b, implementation=implementation, token_chunk=4, **kw
    )
    out, vjp = jax.vjp(f, h, w, b)
    return out, vjp(ct)

  return jax.jit(run)


@pytest.mark.parametrize("implementation", GRAD_IMPLS)
def test_bad_target_inside_span_is_nan_in_value_and_gradient(implementation):
  hidden, weight, bias, targets, mask = make(seed=21)
  mask = mask.at[0, 2].set(True)
  run = _vjp_fn(implementation, mask)
  ones, zero_first = jnp.ones(B), jnp.array([0.0, 1.0, 1.0])
  clean = run(hidden, weight, bias, targets, zero_first)
  for bad in BAD_IDS:
    y = targets.at[0, 2].set(bad)
    out, (dh, dw, db) = run(hidden, weight, bias, y, ones)
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all(), (bad, out)
    assert np.isnan(dh[0, 2]).all() and np.isfinite(dh[1:]).all(), bad
    assert np.isnan(dw).all() and np.isnan(db).all(), bad
    # Its cotangent 0: nothing of it reaches any gradient (the other samples' are exact).
    out, grads = run(hidden, weight, bias, y, zero_first)
    assert np.isnan(out[0]), bad
    assert_close(grads, clean[1], rtol=0, atol=0)


def test_reference_losses_bad_target_nan_in_gradient_too():
  """``jaxnll.reference`` from logits: the NaN row of a bad id is NaN in the gradient too."""
  hidden, weight, bias, targets, mask = make(seed=22)
  mask = mask.at[0, 2].set(True)
  logits = jnp.einsum("btd,dv->btv", hidden, weight) + bias
  seg = jnp.ones((B, T), int)
  fns = {
    "sequence": lambda x, y: reference.sequence_nll(x, y, mask),
    "segment": lambda x, y: reference.segment_nll(x, y, mask, seg, num_segments=1)[:, 0],
    "selective": lambda x, y: reference.selective_sequence_nll(x, y, mask),
    "linear": lambda x, y: reference.linear_sequence_nll(hidden, weight, y, mask, bias=x[0, 0]),
  }
  for name, fn in fns.items():
    for bad in BAD_IDS:
      y = targets.at[0, 2].set(bad)
      x = logits if name != "linear" else jnp.broadcast_to(bias, logits.shape)
      out, vjp = jax.vjp(lambda x, fn=fn, y=y: fn(x, y), x)
      (g,) = vjp(jnp.ones(B))
      assert np.isnan(out[0]) and np.isfinite(out[1:]).all(), (name, bad)
      assert np.isnan(g).any() and np.isfinite(g[1:]).all(), (name, bad)
      if name != "linear":
        assert np.isnan(g[0, 2]).all(), (name, bad)
      (g0,) = vjp(jnp.array([0.0, 1.0, 1.0]))
      assert np.isfinite(g0).all(), (name, bad)


@pytest.mark.parametrize("implementation", GRAD_IMPLS)
@pytest.mark.parametrize("entry", ["sequence", "token"])
def test_nan_hidden_in_a_zero_cotangent_sample_leaks_nothing(implementation, entry):
  """A NaN hidden state inside sample 0's span: its loss is NaN, but with a zero cotangent
  for it the other samples' hidden and weight gradients are exactly the clean ones (the
  kernels own the matmul and gate it on the per-row cotangent, as a select)."""
  hidden, weight, bias, targets, mask = make(seed=23)
  mask = mask.at[0, 2].set(True)
  dirty = hidden.at[0, 2, 3].set(jnp.nan)

  def run(h, w, b, ct):
    def f(h, w, b):
      kw = dict(bias=b, implementation=implementation, token_chunk=4)
      if entry == "token":
        return linear_token_nll(h, w, targets, mask, **kw).sum(-1)
      return linear_sequence_nll(h, w, targets, mask, **kw)

    out, vjp = jax.vjp(f, h, w, b)
    return out, vjp(ct)

  run = jax.jit(run)
  ct = jnp.array([0.0, 1.0, 2.0])
  out, grads = run(dirty, weight, bias, ct)
  assert np.isnan(out[0]) and np.isfinite(out[1:]).all()
  assert_close(grads, run(hidden, weight, bias, ct)[1], rtol=0, atol=0)
  # With its cotangent non-zero the NaN is loud in every gradient it reaches.
  _, (dh, dw, db) = run(dirty, weight, bias, jnp.ones(B))
  assert np.isnan(dw).any() and np.isnan(dh[0, 2]).all() and np.isfinite(dh[1:]).all()


@pytest.mark.parametrize("big", [2**32 + 3, 2**40, -(2**32) + 5, 2**63 - 1])
def test_int64_numpy_ids_beyond_int32_never_wrap_to_a_valid_id(big):
  """x64 off (JAX's default): an int64 NumPy id ``2**32 + 3`` used to be narrowed to the
  valid id ``3`` by ``jnp.asarray``.  It is out of ``[0, V)``: that sample's loss is NaN in
  every entry (fused, materialised, from logits, reference), the others are unchanged."""
  assert not jax.config.jax_enable_x64
  hidden, weight, bias, targets, mask = make(seed=24)
  mask = mask.at[0, 2].set(True)
  good = np.asarray(targets, np.int64)
  bad = good.copy()
  bad[0, 2] = big
  logits = jnp.einsum("btd,dv->btv", hidden, weight) + bias
  entries = {
    **{
      impl: lambda y, impl=impl: linear_sequence_nll(
        hidden, weight, y, mask, bias=bias, implementation=impl
      )
      for impl in ("chunked", "token_chunked", "xla", "reference")
    },
    "nll": lambda y: jaxnll.sequence_nll(logits, y, mask),
    "token_nll": lambda y: jnp.where(mask, jaxnll.token_nll(logits, y), 0.0).sum(-1),
    "reference_logits": lambda y: reference.sequence_nll(logits, y, mask),
    "reference_token": lambda y: jnp.where(mask, reference.token_nll(logits, y), 0.0).sum(-1),
  }
  for name, fn in entries.items():
    want, got = fn(good), fn(bad)
    assert np.isnan(got[0]), (name, got)
    assert_close(got[1:], want[1:], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_xla_scores_16bit_heads_in_f32_like_the_fused_kernels(dtype):
  """``implementation="xla"`` used to score a bf16 / f16 head in bf16 / f16 (logits and
  softmax): against float64 its loss was off by 0.15 (bf16; 2.5e-3 at f16) where the fused
  kernels' is 1e-5, and its hidden gradient by 2.7x (bf16) / 3.2x (f16) theirs.  Now it
  computes the logits in float32 like them: the same order of error."""
  b, t, d, v = 2, 32, 64, 1024
  k = jax.random.split(jax.random.key(25), 3)
  h = jax.random.normal(k[0], (b, t, d)).astype(dtype)
  w = (jax.random.normal(k[1], (d, v)) / np.sqrt(d) * 4).astype(dtype)
  y = jax.random.randint(k[2], (b, t), 0, v)
  m = jnp.ones((b, t), bool)
  h64, w64, y64 = np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y)
  z = h64 @ w64
  e = np.exp(z - z.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  want = -np.log(np.take_along_axis(p, y64[..., None], -1)).sum()
  np.put_along_axis(p, y64[..., None], np.take_along_axis(p, y64[..., None], -1) - 1, -1)
  want_dh = p @ w64.T
  err = {}
  for impl in ("chunked", "xla"):
    f = lambda h, impl=impl: linear_sequence_nll(h, w, y, m, implementation=impl).sum()
    loss, dh = jax.jit(jax.value_and_grad(f))(h)
    err[impl] = abs(float(loss) - want) / want, np.abs(np.asarray(dh, np.float64) - want_dh).max()
  assert err["xla"][0] <= 1e-6 and err["chunked"][0] <= 1e-6, err
  assert err["xla"][1] <= 1.25 * err["chunked"][1], err


def test_segment_entry_makes_a_row_with_a_negative_segment_id_loud():
  """Like ``segment_nll``: a negative segment id inside the span puts a token in no sample, so
  that row's results are NaN (value and gradient), never the token silently dropped."""
  hidden, weight, bias, targets, mask = make(seed=31)
  mask = mask.at[0].set(True)  # row 0: the stray token and tokens of its segments
  seg = jnp.ones((B, T), jnp.int32).at[0, 2].set(-1)

  def run(h):
    return linear_segment_nll(h, weight, targets, mask, seg, num_segments=2)

  out, vjp = jax.vjp(run, hidden)
  assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()
  (g,) = vjp(jnp.ones_like(out))
  assert np.isnan(g[0]).any() and np.isfinite(g[1:]).all()
