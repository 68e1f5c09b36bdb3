"""``token_chunked``'s gradient in vocabulary slabs (``token_chunked.slab_grad_pass``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnll import linear_nll_loss, linear_sequence_nll
from jaxnll.fused import token_chunked

# V = 300: slabs of 128 columns and a narrower last one; 2 x 21 positions in blocks of 8, so
# the last token block is read shifted back.
B, T, D, V = 2, 21, 16, 300


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 5)
  h = jax.random.normal(k[0], (B, T, D), dtype)
  w = (0.3 * jax.random.normal(k[1], (D, V))).astype(dtype)
  bias = 0.1 * jax.random.normal(k[2], (V,))
  y = jax.random.randint(k[3], (B, T), 0, V)
  span = jax.random.bernoulli(k[4], 0.7, (B, T))
  return h, w, bias, y, span


@pytest.fixture
def tiny_budget(monkeypatch):
  # 4·D·128 bytes: slabs of 128 columns
  monkeypatch.setattr(token_chunked, "WEIGHT_GRAD_BYTES", 4 * D * 128)


def test_slab_columns():
  assert token_chunked.slab_columns(2304, 256000) == 85376  # 2.2 GiB in 3 slabs
  assert token_chunked.slab_columns(4096, 128256) == 64128  # 2.0 GiB in 2
  assert token_chunked.slab_columns(4096, 32768) == 32768  # 0.5 GiB: whole
  assert token_chunked.slab_columns(16, 300, 4 * 16 * 128) == 128
  assert token_chunked.slab_columns(16, 300, 1) == 128  # never under 128 columns


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_scalar_loss_grads_match_xla(tiny_budget, layout):
  h, w, bias, y, span = _inputs()
  w = w if layout == "dv" else w.T

  def grads(implementation):
    f = lambda h, w, b: linear_nll_loss(
      h, w, y, span, bias=b, weight_layout=layout, implementation=implementation, token_chunk=8,
      z_loss=1e-3,
    )[0]  # fmt: skip
    return jax.value_and_grad(f, argnums=(0, 1, 2))(h, w, bias)

  got, want = grads("token_chunked"), grads("xla")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_per_sample_grads_match_xla(tiny_budget):
  h, w, _, y, span = _inputs()
  ct = jnp.array([0.7, -1.3])

  def grads(implementation):
    f = lambda h, w: jnp.vdot(
      ct, linear_sequence_nll(h, w, y, span, implementation=implementation, token_chunk=8)
    )
    return jax.grad(f, argnums=(0, 1))(h, w)

  for a, b in zip(grads("token_chunked"), grads("xla"), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _f32_buffers(budget, monkeypatch):
  monkeypatch.setattr(token_chunked, "WEIGHT_GRAD_BYTES", budget)
  h, w, _, y, span = _inputs(jnp.bfloat16)
  f = lambda h, w: linear_nll_loss(h, w, y, span, implementation="token_chunked")[0]
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(h, w))
  return re.findall(r"(f32\[[\d,]*\]) = broadcast_in_dim", jaxpr)  # the zeroed buffers


def test_the_budget_decides_the_buffer(monkeypatch):
  # A bf16 head: the single pass holds an f32 [D, V] buffer; one byte less, two slabs of 256
  # columns (the second 44 wide).
  assert f"f32[{D},{V}]" in _f32_buffers(4 * D * V, monkeypatch)
  slabbed = _f32_buffers(4 * D * V - 1, monkeypatch)
  assert f"f32[{D},{V}]" not in slabbed and f"f32[{D},256]" in slabbed, slabbed


def test_slabs_keep_a_zero_cotangent_samples_nan_out_of_the_gradients(tiny_budget):
  """The slab pass gates like every kernel: a NaN hidden state in sample 0's span, whose
  cotangent is 0, reaches neither sample 1's hidden gradient nor the weight gradient."""
  h, w, _, y, span = _inputs()
  span = span.at[0, 3].set(True)
  dirty = h.at[0, 3, 5].set(jnp.nan)
  ct = jnp.array([0.0, 1.0])

  def grads(h):
    f = lambda h, w: jnp.vdot(
      ct, linear_sequence_nll(h, w, y, span, implementation="token_chunked", token_chunk=8)
    )
    return jax.grad(f, argnums=(0, 1))(h, w)

  (dh, dw), (dh_clean, dw_clean) = grads(dirty), grads(h)
  np.testing.assert_array_equal(dw, dw_clean)
  np.testing.assert_array_equal(dh[1], dh_clean[1])
