"""Tests of the accelerator kernels of jaxnll/fused/ (token_chunked.py, pallas_tpu.py, auto.py)
against ``implementation="reference"``; ``pallas_tpu`` runs in Pallas interpret mode here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from jaxnll import parallel
from jaxnll.fused import (
  linear_nll_loss,
  linear_segment_nll,
  linear_sequence_nll,
  linear_token_nll,
  token_chunked,
)

KERNELS = ("chunked", "token_chunked", "pallas_tpu", "auto")
B, T, D, V = 2, 9, 12, 200  # N = 18 positions; D and V divide neither 8 / 128 tiles nor 128
OPTIONS = dict(z_loss=1e-3, label_smoothing=0.1, logit_softcap=4.0)
#: Options under which the scalar entry's forward also accumulates the hidden gradient
#: (pallas_tpu: no label smoothing under a soft-cap).
FUSED_OPTIONS = dict(z_loss=1e-3, logit_softcap=4.0, temperature=0.7)


def make(seed=0, *, dtype=jnp.float32, bias=True, mask="bool", v=V):
  k = jax.random.split(jax.random.key(seed), 6)
  hidden = jax.random.normal(k[0], (B, T, D)).astype(dtype)
  weight = (jax.random.normal(k[1], (D, v)) / np.sqrt(D) * 2).astype(dtype)
  b = (0.3 * jax.random.normal(k[2], (v,))).astype(dtype) if bias else None
  targets = jax.random.randint(k[3], (B, T), 0, v)
  span = jax.random.bernoulli(k[4], 0.6, (B, T)).at[1].set(False)  # sample 1: empty span
  if mask == "float":
    span = jnp.where(span, jax.random.uniform(k[5], (B, T), minval=0.5, maxval=2.0), 0.0)
  elif mask == "none":
    span = jnp.zeros((B, T), bool)
  return hidden, weight, b, targets, span


def poisoned(hidden, weight, bias, targets, span):
  """Outside the span anything may sit (NaN states, -100 ids): it must reach nothing."""
  inside = jnp.asarray(span, bool)
  hidden = jnp.where(inside[..., None], hidden, jnp.nan)
  return hidden, weight, bias, jnp.where(inside, targets, -100), span


def both_entries(
  implementation, hidden, weight, bias, targets, span, entries=("seq", "loss"), **kw
):
  """Values and (hidden, weight, bias) gradients of the entries (``"seq"``: per-sample, with
  per-sample cotangents; ``"loss"``: the scalar one); one jitted function (one compilation)."""
  ct = jnp.arange(1.0, B + 1)

  def run(hidden, weight, bias):
    def seq(h, w, b):
      out = linear_sequence_nll(h, w, targets, span, bias=b, implementation=implementation, **kw)
      return jnp.sum(out * ct), out

    kw_loss = {k: v for k, v in kw.items() if k != "reduction"}

    def loss(h, w, b):
      return linear_nll_loss(h, w, targets, span, bias=b, implementation=implementation, **kw_loss)

    fns = {"seq": seq, "loss": loss}
    return tuple(
      jax.value_and_grad(fns[e], (0, 1, 2), has_aux=True)(hidden, weight, bias) for e in entries
    )

  return jax.jit(run)(hidden, weight, bias)


def assert_close(got, want, rtol=1e-5, atol=1e-5):
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves, strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(g64))
    np.testing.assert_allclose(g64, w64, rtol, atol)


@functools.cache
def reference_for(seed, make_kw, kw):
  """The reference results of ``make(seed, **make_kw)`` (computed once per module)."""
  return both_entries("reference", *make(seed, **dict(make_kw)), **dict(kw))


def check(implementation, seed, make_kw=(), rtol=1e-5, atol=1e-5, **kw):
  ref_kw = {k: v for k, v in kw.items() if k not in ("token_chunk", "vocab_chunk")}
  want = reference_for(seed, tuple(make_kw), tuple(sorted(ref_kw.items())))
  got = both_entries(implementation, *poisoned(*make(seed, **dict(make_kw))), **kw)
  assert_close(got, want, rtol, atol)


@pytest.mark.parametrize("implementation", ["chunked", "token_chunked", "pallas_tpu"])
def test_every_option_bias_and_an_empty_span_match_reference(implementation):
  """Blocks that divide neither the 11 targets, nor D, nor V (4 rows, 128-column tiles)."""
  check(implementation, 0, token_chunk=4, vocab_chunk=128, **OPTIONS)


@pytest.mark.parametrize("implementation", ["token_chunked", "pallas_tpu"])
def test_float_weights_mean_and_dividing_blocks_match_reference(implementation):
  """One block holding every position (18 → 24 rows), float span weights, no bias."""
  make_kw = (("bias", False), ("mask", "float"))
  check(implementation, 1, make_kw, entries=("seq",), token_chunk=24, reduction="mean")


@pytest.mark.parametrize(
  "options",
  [FUSED_OPTIONS, dict(z_loss=1e-3, label_smoothing=0.1), {}],
  ids=["zloss-cap-temperature", "zloss-smoothing", "plain"],
)
def test_scalar_entry_with_the_hidden_gradient_in_the_forward_matches_reference(options):
  """pallas_tpu's scalar entry accumulates ``∂ℓ/∂h`` online in its forward (no hidden
  gradient kernel): values and gradients equal the reference's, 4-row blocks and 128-column
  tiles dividing neither the targets nor ``V``."""
  check("pallas_tpu", 7, entries=("loss",), token_chunk=4, vocab_chunk=128, **options)


@pytest.mark.parametrize("implementation", ["token_chunked", "pallas_tpu"])
def test_all_masked_batch_is_zero_with_zero_grads(implementation):
  """The scalar entry's 0 / 0 token mean: 0, with exactly zero gradients."""
  hidden, weight, bias, targets, span = poisoned(*make(2, mask="none"))
  (((loss, sums), grads),) = both_entries(
    implementation, hidden, weight, bias, targets, span, entries=("loss",), **OPTIONS
  )
  assert float(loss) == 0.0 and not np.any(np.asarray(sums))
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("implementation", ["token_chunked", "pallas_tpu"])
def test_bf16_accumulates_in_f32_and_returns_input_dtype_grads(implementation):
  args = make(3, dtype=jnp.bfloat16)
  got = both_entries(implementation, *poisoned(*args), token_chunk=8, **OPTIONS)
  want = reference_for(3, (("dtype", jnp.bfloat16),), tuple(sorted(OPTIONS.items())))
  # Values in f32 from the same bf16 products: tight; gradients rounded to bf16 once.
  assert_close(got[0][0], want[0][0], rtol=2e-5, atol=2e-5)
  assert_close(got[1][0], want[1][0], rtol=2e-5, atol=2e-5)
  assert_close((got[0][1], got[1][1]), (want[0][1], want[1][1]), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
  "implementation, options",
  [
    ("token_chunked", OPTIONS),
    ("pallas_tpu", OPTIONS),
    ("pallas_tpu", FUSED_OPTIONS),
  ],
)
def test_vocabulary_sharded_with_padding_matches_reference(implementation, options):
  """Inside ``shard_map`` over a (data 2, model 4) mesh: rows, targets and span sharded over
  the data axis, 4 vocabulary shards of 64 columns, 56 of them padding."""
  mesh = parallel.make_mesh("data=2,model=4")
  hidden, weight, bias, targets, span = make(4, v=200)
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 56)])
  wp, bp = pad(weight), pad(bias)
  bad_hidden, _, _, bad_targets, _ = poisoned(hidden, weight, bias, targets, span)
  ct = jnp.arange(1.0, B + 1)
  opts = dict(options, vocab_axis="model", vocab_size=V, implementation=implementation)

  def local(h, w, b, y, m, ct):
    out = linear_sequence_nll(h, w, y, m, bias=b, token_chunk=8, **opts)
    loss, _ = linear_nll_loss(h, w, y, m, bias=b, normalize="sum", token_chunk=8, **opts)
    return jax.lax.psum(jnp.sum(out * ct) + loss, "data")

  rows = P("data")
  specs = (rows, P(None, "model"), P("model"), rows, rows, rows)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
  got = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))(bad_hidden, wp, bp, bad_targets, span, ct)

  def plain(h, w, b):
    ref = dict(options, implementation="reference")
    out = linear_sequence_nll(h, w, targets, span, bias=b, **ref)
    loss, _ = linear_nll_loss(h, w, targets, span, bias=b, normalize="sum", **ref)
    return jnp.sum(out * ct) + loss

  want = jax.jit(jax.value_and_grad(plain, (0, 1, 2)))(hidden, weight, bias)
  value, (dh, dw, db) = got
  assert_close((value, dh, dw[:, :V], db[:V]), (want[0], *want[1]))
  assert not np.any(np.asarray(dw[:, V:])) and not np.any(np.asarray(db[V:]))


def every_entry(implementation, hidden, table, bias, targets, span, segments, **kw):
  """Values and (hidden, table, bias) gradients of all four entries on a ``[V, D]`` table
  (``weight_layout="vd"``), each output with its own cotangent; one jitted function."""
  ct_b, ct_bt = jnp.arange(1.0, B + 1), jnp.cos(jnp.arange(B * T, dtype=jnp.float32))
  ct_bt = ct_bt.reshape(B, T)
  kw = dict(kw, weight_layout="vd", implementation=implementation)

  def total(h, w, b):
    seq = linear_sequence_nll(h, w, targets, span, bias=b, **kw)
    loss, _ = linear_nll_loss(h, w, targets, span, bias=b, **kw)
    seg = linear_segment_nll(h, w, targets, span, segments, num_segments=3, bias=b, **kw)
    nll, ent = linear_token_nll(h, w, targets, span, bias=b, return_entropy=True, **kw)
    outs = (seq, loss, seg, nll, ent)
    value = jnp.sum(seq * ct_b) + loss + jnp.sum(seg * jnp.arange(1.0, 4.0))
    return value + jnp.sum(nll * ct_bt) - jnp.sum(ent * ct_bt[::-1]), outs

  return jax.jit(jax.value_and_grad(total, (0, 1, 2), has_aux=True))(hidden, table, bias)


@pytest.mark.parametrize(
  "implementation, options",
  [("token_chunked", OPTIONS), ("pallas_tpu", OPTIONS), ("pallas_tpu", FUSED_OPTIONS)],
)
def test_vd_table_temperature_segments_and_entropy_match_reference(implementation, options):
  """A ``[V, D]`` table read in place, temperature after the soft-cap, packed segments and
  per-token entropies: values and gradients of every entry equal the reference's."""
  hidden, weight, bias, targets, span = make(6)
  segments = jnp.where(jnp.arange(T) < 4, 1, 2)[None].repeat(B, 0).at[:, -1].set(0)
  kw = dict(options, temperature=0.7)
  want = every_entry("reference", hidden, weight.T, bias, targets, span, segments, **kw)
  bad = poisoned(hidden, weight.T, bias, targets, span)
  got = every_entry(implementation, *bad, segments, token_chunk=4, vocab_chunk=128, **kw)
  assert got[1][1].shape == want[1][1].shape == (V, D)
  assert_close(got, want)


def test_auto_exports_the_mosaic_kernels_for_a_vd_table_with_entropy():
  """``"auto"`` keeps the Mosaic kernels for a ``[V, D]`` table, temperature and entropy."""
  s = jax.ShapeDtypeStruct
  args = (s((2, 64, 256), jnp.bfloat16), s((1024, 256), jnp.bfloat16), s((2, 64), jnp.int32))
  args += (s((2, 64), bool),)

  def fwd_bwd(h, w, y, m):
    def fn(h, w):
      kw = dict(weight_layout="vd", temperature=0.7, return_entropy=True)
      nll, ent = linear_token_nll(h, w, y, m, **kw)
      return jnp.sum(nll) + jnp.sum(ent)

    return jax.value_and_grad(fn, (0, 1))(h, w)

  text = export.export(jax.jit(fwd_bwd), platforms=("tpu",))(*args).mlir_module()
  assert text.count("tpu_custom_call") == 3
  assert "tensor<1024x256xbf16>" in text and "tensor<256x1024xbf16>" not in text


def test_block_rows_follow_the_byte_budget_and_pad_rather_than_divide():
  budget = token_chunked.LOGITS_BLOCK_BYTES
  for vocab, rows in ((128256, 1040), (256000, 520), (151936, 880), (32768, 4096), (8000, 8192)):
    assert token_chunked.block_rows(vocab, 8 * 2048) == rows
    assert rows * 4 * vocab <= budget or rows == token_chunked.MAX_TOKEN_CHUNK
  # An odd row count keeps the tile (the last block is padded), capped by the padded rows.
  assert token_chunked.block_rows(128256, 8191) == 1040
  assert token_chunked.block_rows(128256, 13) == 16
  assert token_chunked.block_rows(128256, 5000, token_chunk=1000) == 1000


@pytest.mark.parametrize("chunk", [5, 16])
def test_token_chunked_last_block_shifted_back_when_rows_are_not_whole_blocks(chunk):
  """Under ``"auto"`` the compacted arrays have the CPU kernel's padding (here 18 rows, no
  whole number of blocks): every pass must equal its run on whole-block padding."""
  import copy
  import dataclasses

  from jaxnll._core import TokenOptions
  from jaxnll.fused import compact

  hidden, weight, bias, targets, span = make(5)
  plan = compact.Plan(TokenOptions(**OPTIONS), chunk, 128, implementation="token_chunked")
  whole = dataclasses.replace(plan, token_chunk=B * T)  # 18 rows: one block of everything

  def passes(bt):
    scale = compact.compact_scale(bt, jnp.arange(1.0, B + 1), span)
    stats, loss, *grads = token_chunked.one_pass(bt, scale)
    again = token_chunked.grad_pass(bt, scale, token_chunked.stats_pass(bt)[0])
    cut = lambda x: x[: B * T]
    return jax.tree.map(cut, stats), cut(loss), cut(grads[0]), *grads[1:], cut(again[0]), *again[1:]

  @jax.jit
  def both(hidden, weight, bias):
    padded = compact.Compacted(plan, hidden, weight, bias, targets, span)
    short = copy.copy(compact.Compacted(whole, hidden, weight, bias, targets, span))
    short.plan, short.chunk, short.num_chunks = plan, chunk, padded.num_chunks
    assert short.valid.shape[0] == B * T < padded.valid.shape[0]
    return passes(short), passes(padded)

  got, want = both(hidden, weight, bias)
  assert_close(got, want)


def test_auto_on_cpu_is_the_chunked_kernel_in_memory():
  """One platform is lowered: on CPU ``auto`` compiles to ``chunked`` (no Pallas interpreter
  loops, no other kernel's buffers)."""
  s = jax.ShapeDtypeStruct
  args = (s((2, 16, 32), jnp.bfloat16), s((32, 512), jnp.bfloat16), s((2, 16), jnp.int32))
  args += (s((2, 16), bool),)

  def temp(implementation):
    def f(h, w, y, m):
      fn = lambda h, w: linear_nll_loss(h, w, y, m, implementation=implementation)[0]
      return jax.grad(fn, (0, 1))(h, w)

    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp("auto") == temp("chunked")


# ----------------------------------------------------------------------------- lowering

LLAMA3_8B = (8, 2048, 4096, 128256)  # batch, tokens per row, D, V


def export_fwd_bwd(platform, entry, shape=LLAMA3_8B):
  b, t, d, v = shape
  s = jax.ShapeDtypeStruct
  args = (s((b, t, d), jnp.bfloat16), s((d, v), jnp.bfloat16), s((b, t), jnp.int32))
  args += (s((b, t), bool),)

  def fwd_bwd(h, w, y, m):
    if entry == "loss":
      fn = lambda h, w: linear_nll_loss(h, w, y, m)[0]
    else:
      fn = lambda h, w: jnp.sum(linear_sequence_nll(h, w, y, m))
    return jax.value_and_grad(fn, (0, 1))(h, w)

  return export.export(jax.jit(fwd_bwd), platforms=(platform,))(*args)


@pytest.mark.parametrize(
  "entry, kernels",
  [
    ("loss", ("jaxnll_fused_nll_fwd_dh", "jaxnll_fused_nll_bwd_weight")),
    (
      "sequence",
      ("jaxnll_fused_nll_fwd", "jaxnll_fused_nll_bwd_hidden", "jaxnll_fused_nll_bwd_weight"),
    ),
  ],
)
def test_auto_exports_the_mosaic_kernels_for_tpu(entry, kernels):
  """Full Llama-3-8B head (8 × 2048 bf16 tokens) as Mosaic custom calls: the scalar entry's
  forward carries the hidden gradient (two kernels, 8·N·D·V), the per-sample entry's
  backward under ``"auto"`` has one kernel per gradient (three kernels: its platform branches
  share residual shapes, so no ``[N, D]`` carry)."""
  exported = export_fwd_bwd("tpu", entry)
  text = exported.mlir_module()
  assert exported.platforms == ("tpu",)
  assert text.count("tpu_custom_call") == len(kernels)
  every = ("fwd", "fwd_dh", "bwd_hidden", "bwd_weight")
  for name in (f"jaxnll_fused_nll_{k}" for k in every):
    assert (f'"{name}"' in text) == (name in kernels), name


def test_auto_exports_full_vocabulary_blocks_for_cuda():
  """Full Llama-3-8B head for CUDA: the ``token_chunked`` blocks (1040 × 128256 f32), no Mosaic."""
  exported = export_fwd_bwd("cuda", "loss")
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",)
  assert "tpu_custom_call" not in text
  assert "tensor<1040x128256xf32>" in text


# ----------------------------------------------------------------------------- bad input


def bad_input_batch():
  """Both samples with targets (sample 0: positions 1-5, sample 1: 3-8)."""
  hidden, weight, bias, targets, _ = make(8)
  t = jnp.arange(T)
  span = jnp.stack([(t >= 1) & (t <= 5), t >= 3])
  return hidden, weight, bias, targets, span


@pytest.mark.parametrize("bad", [V, -1], ids=["V", "-1"])
def test_bad_target_makes_that_samples_value_and_gradients_nan(bad):
  """A target id outside ``[0, V)`` inside sample 0's span: its loss and the gradients that
  flow from it are NaN, in the per-sample entry (either cotangent) and the scalar one."""
  hidden, weight, bias, targets, span = bad_input_batch()
  targets = targets.at[0, 2].set(bad)
  kw = dict(bias=bias, implementation="pallas_tpu", token_chunk=8, vocab_chunk=128)

  def seq(h, w, ct):
    out = linear_sequence_nll(h, w, targets, span, **kw)
    return jnp.sum(out * ct), out

  @jax.jit
  def run(h, w):
    grads = lambda ct: jax.grad(seq, (0, 1), has_aux=True)(h, w, ct)  # noqa: E731
    loss = lambda h, w: linear_nll_loss(h, w, targets, span, **kw)[0]  # noqa: E731
    return grads(jnp.array([1.0, 0.0])), grads(jnp.array([0.0, 1.0])), jax.grad(loss, (0, 1))(h, w)

  (g0, out), (g1, _), g_loss = run(hidden, weight)
  assert np.isnan(out[0]) and np.isfinite(out[1])
  for g in (*g0, *g_loss):
    assert np.isnan(np.asarray(g)).any()
  clean = jax.grad(lambda h, w: seq(h, w, jnp.array([0.0, 1.0]))[0], (0, 1))
  assert_close(g1, clean(hidden, weight))  # sample 1's gradient: untouched, finite
  assert not np.isnan(np.asarray(g0[0][1])).any()  # sample 1's hidden gradient stays finite


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_hidden_in_a_zero_cotangent_sample_leaks_nothing(value):
  """A non-finite hidden state inside sample 0's span: its loss is not finite, and with a
  zero cotangent for sample 0 every gradient equals the clean one (no ``0·NaN``)."""
  hidden, weight, bias, targets, span = bad_input_batch()
  bad = hidden.at[0, 2, 3].set(value)
  kw = dict(bias=bias, implementation="pallas_tpu", token_chunk=8, vocab_chunk=128)
  ct = jnp.array([0.0, 1.0])

  @jax.jit
  def grads(h):
    fn = lambda h, w, b: jnp.sum(linear_sequence_nll(h, w, targets, span, **kw) * ct)  # noqa: E731
    return linear_sequence_nll(h, weight, targets, span, **kw), jax.grad(fn, (0, 1, 2))(
      h, weight, bias
    )

  (out, got), (_, want) = grads(bad), grads(hidden)
  assert not np.isfinite(out[0]) and np.isfinite(out[1])
  assert_close(got, want)


# ----------------------------------------------------------------------------- the plan


def _pallas_calls(jaxpr):
  """Every ``pallas_call`` equation in ``jaxpr`` and its sub-jaxprs."""
  from jax.extend import core

  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        if isinstance(sub, core.ClosedJaxpr):
          yield from _pallas_calls(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          yield from _pallas_calls(sub)


def _dot_flops(jaxpr):
  """FLOPs of every ``dot_general`` in a kernel body (both sides of its ``pl.when``s)."""
  from jax.extend import core

  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += (
        2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[k] for k in contract]))
      )
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        if isinstance(sub, core.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_every_pallas_call_declares_the_flops_of_its_grid(layout):
  """Each ``pallas_call``'s ``pl.CostEstimate`` FLOPs equal its kernel body's matmuls times
  its grid; forward + backward of the scalar, per-sample and per-token entries is 8·N·D·V on
  whole tiles (fused forward 4, weight kernel 4); with the entropy the per-token entry keeps
  10 (forward 2, hidden 4, weight 4)."""
  n, d, v = 64, 256, 1024
  s = jax.ShapeDtypeStruct
  shape = (v, d) if layout == "vd" else (d, v)
  args = (s((2, n // 2, d), jnp.bfloat16), s(shape, jnp.bfloat16), s((2, n // 2), jnp.int32))
  args += (s((2, n // 2), bool),)
  kw = dict(implementation="pallas_tpu", weight_layout=layout, token_chunk=32, vocab_chunk=256)

  def fwd_bwd(entry):
    def fn(h, w, y, m):
      if entry == "loss":
        return linear_nll_loss(h, w, y, m, **kw)[0]
      if entry == "token":
        return jnp.sum(linear_token_nll(h, w, y, m, **kw))
      if entry == "entropy":
        return sum(map(jnp.sum, linear_token_nll(h, w, y, m, return_entropy=True, **kw)))
      return jnp.sum(linear_sequence_nll(h, w, y, m, **kw))

    return jax.grad(fn, (0, 1))

  for entry, multiple in (("loss", 8), ("sequence", 8), ("token", 8), ("entropy", 10)):
    calls = [e for e in _pallas_calls(jax.make_jaxpr(fwd_bwd(entry))(*args).jaxpr)]
    calls = [e for e in calls if e.params["interpret"] is False]  # the TPU branch
    declared = 0
    for eqn in calls:
      grid = eqn.params["grid_mapping"].grid
      counted = _dot_flops(eqn.params["jaxpr"]) * int(np.prod(grid))
      assert eqn.params["cost_estimate"].flops == counted > 0
      assert eqn.params["cost_estimate"].bytes_accessed > 0
      declared += counted
    assert declared == multiple * n * d * v, (entry, declared / (n * d * v))


def test_per_sample_and_per_token_entries_carry_the_hidden_gradient_from_the_forward():
  """``pallas_tpu``, per-sample and per-token entries: the forward with the hidden-gradient
  accumulator and the weight kernel, no hidden kernel; a frozen hidden state, or no
  gradient at all, keeps the plain forward (the accumulator would be wasted)."""
  n, d, v = 64, 256, 1024
  s = jax.ShapeDtypeStruct
  args = (s((2, n // 2, d), jnp.float32), s((d, v), jnp.float32), s((2, n // 2), jnp.int32))
  args += (s((2, n // 2), bool),)
  kw = dict(implementation="pallas_tpu", token_chunk=32, vocab_chunk=256)

  def names(fn):
    calls = _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
    return sorted(e.params["name"].removeprefix("jaxnll_fused_nll_") for e in calls)

  seq = lambda h, w, y, m: jnp.sum(linear_sequence_nll(h, w, y, m, **kw))
  tok = lambda h, w, y, m: jnp.sum(linear_token_nll(h, w, y, m, **kw))
  for fn in (seq, tok):
    # Each kernel twice: Mosaic (TPU) and interpret-mode (elsewhere) branches.
    assert names(jax.grad(fn, (0, 1))) == ["bwd_weight"] * 2 + ["fwd_dh"] * 2
    assert names(jax.grad(fn, 1)) == ["bwd_weight"] * 2 + ["fwd"] * 2
    assert names(fn) == ["fwd"] * 2


def test_tiles_per_generation_fit_vmem_and_clear_the_ridge_point():
  """At the real heads (4 × 2048 bf16 tokens), every kernel's tiles on every known chip:
  VMEM estimate within the planned share, arithmetic intensity at or above the ridge point;
  an unknown generation gets tiles that fit the smallest VMEM."""
  from jaxnll.fused import pallas_tpu as pt

  heads = {"gemma2-2b": (2304, 256000), "llama3-8b": (4096, 128256), "qwen3-8b": (4096, 151936)}
  for chip in (*pt.CHIPS.values(), pt.UNKNOWN_CHIP):
    for d, v in heads.values():
      for kind in pt.MATMULS:
        tm, tv = pt.tiles(chip, kind, d, 2, 8192, v)
        assert pt.vmem_estimate(kind, tm, tv, d, 2) <= pt.VMEM_SHARE * chip.vmem, (chip, kind)
        assert tm % 8 == 0 and tv % 128 == 0
        if chip is not pt.UNKNOWN_CHIP:
          intensity = pt.MATMULS[kind] * (tv if kind == "weight" else tm)
          assert intensity >= chip.ridge, (chip.name, kind, tm, tv)
  # Overrides win, rounded up to 8 rows / 128 columns and capped by the problem.
  assert pt.tiles(pt.CHIPS["TPU v4"], "fused", 4096, 2, 8192, 128256, 100, 300) == (104, 384)
  assert pt.tiles(pt.CHIPS["TPU v6 lite"], "stats", 256, 2, 18, 200) == (32, 256)


def test_tpu_interpret_semantics_match_reference():
  """The kernels under ``pltpu.InterpretParams()`` (TPU semantics: DMAs and semaphores
  simulated), where the installed JAX has it."""
  from jax.experimental.pallas import tpu as pltpu

  from jaxnll.fused import pallas_tpu as pt

  if not hasattr(pltpu, "InterpretParams"):
    pytest.skip("this JAX has no pltpu.InterpretParams")
  old = pt.INTERPRET
  pt.INTERPRET = pltpu.InterpretParams()
  try:
    check("pallas_tpu", 9, token_chunk=8, vocab_chunk=128, **FUSED_OPTIONS)
  finally:
    pt.INTERPRET = old


@pytest.mark.parametrize(
  "kind, rows", [("TPU v6 lite", 512), ("TPU v4", 128), ("TPU v99", 256), (None, 256)]
)
def test_tiles_follow_the_generation_the_arguments_are_placed_on(kind, rows):
  """The kernels read the TPU generation from the arguments' sharding (as in a deviceless
  compile for a named TPU): v6e's fused forward takes 512-row blocks, v4's 128; an unknown
  generation, or arguments placed nowhere, the conservative rule's 256."""
  from jax._src.mesh import AbstractDevice
  from jax.sharding import AbstractMesh, NamedSharding

  sharding = None
  if kind is not None:
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(kind, 1, "tpu"))
    sharding = NamedSharding(mesh, P())
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  args = (s((2, 1024, 256), jnp.bfloat16), s((256, 4096), jnp.bfloat16))
  args += (s((2, 1024), jnp.int32), s((2, 1024), jnp.bool_))

  def fwd_bwd(h, w, y, m):
    fn = lambda h, w: linear_nll_loss(h, w, y, m, implementation="pallas_tpu")[0]  # noqa: E731
    return jax.grad(fn, (0, 1))(h, w)

  calls = list(_pallas_calls(jax.jit(fwd_bwd).trace(*args).jaxpr.jaxpr))
  fused = [e for e in calls if e.params["name"] == "jaxnll_fused_nll_fwd_dh"]
  assert fused
  for eqn in fused:
    row_block = eqn.params["grid_mapping"].block_mappings[0].block_shape[0]
    assert getattr(row_block, "block_size", row_block) == rows
