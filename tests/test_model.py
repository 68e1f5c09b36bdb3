"""Tests for jaxnll/model.py: shapes, head layout, segment isolation, context gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnll.train import model as model_lib
from jaxnll.train.model import ModelConfig, count_params, default_config, make_model

TINY = ModelConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, vocab_size=40)
TINY_LSTM = dataclasses.replace(TINY, kind="lstm")


@nnx.jit(static_argnames=("return_hidden",))
def _apply(model, tokens, segment_ids=None, positions=None, return_hidden=False):
  return model(tokens, segment_ids=segment_ids, positions=positions, return_hidden=return_hidden)


def _tokens(shape, seed=0, vocab=40):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("config", [TINY, TINY_LSTM], ids=["transformer", "lstm"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_are_hidden_times_the_output_head(config, tie):
  model = make_model(dataclasses.replace(config, tie_embeddings=tie))
  tokens = _tokens((3, 7))
  logits = _apply(model, tokens)
  hidden = _apply(model, tokens, return_hidden=True)
  weight, layout = model.output_head()
  assert logits.shape == (3, 7, 40) and hidden.shape == (3, 7, 16)
  assert layout == ("vd" if tie else "dv")
  if tie:  # the embedding table itself, [V, D], no transposed copy
    np.testing.assert_array_equal(weight, model.embed.embedding[...])
    np.testing.assert_allclose(logits, hidden @ weight.T, rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(weight, model.head.kernel[...])
    np.testing.assert_allclose(logits, hidden @ weight, rtol=1e-5, atol=1e-6)


def test_default_sizes_stay_under_a_million_parameters():
  for kind in model_lib.KINDS:
    n = count_params(make_model(default_config(kind)))
    assert 300_000 < n <= 1_000_000, (kind, n)


def _pack(rows_a, rows_b):
  """Two samples laid side by side in one row (segments 1, 2), positions restarting."""
  tokens = jnp.concatenate([rows_a, rows_b], axis=1)
  seg = jnp.concatenate(
    [jnp.ones(rows_a.shape, jnp.int32), jnp.full(rows_b.shape, 2, jnp.int32)], axis=1
  )
  pos = jnp.concatenate(
    [
      jnp.broadcast_to(jnp.arange(rows_a.shape[1]), rows_a.shape),
      jnp.broadcast_to(jnp.arange(rows_b.shape[1]), rows_b.shape),
    ],
    axis=1,
  )
  return tokens, seg, pos


@pytest.mark.parametrize("config", [TINY, TINY_LSTM], ids=["transformer", "lstm"])
def test_packed_row_gives_each_sample_its_own_result(config):
  model = make_model(config)
  a, b = _tokens((2, 5), seed=1), _tokens((2, 6), seed=2)
  tokens, seg, pos = _pack(a, b)
  packed = _apply(model, tokens, seg, pos)
  np.testing.assert_allclose(packed[:, :5], _apply(model, a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:], _apply(model, b), rtol=1e-5, atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past():
  model = make_model(TINY)
  tokens = _tokens((1, 8))
  changed = tokens.at[0, 5:].set(3)
  np.testing.assert_allclose(
    _apply(model, tokens)[:, :5], _apply(model, changed)[:, :5], rtol=1e-5, atol=1e-6
  )


def test_attention_mask_example():
  mask = model_lib.attention_mask(jnp.array([[1, 1, 2, 2, 0]]))[0, 0].astype(int)
  expected = [
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 1, 1, 0],
    [0, 0, 0, 0, 1],
  ]
  assert mask.tolist() == expected


@pytest.mark.parametrize("config", [TINY, TINY_LSTM], ids=["transformer", "lstm"])
def test_context_gradient_stop(config):
  """Same forward; no gradient reaches the embeddings of tokens seen only in the context."""
  tokens = jnp.array([[5, 6, 7, 8, 9, 10]], jnp.int32)
  span = jnp.array([[0, 0, 0, 1, 1, 0]], bool)  # shifted loss mask: positions 3, 4 scored
  targets = jnp.roll(tokens, -1, axis=1)

  def grads(context_gradient):
    # Untied head: with a tied one every row of the table also gets the head's gradient.
    cfg = dataclasses.replace(config, context_gradient=context_gradient, tie_embeddings=False)
    model = make_model(cfg)

    @nnx.jit
    def run(model):
      def loss(model):
        logits = model(tokens, span_mask=span)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(span, nll, 0.0)), logits

      return nnx.grad(loss, has_aux=True)(model)

    return run(model)

  g_flow, logits_flow = grads("flow")
  g_stop, logits_stop = grads("stop")
  np.testing.assert_array_equal(logits_flow, logits_stop)
  table_flow = g_flow["embed"]["embedding"][...]
  table_stop = g_stop["embed"]["embedding"][...]
  context_only = jnp.array([5, 6, 7])  # inputs at unscored positions 0..2
  assert float(jnp.abs(table_flow[context_only]).sum()) > 0
  np.testing.assert_array_equal(table_stop[context_only], 0.0)
  # Inputs at scored positions still learn, and so does the head.
  assert float(jnp.abs(table_stop[jnp.array([8, 9])]).sum()) > 0
  assert float(jnp.abs(g_stop["head"]["kernel"][...]).sum()) > 0


def test_config_errors():
  with pytest.raises(ValueError, match="kind"):
    ModelConfig(kind="gru")
  with pytest.raises(ValueError, match="context_gradient"):
    ModelConfig(context_gradient="none")
  with pytest.raises(ValueError, match="num_heads"):
    ModelConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="tokens"):
    make_model(TINY)(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids"):
    make_model(TINY)(jnp.zeros((2, 3), jnp.int32), segment_ids=jnp.ones((2, 4), jnp.int32))


def test_config_round_trips_through_a_dict():
  config = default_config("lstm", context_gradient="stop")
  assert ModelConfig.from_dict(config.to_dict()) == config
