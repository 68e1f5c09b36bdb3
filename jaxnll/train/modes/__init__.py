"""The training modes of ``jaxnll train``, one module each, in one table (:data:`MODES`).

* :mod:`~jaxnll.train.modes.sft` — supervised fine-tuning: sub-sequence, selective, full;
* :mod:`~jaxnll.train.modes.distill` — a student trained from a teacher run (``--teacher``);
* :mod:`~jaxnll.train.modes.preference` — DPO / IPO / SimPO / ORPO of a trained run;
* :mod:`~jaxnll.train.modes.policy` — RL from verifiable rewards (GRPO) of a trained run.

Each module defines one :class:`~jaxnll.train.modes.base.Mode` (``MODE``): its flags and
defaults, the section of the run configuration it fills, its examples and task (objective,
records, held-out figures, plots, the run it starts from) and its run files.  A new mode is
one new module and one row of :data:`MODES`; the command line (:mod:`jaxnll.cli`), the run
loop (:func:`jaxnll.train.loop.fit`, which imports no mode) and ``--resume`` read it from
here.  The flags a user gives always win over a mode's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from jaxnll.train import loop
from jaxnll.train import run as run_lib
from jaxnll.train.model import default_config
from jaxnll.train.modes import distill, policy, preference, sft
from jaxnll.train.modes.base import Mode
from jaxnll.train.run import RunConfig

#: Every training mode by name; plain fine-tuning (the mode without a configuration section)
#: is the one a run of no other mode is.
MODES: dict[str, Mode] = {m.name: m for m in (sft.MODE, distill.MODE, preference.MODE, policy.MODE)}

#: The files ``--overwrite`` removes from a run directory: the loop's and every mode's.
RUN_FILES = (*run_lib.RUN_FILES, *(f for m in MODES.values() for f in m.files))

#: The modes that start from a trained run given by ``--init``.
_FROM_RUN = [m for m in MODES.values() if "init" in m.saved]


def mode_of(config: RunConfig) -> Mode:
  """The mode a run configuration belongs to (the one whose section it sets)."""
  for mode in MODES.values():
    if mode.section is not None and getattr(config, mode.section) is not None:
      return mode
  return MODES["sft"]


def fit(config: RunConfig, out_dir: str, **kwargs) -> dict[str, Any]:
  """:func:`jaxnll.train.loop.fit` with the task of ``config``'s mode (:func:`mode_of`)."""
  return loop.fit(config, out_dir, task=mode_of(config), run_files=RUN_FILES, **kwargs)


# ----------------------------------------------------------------------------- new runs


def configure(
  mode: Mode,
  base: RunConfig,
  settings: dict[str, Any] | None,
  out_dir: str,
  *,
  steps: int | None = None,
  learning_rate: float | None = None,
) -> RunConfig:
  """The configuration of a new run of ``mode`` into ``out_dir``: ``base`` with the mode's
  defaults and its ``settings``. ``steps`` / ``learning_rate`` (None: not given) always win
  over the mode's defaults, even where equal to the SFT ones."""
  d = mode.defaults
  train = dataclasses.replace(
    base.train,
    learning_rate=d.get("learning_rate", base.train.learning_rate)
    if learning_rate is None
    else learning_rate,
    warmup_steps=d.get("warmup_steps", base.train.warmup_steps),
  )
  steps = d.get("steps", base.steps) if steps is None else steps
  config = dataclasses.replace(base, train=train, steps=steps)
  return mode.configure(config, settings, out_dir)


def from_args(args: argparse.Namespace) -> RunConfig:
  """The configuration of a new ``jaxnll train`` run from parsed arguments.

  Raises:
    ValueError: a mode's flag without its mode, two modes at once, ``--init`` without a mode
      that starts from a run, a setting out of its domain (one line naming the flag).
  """
  settings = {name: mode.settings(args) for name, mode in MODES.items()}
  chosen = [MODES[name] for name, s in settings.items() if s is not None]
  if len(chosen) > 1:
    names = " and ".join(m.name for m in chosen)
    raise ValueError(f"the {names} modes do not combine: one training mode a run")
  mode = chosen[0] if chosen else mode_of(RunConfig())  # plain fine-tuning
  if args.init is not None and mode not in _FROM_RUN:
    losses = "|".join(loss for m in _FROM_RUN for loss in m.losses)
    raise ValueError(f"--init needs --loss {losses}")
  sizes = {"d_model": args.d_model, "num_layers": args.layers}
  sizes = {k: v for k, v in sizes.items() if v is not None}
  if "d_model" in sizes and args.model == "transformer":
    sizes["d_ff"] = 3 * sizes["d_model"]
  d = RunConfig()
  base = dataclasses.replace(
    d,
    model=default_config(args.model, context_gradient=args.context_gradient, **sizes),
    train=dataclasses.replace(
      d.train,
      loss=args.loss if args.loss in sft.MODE.losses else d.train.loss,
      accum=args.accum,
      fused=args.fused,
    ),
    batch=dataclasses.replace(d.batch, rows=args.batch_size, pack=args.pack),
    seed=args.seed,
    data=args.data,
    eval_every=args.eval_every,
    table_rows=args.table_rows,
  )
  return configure(
    mode, base, settings[mode.name], args.out, steps=args.steps, learning_rate=args.lr
  )


# ----------------------------------------------------------------------------- --resume


def _path(value) -> str | None:
  return None if value is None else os.path.realpath(value)


def _saved(dest: str):
  return lambda c: mode_of(c).saved_value(c, dest)


#: How ``jaxnll train --resume`` reads each flag that sets a saved field: ``dest: (the saved
#: value, the flag's value as saved)``. A given flag whose value differs is refused.
RESUME_FIXED: dict[str, tuple[Callable, Callable | None]] = {
  "data": (lambda c: _path(mode_of(c).data(c)), _path),
  "loss": (lambda c: mode_of(c).loss(c), None),
  "pack": (lambda c: c.batch.pack, None),
  "accum": (lambda c: c.train.accum, None),
  "fused": (lambda c: c.train.fused, None),
  "seed": (lambda c: c.seed, None),
  "model": (lambda c: c.model.kind, None),
  "d_model": (lambda c: c.model.d_model, None),
  "layers": (lambda c: c.model.num_layers, None),
  "batch_size": (lambda c: c.batch.rows, None),
  "lr": (lambda c: c.train.learning_rate, None),
  "context_gradient": (lambda c: c.model.context_gradient, None),
  **{
    dest: (_saved(dest), _path if dest in m.paths else None)
    for m in MODES.values()
    for dest in m.saved
  },
}
#: Flags ``--resume`` applies (logged): the run's length and its reporting.
RESUME_CHANGEABLE = {"steps": "steps", "eval_every": "eval_every", "table_rows": "table_rows"}
#: Flags that are not part of the saved run: where and how it runs.
NOT_SAVED = {"out", "resume", "overwrite", "no_progress", "mesh"}
NOT_SAVED |= {"coordinator", "num_processes", "process_id", "distributed"}


def resumed(args: argparse.Namespace, given: set[str]) -> RunConfig:
  """``--resume``: the saved configuration, with ``--steps`` / ``--eval-every`` /
  ``--table-rows`` where ``given`` (the flags written on the command line); any other given
  flag must equal the saved value (one-line ``RunDirError`` naming it otherwise), before
  anything is built."""
  saved = run_lib.check_run_dir(args.out, resume=True, overwrite=args.overwrite)
  where = os.path.join(args.out, "config.json")
  for dest in sorted(given):
    if dest in NOT_SAVED or dest in RESUME_CHANGEABLE:
      continue
    flag = "--" + dest.replace("_", "-")
    if dest not in RESUME_FIXED:
      raise run_lib.RunDirError(
        f"--resume: {flag} cannot be set on a resumed run (it keeps the configuration in "
        f"{where}); leave {flag} out, or start a new run"
      )
    saved_value, as_saved = RESUME_FIXED[dest]
    value = getattr(args, dest)
    value = as_saved(value) if as_saved else value
    if value != saved_value(saved):
      was = "unset" if saved_value(saved) is None else saved_value(saved)
      raise run_lib.RunDirError(
        f"--resume: {flag} {getattr(args, dest)} differs from the run's {was} ({where}); a "
        f"resumed run keeps its configuration: leave {flag} out, or start a new run "
        "(another --out, or --overwrite)"
      )
  changed = {
    field: getattr(args, dest)
    for dest, field in RESUME_CHANGEABLE.items()
    if getattr(args, dest) is not None and dest in given
  }
  return dataclasses.replace(saved, **changed)


# ----------------------------------------------------------------------------- command line

#: The ``--loss`` values, every mode's, in table order.
LOSSES = tuple(loss for m in MODES.values() for loss in m.losses)


def defaults_text(key: str) -> str:
  """The modes' own defaults of the ``RunConfig`` value ``key`` (``steps``,
  ``learning_rate``), for a flag's help: ``"dpo|ipo|simpo|orpo: 60; grpo: 40"``."""
  return "; ".join(
    f"{'|'.join(m.losses) or m.name}: {m.defaults[key]:g}"
    for m in MODES.values()
    if key in m.defaults
  )


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Each mode's own ``jaxnll train`` options (the common ones are the command line's)."""
  for mode in MODES.values():
    mode.add_arguments(parser)
