"""The Flax NNX train step: gradients of an objective, accumulated exactly, one update.

The step (:func:`train_step`, one ``nnx.jit``; its pure form :func:`train_step_fn` on
``(graphdef, state, batch)``) does, for a batch split into ``K`` micro-batches:

1. for each micro-batch, the gradient of the objective's *numerator* (a sum) and its
   *denominator* (:mod:`jaxnll.train.objectives`);
2. adds numerators, denominators and gradients over the micro-batches (and, through the
   sharded batch axis, over devices) and divides once:

   .. math::

      \\nabla L = \\frac{\\sum_k \\nabla N_k}{\\sum_k D_k}, \\qquad
      L = \\frac{\\sum_k N_k}{\\sum_k D_k},

   which is the full-batch global token mean whatever each micro-batch's token count (2
   target tokens at NLL 1 and 8 at NLL 3 give 2.6, not the 2.0 of averaging the averages);
3. skips the update — parameters and optimizer state unchanged, a counter incremented — when
   any gradient is not finite; otherwise applies AdamW with warm-up + cosine decay and global
   norm clipping (:func:`make_optimizer`).

Batches are the fixed-shape dicts of :mod:`jaxnll.train.data` with a leading micro-batch axis
``[K, B/K, ...]`` (:func:`micro_batches`); the run loop places them and the state on its mesh
(:mod:`jaxnll.train.runtime`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxnll._core import safe_divide
from jaxnll.train.objectives import SFT, Objective

Batch = dict[str, Any]
#: The default objective: the sub-sequence NLL from logits.
SUBSEQUENCE = SFT()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loss mode and optimizer settings (JSON-friendly, hashable).

  Attributes:
    loss: ``"subsequence"``, ``"selective"`` or ``"full"`` (module docstring).
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warm-up from 0; then cosine decay to ``end_lr_fraction`` of the peak
      at the run's last step.
    weight_decay: AdamW decoupled weight decay (matrices only, not norms or biases).
    clip_norm: global gradient-norm clip.
    accum: micro-batches per step (gradient accumulation).
    fused: fused head + loss (:func:`jaxnll.fused.linear_nll_loss`); subsequence or full only.
  """

  loss: str = "subsequence"
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.98
  accum: int = 1
  fused: bool = False

  def __post_init__(self):
    self.objective()  # checks loss and fused
    if not isinstance(self.accum, int) or isinstance(self.accum, bool) or self.accum < 1:
      raise ValueError(f"accum must be a positive int, got {self.accum!r}")
    if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < math.inf):
      raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate!r}")

  def objective(self) -> SFT:
    """The supervised objective these settings select."""
    return SFT(self.loss, self.fused)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, cosine decay to ``end_lr_fraction`` at ``total_steps``."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    warmup,
    max(total_steps, warmup + 1),
    end_value=config.learning_rate * config.end_lr_fraction,
  )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the warm-up + cosine schedule."""
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(
      make_schedule(config, total_steps),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=_decay_mask,
    ),
  )


class SkipCount(nnx.Variable):
  """Number of steps skipped because a gradient was not finite."""


class Trainer(nnx.Module):
  """The training state: model, optimizer (over :class:`flax.nnx.Param`) and skip counter."""

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
    self.model = model
    self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.skipped = SkipCount(jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- the step


def accumulate_gradients(model: nnx.Module, batch: Batch, objective: Objective):
  """Summed numerator gradients and aux totals over the micro-batch axis of ``batch``.

  Returns:
    ``(grads, totals, per_sample)``: the gradient of ``Σ_k N_k`` (a ``Param`` state, not yet
    divided), the scalar aux entries of ``objective`` summed over micro-batches, and the
    dict of its ``sample_*`` entries ``[B, S]`` in the order of the un-split batch.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def micro(params, mb):
    numerator, aux = objective(nnx.merge(graphdef, params, rest), mb)
    aux.setdefault("loss_sum", jax.lax.stop_gradient(numerator))
    return numerator, aux

  grad_fn = jax.grad(micro, has_aux=True)

  def one(mb):
    grads, aux = grad_fn(params, mb)
    per = {k: aux.pop(k) for k in [k for k in aux if k.startswith("sample_")]}
    return (grads, aux), per

  def body(acc, mb):
    new, per = one(mb)
    return jax.tree.map(jnp.add, acc, new), per

  acc, per = one(jax.tree.map(lambda x: x[0], batch))
  per = jax.tree.map(lambda x: x[None], per)
  if jax.tree.leaves(batch)[0].shape[0] > 1:
    acc, more = jax.lax.scan(body, acc, jax.tree.map(lambda x: x[1:], batch))
    per = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), per, more)
  per = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), per)
  grads, totals = acc
  return grads, totals, per


def ratio(num, den):
  """``num / den``, 0 where ``den`` is 0 (:func:`jaxnll._core.safe_divide`)."""
  return safe_divide(num, den)


def step_metrics(
  totals: dict[str, jax.Array], means: Mapping[str, str] = Objective.means
) -> dict[str, jax.Array]:
  """Logged scalars from summed aux totals (the rules of :mod:`jaxnll.train.objectives`):
  ``loss``, each of ``means`` (``{logged name: X}``: ``Σ X_sum / Σ X_count``, where the
  objective reported ``X_sum``) and every other total as it is."""
  out = {"loss": ratio(totals["loss_sum"], totals["denominator"])}
  averaged = set()
  for name, x in means.items():
    if f"{x}_sum" in totals:
      out[name] = ratio(totals[f"{x}_sum"], totals[f"{x}_count"])
      averaged.add(f"{x}_sum")
  for key, value in totals.items():
    if key not in ("denominator", "loss_sum", *averaged):
      out[key] = value
  return out


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step_fn(graphdef, state, batch: Batch, *, objective: Objective = SUBSEQUENCE):
  """One optimizer step as a pure function of ``(graphdef, state, batch)``.

  Args:
    graphdef, state: ``nnx.split(trainer)`` of a :class:`Trainer`.
    batch: data dict with leaves ``[K, B/K, ...]`` (:func:`micro_batches`).
    objective: what is trained (:mod:`jaxnll.train.objectives`; default: the sub-sequence
      NLL from logits).

  Returns:
    ``(new_state, metrics)``: ``metrics`` holds float32 scalars ``loss`` (the trained
    objective), every mean and total the objective reports (:func:`step_metrics`),
    ``grad_norm``, ``finite`` (bool: the update was applied), and the per-sample
    ``sample_*`` arrays ``[B, S]``.  When a gradient is not finite the state is returned
    unchanged except for the skip counter.
  """
  trainer = nnx.merge(graphdef, state, copy=True)
  grads, totals, per_sample = accumulate_gradients(trainer.model, batch, objective)
  den = totals["denominator"]
  grads = jax.tree.map(lambda g: g / jnp.where(den > 0, den, 1.0), grads)
  finite = _all_finite(grads)

  def apply(state):
    t = nnx.merge(graphdef, state, copy=True)
    t.optimizer.update(t.model, grads)
    return nnx.state(t)

  def skip(state):
    t = nnx.merge(graphdef, state, copy=True)
    t.skipped[...] = t.skipped[...] + 1
    return nnx.state(t)

  new_state = jax.lax.cond(finite, apply, skip, state)
  metrics = {
    **step_metrics(totals, objective.means),
    "grad_norm": optax.tree.norm(grads),
    "finite": finite,
    **per_sample,
  }
  return new_state, metrics


@functools.partial(nnx.jit, static_argnames=("objective",), donate_argnames=("trainer",))
def train_step(trainer: Trainer, batch: Batch, *, objective: Objective = SUBSEQUENCE):
  """One jitted, donated training step on a :class:`Trainer` (updated in place).

  A thin ``nnx.jit`` wrapper of :func:`train_step_fn`; returns its ``metrics``.
  """
  graphdef, state = nnx.split(trainer)
  state, metrics = train_step_fn(graphdef, state, batch, objective=objective)
  nnx.update(trainer, state)
  return metrics


@functools.partial(nnx.jit, static_argnames=("fused",))
def eval_step(model: nnx.Module, batch: Batch, *, fused: bool = False):
  """Per-sample target NLL sums and token counts ``[B, S]`` of a (non-micro-batched) batch."""
  _, aux = SFT("subsequence", fused)(model, batch)
  return aux["sample_sums"], aux["sample_counts"]


def export_train_step(
  graphdef,
  state,
  batch: Batch,
  *,
  platforms=("cpu", "cuda", "tpu"),
  objective: Objective = SUBSEQUENCE,
) -> jax.export.Exported:
  """Serialisable :func:`train_step_fn` for ``platforms`` (lowered here, run anywhere).

  The exported function takes and returns the state as its flat list of leaves
  (``jax.tree.leaves(state)``, so no custom pytree needs registering) next to the batch.
  """
  leaves, treedef = jax.tree.flatten(state)

  def step(leaves, batch):
    new_state, metrics = train_step_fn(
      graphdef, jax.tree.unflatten(treedef, leaves), batch, objective=objective
    )
    return jax.tree.leaves(new_state), metrics

  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  return jax.export.export(jax.jit(step), platforms=platforms)(
    jax.tree.map(spec, leaves), jax.tree.map(spec, batch)
  )


def micro_batches(batch: Batch, accum: int) -> Batch:
  """``[B, ...]`` host arrays to ``[accum, B / accum, ...]`` (consecutive rows together)."""
  return {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}
