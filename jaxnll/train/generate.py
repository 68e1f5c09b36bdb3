"""Decoding from the small language models of :mod:`jaxnll.train.model`.

One greedy decoder (:func:`greedy`) serves evaluation tables and the teacher's answers of
sequence-level distillation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnll.train import data as data_lib


@functools.partial(nnx.jit, static_argnames=("max_new",))
def greedy(model, tokens, lengths, *, max_new: int):
  """Greedy continuation of each row's first ``lengths`` tokens, until EOS or ``max_new``.

  Args:
    model: a language model ``model(tokens) -> logits [B, T, V]``.
    tokens: int ``[B, T]`` rows, each prompt left-aligned (the rest is overwritten).
    lengths: int ``[B]`` prompt lengths (at least 1).
    max_new: most tokens appended to a row.

  Returns:
    ``(tokens, lengths)``: the rows with their continuations and the new lengths (a row stops
    after writing ``EOS`` or when it is full).
  """
  rows, length = tokens.shape

  def cond(carry):
    i, _, _, done = carry
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, tokens, lengths, done = carry
    logits = model(tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    nxt = jnp.argmax(last, axis=-1).astype(tokens.dtype)
    write = ~done & (lengths < length)
    at = jnp.minimum(lengths, length - 1)
    old = tokens[jnp.arange(rows), at]
    tokens = tokens.at[jnp.arange(rows), at].set(jnp.where(write, nxt, old))
    lengths = lengths + write
    done = done | (write & (nxt == data_lib.EOS)) | (lengths >= length)
    return i + 1, tokens, lengths, done

  done = lengths >= length
  _, tokens, lengths, _ = jax.lax.while_loop(cond, body, (0, tokens, lengths, done))
  return tokens, lengths


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
