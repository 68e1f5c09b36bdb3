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


@pytest.mark.parametrize("implementation", ["token_chunked", "pallas_tpu"])
def test_vocabulary_sharded_with_padding_matches_reference(implementation):
  """Inside ``shard_map`` over a (data 2, model 4) mesh: rows, targets and span sharded over
  the data axis, 4 vocabulary shards of 64 columns, 56 of them padding."""
  mesh = parallel.make_mesh("data=2,model=4")
  hidden, weight, bias, targets, span = make(4, v=200)
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 56)])
  wp, bp = pad(weight), pad(bias)
  bad_hidden, _, _, bad_targets, _ = poisoned(hidden, weight, bias, targets, span)
  ct = jnp.arange(1.0, B + 1)
  opts = dict(OPTIONS, vocab_axis="model", vocab_size=V, implementation=implementation)

  def local(h, w, b, y, m, ct):
    out = linear_sequence_nll(h, w, y, m, bias=b, token_chunk=8, **opts)
    loss, _ = linear_nll_loss(h, w, y, m, bias=b, normalize="sum", token_chunk=8, **opts)
    return jax.lax.psum(jnp.sum(out * ct) + loss, "data")

  rows = P("data")
  specs = (rows, P(None, "model"), P("model"), rows, rows, rows)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
  got = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))(bad_hidden, wp, bp, bad_targets, span, ct)

  def plain(h, w, b):
    ref = dict(OPTIONS, implementation="reference")
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


@pytest.mark.parametrize("implementation", ["token_chunked", "pallas_tpu"])
def test_vd_table_temperature_segments_and_entropy_match_reference(implementation):
  """A ``[V, D]`` table read in place, temperature after the soft-cap, packed segments and
  per-token entropies: values and gradients of every entry equal the reference's."""
  hidden, weight, bias, targets, span = make(6)
  segments = jnp.where(jnp.arange(T) < 4, 1, 2)[None].repeat(B, 0).at[:, -1].set(0)
  kw = dict(OPTIONS, temperature=0.7)
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


@pytest.mark.parametrize("entry", ["loss", "sequence"])
def test_auto_exports_the_mosaic_kernels_for_tpu(entry):
  """Full Llama-3-8B head (8 × 2048 bf16 tokens): forward, hidden- and weight-gradient
  kernels, as Mosaic custom calls."""
  exported = export_fwd_bwd("tpu", entry)
  text = exported.mlir_module()
  assert exported.platforms == ("tpu",)
  assert text.count("tpu_custom_call") == 3
  for name in (
    "jaxnll_fused_nll_fwd",
    "jaxnll_fused_nll_bwd_hidden",
    "jaxnll_fused_nll_bwd_weight",
  ):
    assert name in text


def test_auto_exports_full_vocabulary_blocks_for_cuda():
  """Full Llama-3-8B head for CUDA: the ``token_chunked`` blocks (1040 × 128256 f32), no Mosaic."""
  exported = export_fwd_bwd("cuda", "loss")
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",)
  assert "tpu_custom_call" not in text
  assert "tensor<1040x128256xf32>" in text
