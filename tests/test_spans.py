"""Tests of jaxnll/spans.py: samples, the shift, masks and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnll
from jaxnll import spans


def test_concat_sample_is_context_then_target():
  tokens, span = jaxnll.concat_sample(jnp.array([5, 6]), jnp.array([7, 8, 9]))
  np.testing.assert_array_equal(tokens, [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(span, [False, False, True, True, True])


def test_concat_sample_batched_and_errors():
  tokens, span = jaxnll.concat_sample(jnp.zeros((2, 3), int), jnp.ones((2, 1), int))
  assert tokens.shape == span.shape == (2, 4)
  with pytest.raises(ValueError, match=r"x_ids and y_ids.*\(2, 3\).*\(3, 1\)"):
    jaxnll.concat_sample(jnp.zeros((2, 3), int), jnp.ones((3, 1), int))
  with pytest.raises(TypeError, match="y_ids"):
    jaxnll.concat_sample(jnp.zeros(3, int), jnp.ones(2))


def test_shift_targets_contract_example():
  tokens = jnp.array([9, 4, 6, 1, 3, 9, 1])
  span = jnp.array([0, 0, 0, 0, 1, 1, 1], bool)
  targets, mask = jaxnll.shift_targets(tokens, span)
  np.testing.assert_array_equal(targets[:-1], [4, 6, 1, 3, 9, 1])
  np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1, 0])


def test_first_target_token_is_predicted_from_last_context_position():
  x, y = jnp.array([11, 12, 13]), jnp.array([21, 22])
  tokens, span = jaxnll.concat_sample(x, y)
  targets, mask = jaxnll.shift_targets(tokens, span)
  predicted = [int(t) for t, m in zip(targets, mask, strict=True) if m]
  assert predicted == [21, 22]  # every target token, the first included
  assert int(jnp.argmax(mask)) == len(x) - 1  # predicted at the last context position


def test_shift_targets_never_predicts_across_segments_or_into_padding():
  tokens = jnp.array([[1, 2, 3, 4, 5, 6, 0, 0]])
  span = jnp.array([[0, 1, 1, 0, 1, 1, 0, 0]], bool)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  targets, mask = jaxnll.shift_targets(tokens, span, seg)
  # Position 2 (end of segment 1) would predict token 4 of segment 2: masked.
  np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(targets[0, :2], [2, 3])


def test_shift_targets_keeps_float_weights():
  _, mask = jaxnll.shift_targets(jnp.arange(4), jnp.array([0.0, 0.5, 2.0, 1.0]))
  assert mask.dtype == jnp.float32
  np.testing.assert_allclose(mask, [0.5, 2.0, 1.0, 0.0])


def test_shift_targets_errors_name_arguments():
  with pytest.raises(ValueError, match=r"tokens and span_mask.*\(4,\).*\(3,\)"):
    jaxnll.shift_targets(jnp.arange(4), jnp.ones(3, bool))
  with pytest.raises(TypeError, match="tokens"):
    jaxnll.shift_targets(jnp.ones(4), jnp.ones(4, bool))
  with pytest.raises(ValueError, match="segment_ids"):
    jaxnll.shift_targets(jnp.arange(4), jnp.ones(4, bool), jnp.ones(5, int))


def test_spans_to_mask_single_and_multiple_spans():
  m = jaxnll.spans_to_mask(jnp.array([1, 0]), jnp.array([3, 0]), 4)
  np.testing.assert_array_equal(m, [[0, 1, 1, 0], [0, 0, 0, 0]])
  m = jaxnll.spans_to_mask(jnp.array([[0, 3], [2, 2]]), jnp.array([[1, 5], [4, 2]]), 5)
  np.testing.assert_array_equal(m, [[1, 0, 0, 1, 1], [0, 0, 1, 1, 0]])
  with pytest.raises(ValueError, match="starts and ends"):
    jaxnll.spans_to_mask(jnp.array([1]), jnp.array([[2]]), 3)


def test_from_ignore_index():
  targets, mask = jaxnll.from_ignore_index(jnp.array([[-100, 3, 4], [7, -100, -100]]))
  np.testing.assert_array_equal(targets, [[0, 3, 4], [7, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 0, 0]])
  targets, mask = jaxnll.from_ignore_index(jnp.array([1, 0]), ignore_index=0)
  np.testing.assert_array_equal(mask, [True, False])


def test_stop_gradient_outside_broadcasts_over_features():
  x = jnp.arange(12.0).reshape(2, 3, 2)
  span = jnp.array([[True, False, True], [False, False, True]])
  y, vjp = jax.vjp(lambda x: jaxnll.stop_gradient_outside(x, span), x)
  np.testing.assert_array_equal(y, x)
  (g,) = vjp(jnp.ones_like(x))
  np.testing.assert_array_equal(g, np.broadcast_to(np.asarray(span)[..., None], x.shape))
  with pytest.raises(ValueError, match="span_mask"):
    jaxnll.stop_gradient_outside(x, span[:, :2])


def test_pack_samples_first_fit_and_positions():
  samples = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]), ([8], [1]), ([9, 9], [0, 1])]
  p = jaxnll.pack_samples(samples, 5)
  # First fit: sample 2 (1 token) goes back to row 0, which has room; sample 3 (2 tokens)
  # fits in no open row and opens row 2.
  assert p.sample_index == [[0, 2], [1], [3]]
  np.testing.assert_array_equal(p.tokens, [[1, 2, 3, 8, 0], [4, 5, 6, 7, 0], [9, 9, 0, 0, 0]])
  np.testing.assert_array_equal(p.segment_ids, [[1, 1, 1, 2, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(p.positions[0], [0, 1, 2, 0, 0])
  np.testing.assert_array_equal(p.span_mask[0], [0, 1, 1, 1, 0])


def test_pack_samples_errors_name_the_sample():
  with pytest.raises(ValueError, match="sample 1 has 4 tokens"):
    spans.pack_samples([([1], [1]), ([1, 2, 3, 4], [0, 0, 1, 1])], 3)
  with pytest.raises(ValueError, match="sample 0"):
    spans.pack_samples([([1, 2], [1])], 3)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("pad_id", ["x", -1, 1.5, True, 2**31])
def test_pack_samples_names_a_bad_pad_id(pad_id):
  with pytest.raises(ValueError, match="pad_id"):
    spans.pack_samples([([1, 2], [0, 1])], 4, pad_id=pad_id)


@pytest.mark.parametrize(
  "tokens, match",
  [([1.0, 2.0], "sample 1: tokens must be integer ids"), ([1, -3], r"sample 1: .*got -3")],
)
def test_pack_samples_refuses_float_or_negative_token_ids(tokens, match):
  with pytest.raises(ValueError, match=match):
    spans.pack_samples([([1, 2], [0, 1]), (tokens, [0, 1])], 4)


def test_pack_samples_keeps_float_span_weights():
  p = spans.pack_samples([([1, 2, 3], [0.0, 0.5, 2.0]), ([4, 5], [0, 1])], 5)
  assert p.span_mask.dtype == np.float32
  np.testing.assert_array_equal(p.span_mask, [[0, 0.5, 2.0, 0, 1]])
  assert spans.pack_samples([([1, 2], [0, 1])], 3).span_mask.dtype == np.bool_
  with pytest.raises(ValueError, match="sample 0: span_mask"):
    spans.pack_samples([([1, 2], [0, 2])], 3)  # an integer 2 is neither a bool nor a weight


@pytest.mark.parametrize("ignore_index", ["x", 1.5, None])
def test_from_ignore_index_names_a_bad_ignore_index(ignore_index):
  with pytest.raises(TypeError, match="ignore_index"):
    jaxnll.from_ignore_index(jnp.array([1, -100]), ignore_index=ignore_index)


@pytest.mark.parametrize(
  "starts, ends, match",
  [([-1], [2], "starts must be >= 0"), ([1], [9], "ends must be <= length 5"), ([3], [2], "<=")],
)
def test_spans_to_mask_refuses_spans_outside_the_row(starts, ends, match):
  with pytest.raises(ValueError, match=match):
    jaxnll.spans_to_mask(jnp.array(starts), jnp.array(ends), 5)
