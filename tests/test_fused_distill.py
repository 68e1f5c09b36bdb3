"""Fused distillation (jaxnll.fused.distill) against a float64 formula, the plain-jnp reference
and the logits path: values, student gradients, teacher without gradient, every kind.

One set of shapes for the whole file (``B·T = 14`` positions, ``V = 40``) so XLA compiles each
configuration once; block sizes 3 × 11 divide neither, 7 × 8 divide both.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxnll
from jaxnll import parallel, reference
from jaxnll.distill import distill_cross_entropy
from jaxnll.fused import linear_distill_loss
from jaxnll.fused.distill import KINDS

B, T, DS, DT, V = 2, 7, 8, 6, 40
ODD = dict(token_chunk=3, vocab_chunk=11)  # divides neither B·T = 14 nor V = 40
EVEN = dict(token_chunk=7, vocab_chunk=8)
FUSED = ("chunked", "token_chunked", "auto")
MASK = np.array([[0, 1, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 1]], bool)


def make(seed=0, dtype=jnp.float32, scale=2.0):
  k = jax.random.split(jax.random.key(seed), 4)
  hs = scale * jax.random.normal(k[0], (B, T, DS), jnp.float32)
  ws = jax.random.normal(k[1], (DS, V), jnp.float32) / np.sqrt(DS)
  ht = scale * jax.random.normal(k[2], (B, T, DT), jnp.float32)
  wt = jax.random.normal(k[3], (DT, V), jnp.float32) / np.sqrt(DT)
  return tuple(x.astype(dtype) for x in (hs, ws, ht, wt))


def f64_formula(hs, ws, ht, wt, mask, kind, tau, beta=0.5):
  """The divergence in NumPy float64, from the definitions."""
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  zs, zt = f(hs) @ f(ws) / tau, f(ht) @ f(wt) / tau

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lps, lpt = log_softmax(zs), log_softmax(zt)
  ps, pt = np.exp(lps), np.exp(lpt)
  if kind == "ce":
    tok = -(pt * lps).sum(-1)
  elif kind == "kl":
    tok = (pt * (lpt - lps)).sum(-1)
  elif kind == "reverse_kl":
    tok = (ps * (lps - lpt)).sum(-1)
  else:
    lm = np.log(beta * pt + (1 - beta) * ps)
    tok = beta * (pt * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
  w = np.asarray(mask, np.float64)
  return (np.where(w != 0, tok, 0.0) * w).sum(-1)


_COMPILED = {}


def value_and_grads(fn, hs, ws, *rest):
  """Per-sample values and the gradients of ``Σ_b c_b L_b`` (unequal c_b) for the student, in
  one compiled function (compiled once per ``fn``: :func:`fused` and :func:`plain` hand out
  one function per configuration)."""
  if fn not in _COMPILED:
    c = jnp.array([1.0, -0.5])

    def both(h, w, *r):
      grads = jax.grad(lambda h, w: jnp.sum(fn(h, w, *r) * c), argnums=(0, 1))(h, w)
      return fn(h, w, *r), grads

    _COMPILED[fn] = jax.jit(both)
  return _COMPILED[fn](hs, ws, *rest)


@functools.cache
def _fused(impl, kind, tau, chunks, kw):
  def fn(hs, ws, ht, wt, mask):
    return linear_distill_loss(
      hs, ws, ht, wt, mask, kind=kind, temperature=tau, implementation=impl, **dict(chunks),
      **dict(kw),
    )  # fmt: skip

  return fn


def fused(impl, kind, tau, chunks=ODD, **kw):
  return _fused(impl, kind, tau, tuple(sorted(chunks.items())), tuple(sorted(kw.items())))


@functools.cache
def _plain(kind, tau, kw):
  def fn(hs, ws, ht, wt, mask):
    return reference.linear_distill_loss(
      hs, ws, ht, wt, mask, kind=kind, temperature=tau, **dict(kw)
    )

  return fn


def plain(kind, tau, **kw):
  return _plain(kind, tau, tuple(sorted(kw.items())))


def assert_close(got, want, rtol=2e-5, atol=2e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol, atol)


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [0.7, 1.0, 2.5])
def test_chunked_matches_float64_and_reference(kind, tau):
  hs, ws, ht, wt = make(1)
  mask = jnp.asarray(MASK)
  val, grads = value_and_grads(fused("chunked", kind, tau), hs, ws, ht, wt, mask)
  np.testing.assert_allclose(
    val, f64_formula(hs, ws, ht, wt, MASK, kind, tau), rtol=1e-5, atol=2e-6
  )
  want_val, want_grads = value_and_grads(plain(kind, tau), hs, ws, ht, wt, mask)
  assert_close(val, want_val)
  assert_close(grads, want_grads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["token_chunked", "auto", "xla"])
def test_every_implementation_matches_the_logits_path(kind, impl):
  hs, ws, ht, wt = make(2)
  mask = jnp.asarray(MASK)
  got = value_and_grads(fused(impl, kind, 1.5, EVEN), hs, ws, ht, wt, mask)
  want = value_and_grads(plain(kind, 1.5), hs, ws, ht, wt, mask)
  assert_close(got, want)
  np.testing.assert_allclose(got[0], f64_formula(hs, ws, ht, wt, MASK, kind, 1.5), rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_ce_is_distill_cross_entropy_and_kl_too(tau):
  """``kind="ce"`` / ``"kl"`` equal :func:`jaxnll.distill_cross_entropy` of the two logits."""
  hs, ws, ht, wt = make(3)
  mask = jnp.asarray(MASK)
  for kind, name in (("ce", "cross_entropy"), ("kl", "kl")):

    def logits_path(hs, ws, ht, wt, mask, name=name):
      return distill_cross_entropy(hs @ ws, ht @ wt, mask, temperature=tau, kind=name)

    got = value_and_grads(fused("chunked", kind, tau), hs, ws, ht, wt, mask)
    assert_close(got, value_and_grads(logits_path, hs, ws, ht, wt, mask))


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_jsd_beta(beta):
  hs, ws, ht, wt = make(4)
  mask = jnp.asarray(MASK)
  got = value_and_grads(fused("chunked", "jsd", 1.0, beta=beta), hs, ws, ht, wt, mask)
  want = value_and_grads(plain("jsd", 1.0, beta=beta), hs, ws, ht, wt, mask)
  assert_close(got, want)
  np.testing.assert_allclose(
    got[0], f64_formula(hs, ws, ht, wt, MASK, "jsd", 1.0, beta), rtol=1e-5, atol=1e-6
  )


def test_identical_models_give_zero_divergence():
  hs, ws, _, _ = make(5)
  mask = jnp.asarray(MASK)
  for kind in ("kl", "reverse_kl", "jsd"):
    out = fused("chunked", kind, 1.0)(hs, ws, hs, ws, mask)
    np.testing.assert_allclose(out, 0.0, atol=2e-6)


def test_float_weights_bias_softcap_mean_and_both_layouts():
  """Float-weight mask, both biases (the student's differentiated), a soft-cap, ``"mean"``,
  ``[V, D]`` heads read in place: the same as the reference on materialised logits."""
  hs, ws, ht, wt = make(6)
  k = jax.random.split(jax.random.key(7), 3)
  bs, bt = jax.random.normal(k[0], (V,)), jax.random.normal(k[1], (V,))
  weights = jnp.where(jnp.asarray(MASK), jax.random.uniform(k[2], (B, T), minval=0.5, maxval=2), 0)
  opts = dict(reduction="mean", logit_softcap=3.0, temperature=1.3)
  for kind in KINDS:

    def fn(hs, ws, bs, layout, impl, kind=kind):
      w_s = ws.T if layout == "vd" else ws
      kw = dict(student_weight_layout=layout, teacher_weight_layout=layout)
      if impl == "reference":
        return reference.linear_distill_loss(
          hs, w_s, ht, wt.T if layout == "vd" else wt, weights, kind=kind,
          student_bias=bs, teacher_bias=bt, **opts, **kw,
        )  # fmt: skip
      return linear_distill_loss(
        hs, w_s, ht, wt.T if layout == "vd" else wt, weights, kind=kind, student_bias=bs,
        teacher_bias=bt, implementation=impl, **ODD, **opts, **kw,
      )  # fmt: skip

    def vg(layout, impl):
      c = jnp.array([0.3, 2.0])
      loss = lambda h, w, b: jnp.sum(fn(h, w, b, layout, impl) * c)  # noqa: E731
      return fn(hs, ws, bs, layout, impl), jax.grad(loss, argnums=(0, 1, 2))(hs, ws, bs)

    want = vg("dv", "reference")
    for layout in ("dv", "vd"):
      got = vg(layout, "chunked")
      assert_close(got, want)
    assert_close(vg("dv", "xla"), want)


def test_bf16_inputs():
  """bf16 hidden states and heads: the f32 statistics give the reference's values on the same
  (bf16-rounded) inputs, and bf16 gradients no further from it than the logits path's."""
  hs, ws, ht, wt = make(8, jnp.bfloat16)
  mask = jnp.asarray(MASK)
  up = lambda x: x.astype(jnp.float32)  # noqa: E731
  for kind in KINDS:
    exact = value_and_grads(plain(kind, 1.0), up(hs), up(ws), up(ht), up(wt), mask)
    xla = value_and_grads(fused("xla", kind, 1.0), hs, ws, ht, wt, mask)
    for impl in ("chunked", "token_chunked"):
      val, grads = value_and_grads(fused(impl, kind, 1.0), hs, ws, ht, wt, mask)
      assert val.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
      np.testing.assert_allclose(val, exact[0], rtol=2e-2, atol=1e-2)
      for g, x, e in zip(grads, xla[1], exact[1], strict=True):
        err = lambda a, e=e: float(jnp.max(jnp.abs(up(a) - e)))  # noqa: E731
        assert err(g) <= 2 * err(x) + 1e-3, (kind, impl, err(g), err(x))


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("impl", FUSED + ("xla",))
def test_teacher_gets_no_gradient(impl):
  hs, ws, ht, wt = make(9)
  mask = jnp.asarray(MASK)
  for kind in ("ce", "jsd"):
    loss = lambda ht, wt, kind=kind: fused(impl, kind, 1.0)(hs, ws, ht, wt, mask).sum()  # noqa: E731
    dht, dwt = jax.grad(loss, argnums=(0, 1))(ht, wt)
    assert float(jnp.max(jnp.abs(dht))) == 0.0 and float(jnp.max(jnp.abs(dwt))) == 0.0


@pytest.mark.parametrize("impl", FUSED + ("xla",))
def test_empty_span_is_zero_with_zero_gradients(impl):
  hs, ws, ht, wt = make(10)
  mask = jnp.asarray(MASK).at[1].set(False)
  for kind in KINDS:
    val, (dh, dw) = value_and_grads(fused(impl, kind, 1.0), hs, ws, ht, wt, mask)
    assert float(val[1]) == 0.0
    assert float(jnp.max(jnp.abs(dh[1]))) == 0.0
    none = jnp.zeros((B, T), bool)
    val, (dh, dw) = value_and_grads(fused(impl, kind, 1.0), hs, ws, ht, wt, none)
    assert np.all(np.asarray(val) == 0.0)
    assert float(jnp.max(jnp.abs(dh))) == 0.0 and float(jnp.max(jnp.abs(dw))) == 0.0


@pytest.mark.parametrize("impl", FUSED + ("xla",))
def test_non_finite_values_outside_the_span_never_reach_anything_inside_are_loud(impl):
  hs, ws, ht, wt = make(11)
  mask = jnp.asarray(MASK)
  outside = ~MASK
  bad_hs = jnp.where(outside[..., None], jnp.nan, hs)
  bad_ht = jnp.where(outside[..., None], jnp.inf, ht)
  for kind in ("kl", "reverse_kl"):
    got = value_and_grads(fused(impl, kind, 1.0), bad_hs, ws, bad_ht, wt, mask)
    want = value_and_grads(fused(impl, kind, 1.0), hs, ws, ht, wt, mask)
    assert_close(got, want)
    # NaN in the teacher inside sample 0's span: its loss and gradient are NaN; sample 1,
    # whose loss gets a zero cotangent, leaks nothing.
    nan_t = ht.at[0, 2, 0].set(jnp.nan)
    val = fused(impl, kind, 1.0)(hs, ws, nan_t, wt, mask)
    fn = fused(impl, kind, 1.0)
    assert np.isnan(val[0]) and np.isfinite(val[1])
    loss0 = lambda h, w, fn=fn, t=nan_t: fn(h, w, t, wt, mask)[0]  # noqa: E731
    dh, dw = jax.grad(loss0, argnums=(0, 1))(hs, ws)
    assert np.isnan(np.asarray(dh[0])).any() and np.isnan(np.asarray(dw)).any()
    loss1 = lambda h, w, fn=fn, t=nan_t: fn(h, w, t, wt, mask)[1]  # noqa: E731
    dh, dw = jax.grad(loss1, argnums=(0, 1))(hs, ws)
    assert np.isfinite(np.asarray(dh)).all() and np.isfinite(np.asarray(dw)).all()


def test_cost_follows_the_target_tokens():
  """The forward's token loop runs ``ceil(n_targets / C)`` chunks: a bound read at run time
  (one compile for every span), and a span's result does not depend on the rest's content."""
  hs, ws, ht, wt = make(12)
  f = jax.jit(fused("chunked", "kl", 1.0))
  for n in (0, 1, 5, 14):
    mask = (jnp.arange(B * T) < n).reshape(B, T)
    np.testing.assert_allclose(
      f(hs, ws, ht, wt, mask), f64_formula(hs, ws, ht, wt, np.asarray(mask), "kl", 1.0),
      rtol=1e-5, atol=2e-6,
    )  # fmt: skip
  assert f._cache_size() == 1
  text = jax.jit(fused("chunked", "kl", 1.0)).lower(hs, ws, ht, wt, jnp.asarray(MASK)).as_text()
  assert "sort" in text and "while" in text


@pytest.mark.parametrize("impl", ["chunked", "token_chunked"])
def test_sharded_vocabulary_inside_shard_map(impl):
  """Both heads' vocabulary split over 8 fake devices (``vocab_axis``): the per-sample result,
  replicated over the axis, and the student's gradients equal the unsharded ones."""
  mesh = parallel.make_mesh("model=8")
  hs, ws, ht, wt = make(13)
  mask = jnp.asarray(MASK)
  for kind in KINDS:

    def local(hs, ws, ht, wt, kind=kind):
      return linear_distill_loss(
        hs, ws, ht, wt, mask, kind=kind, vocab_axis="model", implementation=impl, vocab_chunk=3
      )

    sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")), out_specs=P()
    )
    got = value_and_grads(sharded, hs, ws, ht, wt)
    want = value_and_grads(
      lambda hs, ws, ht, wt, kind=kind: plain(kind, 1.0)(hs, ws, ht, wt, mask), hs, ws, ht, wt
    )
    assert_close(got, want)


def test_bad_arguments_name_themselves():
  hs, ws, ht, wt = make(0)
  mask = jnp.asarray(MASK)
  with pytest.raises(ValueError, match="kind"):
    linear_distill_loss(hs, ws, ht, wt, mask, kind="tvd")
  with pytest.raises(ValueError, match="beta"):
    linear_distill_loss(hs, ws, ht, wt, mask, kind="jsd", beta=1.5)
  with pytest.raises(ValueError, match="temperature"):
    linear_distill_loss(hs, ws, ht, wt, mask, temperature=0.0)
  with pytest.raises(ValueError, match="share the vocabulary"):
    linear_distill_loss(hs, ws, ht, wt[:, :-1], mask)
  with pytest.raises(ValueError, match="teacher_weight must have shape"):
    linear_distill_loss(hs, ws, ht, wt, mask, teacher_weight_layout="vd")
  with pytest.raises(ValueError, match="same \\[B, T\\]"):
    linear_distill_loss(hs, ws, ht[:1], wt, mask)


def test_checked_names_a_non_finite_hidden_state_inside_the_span():
  import jaxnll

  hs, ws, ht, wt = make(seed=5)
  safe = jaxnll.checked(linear_distill_loss)
  out = safe(hs, ws, ht, wt, MASK, implementation="chunked")
  assert np.isfinite(out).all()
  outside = ht.at[1, 2, 0].set(jnp.nan)  # MASK[1, 2] is 0: never read
  assert np.isfinite(safe(hs, ws, outside, wt, MASK, implementation="chunked")).all()
  with pytest.raises(Exception, match=r"teacher_hidden is not finite at \[0, 3\]"):
    safe(hs, ws, ht.at[0, 3, 1].set(jnp.nan), wt, MASK, implementation="chunked")
  with pytest.raises(Exception, match="student_weight is not finite"):
    safe(hs, ws.at[2, 7].set(jnp.inf), ht, wt, MASK, implementation="chunked")


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
def test_forward_mode_names_the_logits_entries(implementation):
  hs, ws, ht, wt = make(seed=6)
  f = lambda h: linear_distill_loss(h, ws, ht, wt, MASK, kind="jsd", implementation=implementation)
  with pytest.raises(TypeError, match="reverse-mode only"):
    jax.jvp(f, (hs,), (hs,))


# ----------------------------------------------------------------------------- NLL on the same pass

Y = np.asarray(jax.random.randint(jax.random.key(99), (B, T), 0, V))
SEG = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 2, 2, 3]])
C_KD, C_NLL = jnp.array([1.0, -0.5]), jnp.array([0.3, 2.0])


@functools.cache
def _pair_and_separate(impl, kind, tau, softcap, segments):
  """``(pair, separate)``: jitted ``(hs, ws, bs, ht, wt, mask, y) -> (values, grads)`` of
  ``Σ c·kd + Σ c'·nll`` through ``targets=`` (one pass), and through ``linear_distill_loss``
  without targets plus the NLL on materialised logits (two passes)."""
  kw = dict(kind=kind, temperature=tau, logit_softcap=softcap, implementation=impl, **ODD)
  seg = dict(segment_ids=jnp.asarray(SEG), num_segments=3) if segments else {}
  c_kd = jnp.arange(1.0, 7.0).reshape(B, 3) if segments else C_KD
  c_nll = jnp.arange(-2.0, 4.0).reshape(B, 3) if segments else C_NLL

  def pair(hs, ws, bs, ht, wt, mask, y):
    kd, nll = linear_distill_loss(
      hs, ws, ht, wt, mask, targets=y, student_bias=bs, **kw, **seg
    )  # fmt: skip
    return kd, nll

  def separate(hs, ws, bs, ht, wt, mask, y):
    nll_kw = dict(bias=bs, logit_softcap=softcap, implementation="xla")
    if segments:
      kd = jnp.stack(
        [linear_distill_loss(hs, ws, ht, wt, mask & (SEG == s), student_bias=bs, **kw)
         for s in (1, 2, 3)], axis=1,
      )  # fmt: skip
      return kd, jaxnll.linear_segment_nll(hs, ws, y, mask, SEG, num_segments=3, **nll_kw)
    kd = linear_distill_loss(hs, ws, ht, wt, mask, student_bias=bs, **kw)
    return kd, jaxnll.linear_sequence_nll(hs, ws, y, mask, **nll_kw)

  def with_grads(fn):
    def loss(hs, ws, bs, *rest):
      kd, nll = fn(hs, ws, bs, *rest)
      return jnp.sum(kd * c_kd) + jnp.sum(nll * c_nll), (kd, nll)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  return with_grads(pair), with_grads(separate)


def student_bias(seed=21):
  return 0.5 * jax.random.normal(jax.random.key(seed), (V,))


@pytest.mark.parametrize("impl", FUSED + ("xla",))
def test_targets_give_the_nll_of_the_same_pass(impl):
  """``targets=``: the divergence and the student's NLL (at τ = 1, soft-capped, with its
  bias) from one pass equal the two separate computations, values and gradients of a mix of
  both with unequal per-sample weights — at τ ≠ 1 (the NLL's own log-sum-exp) and τ = 1."""
  hs, ws, ht, wt = make(20)
  args = (hs, ws, student_bias(), ht, wt, jnp.asarray(MASK), jnp.asarray(Y))
  for kind, tau, softcap in (("reverse_kl", 1.7, 4.0), ("ce", 1.0, None)):
    pair, separate = _pair_and_separate(impl, kind, tau, softcap, False)
    (_, got), got_g = pair(*args)
    (_, want), want_g = separate(*args)
    assert_close(got, want)
    assert_close(got_g, want_g)
    assert np.all(np.asarray(got[1]) > 0)  # a real NLL, not zeros


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_packed_rows_one_pass_per_segment_sums(impl):
  """``segment_ids``: per-segment divergences and NLLs ``[B, S]`` in one pass equal one call
  per segment mask and :func:`jaxnll.linear_segment_nll`; padding (segment 0) is never read."""
  hs, ws, ht, wt = make(22)
  pad = jnp.asarray(SEG == 0)[..., None]
  bad_hs, bad_ht = jnp.where(pad, jnp.nan, hs), jnp.where(pad, jnp.inf, ht)
  mask = jnp.asarray(MASK)
  assert MASK[SEG == 0].all()  # the padding position is inside the span
  pair, separate = _pair_and_separate(impl, "jsd", 1.3, None, True)
  (_, got), got_g = pair(bad_hs, ws, student_bias(), bad_ht, wt, mask, jnp.asarray(Y))
  (_, want), want_g = separate(hs, ws, student_bias(), ht, wt, jnp.asarray(MASK), jnp.asarray(Y))
  assert got[0].shape == got[1].shape == (B, 3)
  assert_close(got, want)
  assert_close(got_g, want_g)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_targets_each_term_is_gated_by_its_own_cotangent(impl):
  """A NaN teacher state in sample 0 makes its divergence NaN, not its NLL; a bad target id
  in sample 1 makes its NLL NaN, not its divergence; each gradient is NaN only where a NaN
  term is differentiated."""
  hs, ws, ht, wt = make(23)
  mask = jnp.asarray(MASK)
  nan_t = ht.at[0, 2, 0].set(jnp.nan)
  y = jnp.asarray(Y).at[1, 6].set(V)  # MASK[1, 6] is in the span

  def fn(h, w):
    return linear_distill_loss(h, w, nan_t, wt, mask, targets=y, implementation=impl, **ODD)

  kd, nll = jax.jit(fn)(hs, ws)
  assert np.isnan(kd[0]) and np.isfinite(kd[1]) and np.isfinite(nll[0]) and np.isnan(nll[1])
  grads = jax.jit(jax.grad(lambda h, w, c, d: jnp.sum(fn(h, w)[0] * c + fn(h, w)[1] * d),
                           argnums=(0, 1)))  # fmt: skip
  finite = lambda g: all(np.isfinite(np.asarray(x)).all() for x in g)  # noqa: E731
  assert finite(grads(hs, ws, jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0])))
  assert not finite(grads(hs, ws, jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0])))
  assert not finite(grads(hs, ws, jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0])))


def test_targets_with_a_sharded_vocabulary():
  """The NLL's target logit is gathered on the shard holding it and its log-sum-exp combined
  over the shards (τ ≠ 1: its own): equal to the unsharded pair."""
  mesh = parallel.make_mesh("model=8")
  hs, ws, ht, wt = make(24)
  mask, y = jnp.asarray(MASK), jnp.asarray(Y)

  def local(hs, ws, ht, wt):
    kd, nll = linear_distill_loss(
      hs, ws, ht, wt, mask, kind="kl", temperature=2.0, targets=y, vocab_axis="model",
      implementation="chunked", vocab_chunk=3,
    )  # fmt: skip
    return kd + 3.0 * nll

  def whole(hs, ws, ht, wt):
    kd, nll = linear_distill_loss(
      hs, ws, ht, wt, mask, kind="kl", temperature=2.0, targets=y, implementation="xla"
    )
    return kd + 3.0 * nll

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")), out_specs=P()
  )
  assert_close(value_and_grads(sharded, hs, ws, ht, wt), value_and_grads(whole, hs, ws, ht, wt))


def test_targets_and_segments_name_their_bad_arguments():
  hs, ws, ht, wt = make(0)
  mask = jnp.asarray(MASK)
  with pytest.raises(ValueError, match="targets must have shape"):
    linear_distill_loss(hs, ws, ht, wt, mask, targets=jnp.zeros((B, T + 1), int))
  with pytest.raises(TypeError, match="targets"):
    linear_distill_loss(hs, ws, ht, wt, mask, targets=jnp.zeros((B, T)))
  with pytest.raises(ValueError, match="num_segments"):
    linear_distill_loss(hs, ws, ht, wt, mask, segment_ids=jnp.asarray(SEG))
  with pytest.raises(ValueError, match="needs segment_ids"):
    linear_distill_loss(hs, ws, ht, wt, mask, num_segments=3)
