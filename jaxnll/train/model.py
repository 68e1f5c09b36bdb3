"""A small decoder-only language model (Flax NNX) for the demo, the tests and the benchmarks.

Two architectures share one interface, so every loss in jaxnll can be tried on both:

* :class:`Transformer` — pre-norm decoder blocks with rotary positions; attention is causal
  *and* confined to a segment, so packed rows (several ``[x, y]`` samples in one row, told
  apart by ``segment_ids``) give every sample exactly the result it gets alone.
* :class:`LSTMLM` — stacked :class:`flax.nnx.LSTMCell` layers whose state restarts at every
  segment start: the same sub-sequence losses serve a recurrent model (the book's RNN loss).

Both return the final hidden states ``[B, T, D]`` (for the fused head + loss) or the logits
``[B, T, V]``, and expose the output head for the fused losses as ``(weight, weight_layout)``
(:meth:`output_head`): the ``[D, V]`` ``Linear`` kernel (``"dv"``), or with tied embeddings the
``[V, D]`` embedding table itself (``"vd"``, read in place by
:func:`jaxnll.fused.linear_nll_loss`: no transposed copy of the table).

With ``context_gradient="stop"`` the model applies :func:`jaxnll.stop_gradient_outside` to its
activations outside the given span (the embeddings and every layer's output): the forward pass
is unchanged, but no error gradient flows into the part of the network that computes the
context — the literal, model-level reading of "the rest of the network remains unchanged".

Dimension letters: ``B`` batch, ``T`` sequence length, ``D`` model width, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxnll.spans import stop_gradient_outside

KINDS = ("transformer", "lstm")
CONTEXT_GRADIENTS = ("flow", "stop")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and options of the demo language models (JSON-friendly, hashable).

  Attributes:
    kind: ``"transformer"`` or ``"lstm"``.
    vocab_size: ``V``; the byte tokenizer of :mod:`jaxnll.train.data` needs 264.
    d_model: ``D``, the residual width (the LSTM's embedding and hidden width).
    num_layers: decoder blocks, or stacked LSTM layers.
    num_heads: attention heads (transformer); ``d_model`` must be divisible by it.
    d_ff: hidden width of the transformer's MLP.
    tie_embeddings: use the (transposed) token embedding as the output head.
    context_gradient: ``"flow"`` (ordinary) or ``"stop"`` (no gradient into the context's
      activations, see the module docstring).
    rope_base: base of the rotary position frequencies.
  """

  kind: str = "transformer"
  vocab_size: int = 264
  d_model: int = 128
  num_layers: int = 3
  num_heads: int = 4
  d_ff: int = 384
  tie_embeddings: bool = True
  context_gradient: str = "flow"
  rope_base: float = 10_000.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.context_gradient not in CONTEXT_GRADIENTS:
      raise ValueError(
        f"context_gradient must be one of {CONTEXT_GRADIENTS}, got {self.context_gradient!r}"
      )
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.kind == "transformer":
      if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
        raise ValueError(
          f"d_model ({self.d_model}) must split into num_heads ({self.num_heads}) heads of "
          "even width (rotary positions rotate pairs of features)"
        )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    return cls(**d)


def default_config(kind: str = "transformer", **overrides) -> ModelConfig:
  """The demo's sizes for ``kind`` (both well under a million parameters)."""
  if kind == "lstm":
    overrides = {"d_model": 192, "num_layers": 2, **overrides}
  return ModelConfig(kind=kind, **overrides)


def make_model(config: ModelConfig, *, seed: int = 0) -> Transformer | LSTMLM:
  """Builds the model that ``config.kind`` names, initialised from ``seed``.

  Examples:
    >>> import jax.numpy as jnp
    >>> model = make_model(ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 264)
  """
  rngs = nnx.Rngs(seed)
  if config.kind == "transformer":
    return Transformer(config, rngs=rngs)
  return LSTMLM(config, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters (:class:`flax.nnx.Param`) in ``model``."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- helpers


def _default_layout(tokens, segment_ids, positions):
  """One unpadded sample per row unless segment ids / positions say otherwise."""
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
  return segment_ids, positions


def _check_tokens(tokens, segment_ids, positions, span_mask):
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
  for name, x in (("segment_ids", segment_ids), ("positions", positions), ("span_mask", span_mask)):
    if x is not None and jnp.shape(x) != tokens.shape:
      raise ValueError(f"{name} must have the shape of tokens {tokens.shape}, got {jnp.shape(x)}")


def rotary(x: Float[Array, "B T H K"], positions: Int[Array, "B T"], base: float) -> Array:
  """Rotary position embedding (Su et al., 2021) of the last axis, by per-token positions."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids: Int[Array, "B T"]) -> Bool[Array, "B 1 T T"]:
  """Causal and segment-confined: query ``i`` sees key ``j`` iff ``j <= i`` in its segment.

  Examples:
    >>> import jax.numpy as jnp
    >>> attention_mask(jnp.array([[1, 1, 2]]))[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
  """
  t = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal & same)[:, None]


# ----------------------------------------------------------------------------- transformer


class Attention(nnx.Module):
  """Multi-head self-attention with rotary positions and an explicit boolean mask."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, self.heads = config.d_model, config.num_heads
    self.head_dim = d // self.heads
    self.rope_base = config.rope_base
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(
      d,
      d,
      use_bias=False,
      kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * config.num_layers)),
      rngs=rngs,
    )

  def _qkv(self, x, positions):
    b, t, _ = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, H, K]
    return rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base), v

  def _attend(self, q, k, v, mask):
    b, t = q.shape[:2]
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(self.head_dim)
    # A finite minimum, never -inf: a fully masked row (none here) could not turn into NaN.
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqs,bshk->bqhk", weights, v).reshape(b, t, -1))

  def __call__(self, x, positions, mask):
    q, k, v = self._qkv(x, positions)
    return self._attend(q, k, v, mask)

  def prefill(self, x, positions, mask):
    """``__call__`` that also returns the keys and values ``[B, T, H, K]`` (the KV cache)."""
    q, k, v = self._qkv(x, positions)
    return self._attend(q, k, v, mask), (k, v)

  def step(self, x, pos, cache):
    """One new token per row (``x: [B, 1, D]`` at position ``pos: [B]``) against the cache:
    its key and value are written at ``pos``, and it attends to positions ``<= pos``."""
    q, k, v = self._qkv(x, pos[:, None])
    rows = jnp.arange(x.shape[0])
    keys = cache[0].at[rows, pos].set(k[:, 0])
    values = cache[1].at[rows, pos].set(v[:, 0])
    mask = (jnp.arange(keys.shape[1])[None, :] <= pos[:, None])[:, None, None, :]
    return self._attend(q, keys, values, mask), (keys, values)


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
    self.down = nnx.Linear(
      config.d_ff,
      config.d_model,
      kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * config.num_layers)),
      rngs=rngs,
    )

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.norm2 = nnx.RMSNorm(config.d_model, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.norm1(x), positions, mask)
    return x + self.mlp(self.norm2(x))

  def prefill(self, x, positions, mask):
    y, cache = self.attn.prefill(self.norm1(x), positions, mask)
    x = x + y
    return x + self.mlp(self.norm2(x)), cache

  def step(self, x, pos, cache):
    y, cache = self.attn.step(self.norm1(x), pos, cache)
    x = x + y
    return x + self.mlp(self.norm2(x)), cache


class _LanguageModel(nnx.Module):
  """Shared head, embedding and context-gradient logic of both architectures."""

  config: ModelConfig

  def _init_io(self, config: ModelConfig, *, rngs: nnx.Rngs):
    """Embedding, final norm and (untied) head; both architectures' hidden width is
    ``d_model``, so a tied head is always the embedding table."""
    self.config = config
    width = config.d_model
    self.embed = nnx.Embed(
      config.vocab_size, config.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
    )
    self.final_norm = nnx.RMSNorm(width, rngs=rngs)
    if config.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Linear(width, config.vocab_size, use_bias=False, rngs=rngs)

  def output_head(self) -> tuple[Float[Array, "D V"] | Float[Array, "V D"], str]:
    """The output head as the fused losses take it: ``(weight, weight_layout)``, the ``[D, V]``
    kernel with ``"dv"``, or the tied ``[V, D]`` embedding table with ``"vd"`` (no copy)."""
    if self.head is None:
      return self.embed.embedding[...], "vd"
    return self.head.kernel[...], "dv"

  def logits(self, hidden: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
    """Applies the output head to hidden states ``[..., D]`` (from ``__call__(...,
    return_hidden=True)`` or a decoding step)."""
    weight, layout = self.output_head()
    if layout == "vd":
      return jnp.einsum("...d,vd->...v", hidden, weight)
    return hidden @ weight

  def _stop(self, x, span_mask):
    if self.config.context_gradient == "stop" and span_mask is not None:
      return stop_gradient_outside(x, span_mask)
    return x

  def __call__(
    self,
    tokens: Int[Array, "B T"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    span_mask: Bool[Array, "B T"] | None = None,
    return_hidden: bool = False,
  ) -> Float[Array, "B T V"] | Float[Array, "B T D"]:
    """Logits ``[B, T, V]`` (or the final hidden states ``[B, T, D]``) for a token batch.

    Args:
      tokens: int ``[B, T]``.
      segment_ids: int ``[B, T]``; tokens attend (or carry state) only within their segment.
        Default: each row is one segment.
      positions: int ``[B, T]``, restarting at 0 in every segment. Default: ``0..T-1``.
      span_mask: bool ``[B, T]``, the positions whose outputs are scored (the *shifted* loss
        mask); only read with ``context_gradient="stop"``, which stops gradients elsewhere.
      return_hidden: return the hidden states for a fused head + loss instead of logits.
    """
    tokens = jnp.asarray(tokens)
    _check_tokens(tokens, segment_ids, positions, span_mask)
    segment_ids, positions = _default_layout(tokens, segment_ids, positions)
    x = self._stop(self.embed(tokens), span_mask)
    x = self._body(x, segment_ids, positions, span_mask)
    hidden = self.final_norm(x)
    return hidden if return_hidden else self.logits(hidden)

  # Cached decoding (:mod:`jaxnll.train.generate`): ``prefill`` runs the left-aligned prompts
  # of a ``[B, T]`` row batch once and returns the next-token logits at each row's last prompt
  # position with a cache; ``decode_step`` feeds one token per row at position ``pos`` and
  # returns the next logits.  Both equal the full forward's logits at the same positions.

  def prefill(
    self, tokens: Int[Array, "B T"], lengths: Int[Array, " B"]
  ) -> tuple[Float[Array, "B V"], Any]:
    """Logits ``[B, V]`` at position ``lengths - 1`` of each row, and the decoding cache."""
    tokens = jnp.asarray(tokens)
    _, positions = _default_layout(tokens, None, None)
    hidden, cache = self._prefill(self.embed(tokens), positions, lengths)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(self.final_norm(last)), cache

  def decode_step(
    self, token: Int[Array, " B"], pos: Int[Array, " B"], cache
  ) -> tuple[Float[Array, "B V"], Any]:
    """Logits ``[B, V]`` after ``token`` at position ``pos`` of each row, and the new cache."""
    x, cache = self._step(self.embed(token[:, None]), pos, cache)
    return self.logits(self.final_norm(x[:, 0])), cache


class Transformer(_LanguageModel):
  """Decoder-only transformer: embed, ``num_layers`` pre-norm blocks, final norm, head."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self._init_io(config, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])

  def _body(self, x, segment_ids, positions, span_mask):
    mask = attention_mask(segment_ids)
    for block in self.blocks:
      x = self._stop(block(x, positions, mask), span_mask)
    return x

  def _prefill(self, x, positions, lengths):
    del lengths  # causal: positions past a prompt do not change the ones before it
    mask = attention_mask(jnp.ones(positions.shape, jnp.int32))
    cache = []
    for block in self.blocks:
      x, kv = block.prefill(x, positions, mask)
      cache.append(kv)
    return x, tuple(cache)

  def _step(self, x, pos, cache):
    new = []
    for block, kv in zip(self.blocks, cache, strict=True):
      x, kv = block.step(x, pos, kv)
      new.append(kv)
    return x, tuple(new)


# ----------------------------------------------------------------------------- LSTM


def _scan_lstm(cell: nnx.LSTMCell, x: Array, restart: Array) -> Array:
  """Runs ``cell`` over time; the state is zeroed where a segment (re)starts."""
  graphdef, state = nnx.split(cell)
  zeros = jnp.zeros(x.shape[:1] + (cell.hidden_features,), x.dtype)

  def step(carry, inputs):
    x_t, restart_t = inputs
    carry = jax.tree.map(lambda c: jnp.where(restart_t[:, None], zeros, c), carry)
    return nnx.merge(graphdef, state)(carry, x_t)

  _, ys = jax.lax.scan(step, (zeros, zeros), (jnp.swapaxes(x, 0, 1), restart.T))
  return jnp.swapaxes(ys, 0, 1)


class LSTMLM(_LanguageModel):
  """Stacked LSTM language model (:class:`flax.nnx.LSTMCell`), hidden width ``d_model``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self._init_io(config, rngs=rngs)
    self.cells = nnx.List(
      [nnx.LSTMCell(config.d_model, config.d_model, rngs=rngs) for _ in range(config.num_layers)]
    )

  def _body(self, x, segment_ids, positions, span_mask):
    restart = positions == 0
    for cell in self.cells:
      x = self._stop(x + _scan_lstm(cell, x, restart), span_mask)
    return x

  def _prefill(self, x, positions, lengths):
    # The state of each layer after each row's last prompt token (frozen past it).
    cache = []
    for cell in self.cells:
      ys, carry = _scan_lstm_prefix(cell, x, lengths)
      x = x + ys
      cache.append(carry)
    return x, tuple(cache)

  def _step(self, x, pos, cache):
    del pos
    new, x = [], x[:, 0]
    for cell, carry in zip(self.cells, cache, strict=True):
      carry, y = cell(carry, x)
      x = x + y
      new.append(carry)
    return x[:, None], tuple(new)


def _scan_lstm_prefix(cell: nnx.LSTMCell, x: Array, lengths: Array):
  """:func:`_scan_lstm` over one segment a row, also returning the state after ``lengths``."""
  graphdef, state = nnx.split(cell)
  zeros = jnp.zeros(x.shape[:1] + (cell.hidden_features,), x.dtype)

  def step(carry, inputs):
    x_t, t = inputs
    new, y = nnx.merge(graphdef, state)(carry, x_t)
    keep = (t < lengths)[:, None]
    return jax.tree.map(lambda n, c: jnp.where(keep, n, c), new, carry), y

  times = jnp.arange(x.shape[1])
  carry, ys = jax.lax.scan(step, (zeros, zeros), (jnp.swapaxes(x, 0, 1), times))
  return jnp.swapaxes(ys, 0, 1), carry
