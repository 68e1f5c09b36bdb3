"""Tests of jaxnll/train/generate.py: the cached decoder equals the uncached one (greedy and
sampled, transformer and LSTM), determinism under a key, top-k / top-p filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnll.train import data as data_lib
from jaxnll.train import generate
from jaxnll.train.model import ModelConfig, make_model

CONFIGS = {
  "transformer": ModelConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32),
  "lstm": ModelConfig(kind="lstm", d_model=16, num_layers=2),
}


def prompts(rows=4, width=24):
  rng = np.random.default_rng(0)
  ps = [rng.integers(0, 256, size=n).astype(np.int32) for n in (3, 9, 1, 6)[:rows]]
  return generate.prompt_rows(ps, width)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_cache_equals_no_cache(kind):
  model = make_model(CONFIGS[kind], seed=1)
  tokens, lengths = prompts()
  # Prefill logits equal the full forward's at the last prompt position.
  last, _ = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths))
  full = model(jnp.asarray(tokens))[np.arange(4), lengths - 1]
  np.testing.assert_allclose(last, full, rtol=1e-4, atol=1e-5)
  for opts in (dict(temperature=0.0), dict(temperature=1.3, top_k=50, top_p=0.95)):
    key = jax.random.key(7)
    got = generate.sample(model, tokens, lengths, key, max_new=12, cache=True, **opts)
    want = generate.sample(model, tokens, lengths, key, max_new=12, cache=False, **opts)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.all(np.asarray(got[1]) == lengths + 12) or np.any(np.asarray(got[0]) == 258)
    np.testing.assert_array_equal(np.asarray(got[0])[:, :1], tokens[:, :1])  # prompts kept
  greedy = generate.greedy(model, tokens, lengths, max_new=12)
  np.testing.assert_array_equal(
    greedy[0], generate.sample(model, tokens, lengths, max_new=12, temperature=0.0)[0]
  )


def test_sampling_is_deterministic_under_a_key_and_stops_at_eos():
  model = make_model(CONFIGS["transformer"], seed=2)
  tokens, lengths = prompts()
  a = generate.sample(model, tokens, lengths, jax.random.key(0), max_new=10, temperature=2.0)
  b = generate.sample(model, tokens, lengths, jax.random.key(0), max_new=10, temperature=2.0)
  c = generate.sample(model, tokens, lengths, jax.random.key(1), max_new=10, temperature=2.0)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  # A model that always says EOS stops every row after one token.
  eos = lambda t: jax.nn.one_hot(jnp.full(t.shape, data_lib.EOS), 264) * 50.0

  class Always(nnx.Module):
    def __call__(self, t):
      return eos(t)

  out, end = generate.sample(Always(), tokens, lengths, max_new=10, temperature=0.0, cache=False)
  np.testing.assert_array_equal(end, lengths + 1)
  assert np.all(np.asarray(out)[np.arange(4), lengths] == data_lib.EOS)


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(generate.filter_logits(logits, **kw)))[0].tolist()
  assert keep(temperature=1.0, top_k=2) == [True, True, False, False]
  assert keep(temperature=1.0, top_p=0.8) == [True, True, False, False]
  assert keep(temperature=1.0, top_p=0.81) == [True, True, True, False]
  assert keep(temperature=1.0, top_p=0.1) == [True, False, False, False]
  with pytest.raises(ValueError, match="needs a key"):
    generate.sample(make_model(CONFIGS["lstm"]), *prompts(), max_new=2, temperature=1.0)
