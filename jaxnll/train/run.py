"""The run directory of ``jaxnll train``: its configuration, examples and checkpoints.

A run directory holds ``config.json`` (:class:`RunConfig`, everything the run depends on),
``metrics.jsonl``, ``loss.png``, ``summary.json`` and ``checkpoints/`` (orbax).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jaxnll.train import data as data_lib
from jaxnll.train.model import ModelConfig, make_model
from jaxnll.train.step import TrainConfig, Trainer, make_optimizer


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run depends on; saved as ``config.json`` and read back by ``--resume``."""

  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  batch: data_lib.BatchSpec = data_lib.BatchSpec()
  steps: int = 400
  seed: int = 0
  data: str | None = None
  eval_every: int = 100
  checkpoint_every: int = 200
  table_rows: int = 8
  distill: dict[str, Any] | None = None
  """Teacher distillation (:class:`jaxnll.train.teacher.DistillConfig` as a dict), or None."""
  policy: dict[str, Any] | None = None
  """RL from verifiable rewards (:class:`jaxnll.train.policy.PolicyConfig` as a dict), or None."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunConfig:
    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    d["train"] = TrainConfig(**d["train"])
    d["batch"] = data_lib.BatchSpec(**d["batch"])
    return cls(**d)


def load_examples(path: str | None):
  """``(train, heldout)`` examples: the embedded set, or a JSONL file split 9:1."""
  if path is None:
    return data_lib.embedded_examples("train"), data_lib.embedded_examples("heldout")
  examples = data_lib.load_jsonl(path)
  if len(examples) < 2:
    return examples, examples
  return data_lib.split_examples(examples, "train"), data_lib.split_examples(examples, "heldout")


def checkpointer(directory: str):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_state(directory: str, abstract_state, step: int | None = None):
  """The latest (or ``step``'s) checkpointed state under ``directory``; ``(step, state)``."""
  import orbax.checkpoint as ocp

  with checkpointer(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint to resume from")
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return step, state


def build_trainer(config: RunConfig) -> Trainer:
  model = make_model(config.model, seed=config.seed)
  if config.policy is not None:  # RL starts from the parameters of a trained run
    from jaxnll.train.policy import init_model

    init_model(model, config.policy)
  return Trainer(model, make_optimizer(config.train, config.steps))
