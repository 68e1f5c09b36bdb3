"""Decoding from the small language models of :mod:`jaxnll.train.model`.

One decoder (:func:`sample`: temperature, top-k, top-p, the model's KV cache) serves policy
sampling; :func:`greedy` is its temperature-0 case, for evaluation tables and the teacher's
answers of sequence-level distillation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnll.train import data as data_lib


def filter_logits(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """``logits / temperature`` with everything outside the top-``k`` and the top-``p`` nucleus
  set to ``-inf`` (``top_k=0`` / ``top_p=1`` keep every token; the most likely always stays)."""
  z = logits.astype(jnp.float32) / temperature
  if top_k and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z >= kth, z, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-z, axis=-1)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(sorted_z, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(keep_sorted)
    z = jnp.where(keep, z, -jnp.inf)
  return z


@functools.partial(nnx.jit, static_argnames=("max_new", "temperature", "top_k", "top_p", "cache"))
def sample(
  model,
  tokens,
  lengths,
  key=None,
  *,
  max_new: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  cache: bool = True,
):
  """Continues each row's first ``lengths`` tokens until EOS or ``max_new`` new tokens.

  Step ``i`` draws from ``softmax(filter_logits(logits))`` with the key
  ``fold_in(key, i)`` (one key a step, split over rows by the categorical draw), so the same
  ``key`` gives the same answers with or without the cache and on every call;
  ``temperature=0`` is greedy (``argmax``, no key needed).  With ``cache=True`` the prompt
  runs once (:meth:`prefill`) and every further token is one :meth:`decode_step` against the
  model's cache (a KV cache for the transformer, the recurrent state for the LSTM); with
  ``cache=False`` every step re-runs the whole row (the reference the cache is tested
  against).

  Args:
    model: a :mod:`jaxnll.train.model` language model.
    tokens: int ``[B, T]`` rows, each prompt left-aligned (the rest is overwritten).
    lengths: int ``[B]`` prompt lengths (at least 1).
    key: a PRNG key (unused when ``temperature == 0``).
    max_new: most tokens appended to a row.
    temperature: ``τ ≥ 0``; ``0`` is greedy.
    top_k, top_p: keep only the ``k`` most likely tokens / the smallest set of most likely
      tokens whose probability reaches ``p`` (before sampling).
    cache: decode with the model's cache.

  Returns:
    ``(tokens, lengths)``: the rows with their continuations and the new lengths (a row stops
    after writing ``EOS`` or when it is full).
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a key")
  rows, length = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)

  def choose(logits, i):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(tokens.dtype)
    z = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(key, i), z, axis=-1).astype(tokens.dtype)

  def full_logits(tokens, lengths):
    logits = model(tokens)
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, tokens, lengths, done, last, state = carry
    nxt = choose(last, i)
    write = ~done & (lengths < length)
    at = jnp.minimum(lengths, length - 1)
    old = tokens[jnp.arange(rows), at]
    tokens = tokens.at[jnp.arange(rows), at].set(jnp.where(write, nxt, old))
    lengths = lengths + write
    done = done | (write & (nxt == data_lib.EOS)) | (lengths >= length)
    if cache:
      last, state = model.decode_step(tokens[jnp.arange(rows), at], at, state)
    else:
      last = full_logits(tokens, lengths)
    return i + 1, tokens, lengths, done, last, state

  if cache:
    last, state = model.prefill(tokens, lengths)
  else:
    last, state = full_logits(tokens, lengths), ()
  done = lengths >= length
  carry = (0, tokens, lengths, done, last, state)
  _, tokens, lengths, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, lengths


def greedy(model, tokens, lengths, *, max_new: int):
  """Greedy continuation of each row's first ``lengths`` tokens, until EOS or ``max_new``:
  :func:`sample` at temperature 0, with the model's cache where it has one.

  Args:
    model: a language model ``model(tokens) -> logits [B, T, V]``.
    tokens: int ``[B, T]`` rows, each prompt left-aligned (the rest is overwritten).
    lengths: int ``[B]`` prompt lengths (at least 1).
    max_new: most tokens appended to a row.

  Returns:
    ``(tokens, lengths)``: the rows with their continuations and the new lengths (a row stops
    after writing ``EOS`` or when it is full).
  """
  # Any callable ``model(tokens) -> logits`` decodes; the cache where the model has one.
  cache = hasattr(model, "prefill") and hasattr(model, "decode_step")
  return sample(model, tokens, lengths, max_new=max_new, temperature=0.0, cache=cache)


def prompt_rows(prompts: Sequence[np.ndarray], width: int, rows: int | None = None):
  """``(tokens [rows, width], lengths [rows])``: prompts left-aligned in PAD rows."""
  rows = len(prompts) if rows is None else rows
  tokens = np.full((rows, width), data_lib.PAD, np.int32)
  lengths = np.ones((rows,), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, : len(p)] = p
    lengths[r] = len(p)
  return tokens, lengths


def answer_ids(row: np.ndarray, start: int, end: int) -> list[int]:
  """The ids a decoder wrote in ``row[start:end]``, without the closing EOS and after."""
  ids = [int(x) for x in row[start:end]]
  return ids[: ids.index(data_lib.EOS)] if data_lib.EOS in ids else ids
