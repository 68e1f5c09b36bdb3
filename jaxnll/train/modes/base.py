"""What every training mode is: :class:`Mode`, the object a mode module defines once.

A mode carries its command-line flags and the defaults a run of it takes where the command
line gives none (user flags always win), the section of :class:`~jaxnll.train.run.RunConfig`
holding its settings, the run configuration it builds (:meth:`Mode.configure`), its
examples and task (objective, batches, records, held-out figures, plots and the run it
starts from: :meth:`Mode.task`) and the files it writes into a run directory.  The table of
modes is :data:`jaxnll.train.modes.MODES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jaxnll.train.objectives import Task
from jaxnll.train.run import RunConfig, load_examples, load_run


def given_options(args: argparse.Namespace, names: Sequence[str], *, enabled: bool, needs: str):
  """The options ``names`` of a mode that the command line set (not ``None``).

  Raises:
    ValueError: some are set but the mode is off (``enabled`` false), naming the flags and
      ``needs``, what turns the mode on.
  """
  given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
  if given and not enabled:
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    raise ValueError(f"{flags} need {needs}")
  return given


@dataclasses.dataclass(frozen=True)
class Mode:
  """A training mode (plain fine-tuning is :data:`jaxnll.train.modes.sft.MODE`).

  Attributes:
    name: the key of :data:`jaxnll.train.modes.MODES`.
    section: the :class:`~jaxnll.train.run.RunConfig` field holding its settings (a dict),
      set exactly in its runs; None for plain fine-tuning (the fallback of every lookup).
    losses: the ``--loss`` values that select it.
    files: the files it writes into a run directory besides the loop's (``--overwrite``
      removes them).
    defaults: ``RunConfig`` values of its runs where the command line gives none:
      ``steps``, ``learning_rate``, ``warmup_steps``.
    saved: its flags that ``--resume`` compares with the saved run: ``{flag dest: key}`` in
      its section (paths compared resolved: :attr:`paths`).
    paths: the flags of :attr:`saved` that name a directory.
  """

  name: str
  section: str | None = None
  losses: tuple[str, ...] = ()
  files: tuple[str, ...] = ()
  defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
  saved: dict[str, str] = dataclasses.field(default_factory=dict)
  paths: tuple[str, ...] = ()

  # ------------------------------------------------------------------------- command line

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    """Adds its own ``jaxnll train`` options (the common ones are the table's)."""

  def selected(self, args: argparse.Namespace) -> bool:
    """Whether the command line asks for this mode."""
    return args.loss in self.losses

  def settings(self, args: argparse.Namespace) -> dict[str, Any] | None:
    """Its ``RunConfig`` section from parsed arguments; None when not selected.

    Raises:
      ValueError: one of its flags is given but the mode is not selected, or a setting is
        out of its domain (one line naming the flag).
    """
    del args
    return None

  def configure(
    self, config: RunConfig, settings: dict[str, Any] | None, out_dir: str
  ) -> RunConfig:
    """The run configuration of a new run into ``out_dir``: ``config`` (the common flags,
    with the mode's :attr:`defaults` where the command line gave none) with its
    ``settings``; writes nothing."""
    del out_dir
    if self.section is None:
      return config
    return dataclasses.replace(config, **{self.section: settings})

  def saved_value(self, config: RunConfig, dest: str):
    """The saved value of the flag ``dest`` in a run of this mode (None: not one of its
    flags)."""
    key = self.saved.get(dest)
    if key is None or self.section is None:
      return None
    value = (getattr(config, self.section) or {}).get(key)
    return os.path.realpath(value) if dest in self.paths and value is not None else value

  def loss(self, config: RunConfig) -> str:
    """The ``--loss`` a run of this mode was started with."""
    return config.train.loss

  def data(self, config: RunConfig) -> str | None:
    """The ``--data`` a run of this mode was started with."""
    return config.data

  # ------------------------------------------------------------------------- the run

  def examples(self, config: RunConfig):
    """The run's ``(train, held-out)`` examples (:func:`jaxnll.train.run.load_examples`)."""
    return load_examples(config.data)

  def task(
    self, config: RunConfig, train_examples, out_dir: str, *, log: Callable[[str], None] = print
  ) -> Task:
    """The :class:`~jaxnll.train.objectives.Task` of a run of this mode."""
    raise NotImplementedError


def start_model(run_dir: str, like: RunConfig, *, flag: str = "--init"):
  """The model of the trained run ``run_dir`` a run of configuration ``like`` starts from
  (:func:`jaxnll.train.run.load_run`), and its step.

  Raises:
    ValueError: its model configuration differs from ``like``'s.
  """
  model, config, step = load_run(run_dir, flag=flag)
  if config.model != like.model:
    raise ValueError(f"{flag} run's model {config.model} differs from this run's {like.model}")
  return model, step


def copy_params(source, model) -> None:
  """Sets ``model``'s parameters to copies of ``source``'s (same architecture): copies, since
  the train step donates the buffers of the model it trains, and ``source`` may live on (the
  frozen reference of a preference or RL run)."""
  params = nnx.state(source, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x.copy(), params))
