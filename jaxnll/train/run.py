"""The run directory of ``jaxnll train``: its configuration, examples and checkpoints.

A run directory holds ``config.json`` (:class:`RunConfig`, everything the run depends on),
``metrics.jsonl``, ``loss.png``, ``summary.json`` and ``checkpoints/`` (orbax), and nothing
else of jaxnll's (:data:`RUN_FILES`). :func:`check_run_dir` decides whether a directory may
receive a run: jaxnll never deletes or overwrites a file it did not write.

Files are written atomically (:func:`jaxnll.train.metrics.write_atomic`: a temporary file in
the same directory, then :func:`os.replace`), so a run killed at any moment leaves the old or
the new file, never half of one. Orbax checkpoints are atomic too: a step is written into
``checkpoints/<step>.orbax-checkpoint-tmp-*`` and renamed to ``checkpoints/<step>`` once
complete; an unfinished one is never read back (``tests/test_faults.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any, NamedTuple

from flax import nnx

from jaxnll.train import data as data_lib
from jaxnll.train import metrics as metrics_lib
from jaxnll.train.model import ModelConfig, make_model
from jaxnll.train.step import TrainConfig, Trainer, make_optimizer

#: The files and folders the run loop writes into every run directory. ``--overwrite`` removes
#: these and the files of every training mode (:data:`jaxnll.train.modes.RUN_FILES`), nothing
#: else.
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "summary.json", "checkpoints")


class ConfigError(ValueError):
  """A ``config.json`` that cannot be read back; the message names the file."""


class CheckpointError(ValueError):
  """A checkpoint that is missing or cannot be restored; the message names it."""


class RunDirError(ValueError):
  """An ``--out`` directory that may not receive a run (one line, naming it)."""


def _check_int(name: str, value, low: int, *, none: bool = False) -> None:
  if value is None and none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


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
  """Teacher distillation (:class:`jaxnll.train.modes.distill.DistillConfig` as a dict), or None."""
  preference: dict[str, Any] | None = None
  """Preference training (:class:`jaxnll.train.modes.preference.PreferenceConfig` as a dict),
  or None."""
  policy: dict[str, Any] | None = None
  """RL from verifiable rewards (:class:`jaxnll.train.modes.policy.PolicyConfig` as a dict),
  or None."""
  schedule_steps: int | None = None
  """Length of the learning-rate schedule (None: ``steps``). Fixed when the run starts:
  ``--resume --steps M`` past it keeps the schedule, so the extra steps run at the final
  learning rate (the schedule's end value)."""

  def __post_init__(self):
    _check_int("steps", self.steps, 1)
    _check_int("seed", self.seed, 0)
    _check_int("eval_every", self.eval_every, 0)
    _check_int("checkpoint_every", self.checkpoint_every, 0)
    _check_int("table_rows", self.table_rows, 0)
    _check_int("schedule_steps", self.schedule_steps, 1, none=True)

  @property
  def total_schedule_steps(self) -> int:
    """The steps the learning-rate schedule spans (``schedule_steps``, else ``steps``)."""
    return self.steps if self.schedule_steps is None else self.schedule_steps

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunConfig:
    """The configuration of a dict (unknown keys are an error naming them)."""
    if not isinstance(d, dict):
      raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    d = dict(d)
    _known_keys(cls, d, "the configuration")
    for key, kind in (
      ("model", ModelConfig),
      ("train", TrainConfig),
      ("batch", data_lib.BatchSpec),
    ):
      if key in d:
        if not isinstance(d[key], dict):
          raise ValueError(f"{key!r} must be an object, got {type(d[key]).__name__}")
        _known_keys(kind, d[key], repr(key))
        d[key] = kind(**d[key])
    return cls(**d)


def _known_keys(kind, d: dict, where: str) -> None:
  known = [f.name for f in dataclasses.fields(kind)]
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; known: {', '.join(known)}")


def read_config(path: str) -> RunConfig:
  """The :class:`RunConfig` saved at ``path``; :class:`ConfigError` naming the file."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such file (not a jaxnll run directory?)")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    return RunConfig.from_dict(json.loads(text))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg}; truncated?)") from None
  except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
    raise ConfigError(f"{path}: {e}") from None


#: The fields a resumed run may change (applied, and logged): its length, and how often it
#: evaluates, checkpoints and how many samples its final table decodes. Every other field of
#: a resumed run is the saved one (``schedule_steps`` included: fixed when the run starts).
RESUME_CHANGEABLE = ("steps", "eval_every", "checkpoint_every", "table_rows")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k in ("model", "train", "batch"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resumed_config(saved: RunConfig, config: RunConfig, *, where: str) -> RunConfig:
  """The configuration a resumed run continues with: ``saved`` with the
  :data:`RESUME_CHANGEABLE` fields of ``config``.

  Raises:
    RunDirError: another field of ``config`` differs from ``saved`` (naming the first one and
      ``where`` it is saved); a resume continues the saved run, it does not change it.
  """
  old, new = _flat(saved.to_dict()), _flat(config.to_dict())
  for name, value in new.items():
    if name in RESUME_CHANGEABLE or name == "schedule_steps" or value == old.get(name):
      continue
    raise RunDirError(
      f"--resume: {name} is {value!r} but the run in {where} has {old.get(name)!r}; a resumed "
      "run keeps its configuration (start a new run to change it)"
    )
  return dataclasses.replace(saved, **{k: getattr(config, k) for k in RESUME_CHANGEABLE})


def write_config(path: str, config: RunConfig) -> None:
  metrics_lib.write_atomic(path, json.dumps(config.to_dict(), indent=2))


# ----------------------------------------------------------------------------- run directory


def check_run_dir(out_dir: str, *, resume: bool, overwrite: bool) -> RunConfig | None:
  """Whether ``out_dir`` may receive a run; the saved configuration when resuming.

  A missing or empty directory takes a new run; a jaxnll run (its ``config.json`` is one a
  run wrote: :func:`_not_a_run_config`) is continued with ``resume``, replaced with
  ``overwrite`` (then only its :data:`RUN_FILES` are removed, by :func:`clear_run_files`) and
  refused otherwise; anything else is refused.
  Read-only: every process may call it.

  Raises:
    RunDirError: naming the directory and what to do instead.
    ConfigError: ``resume`` and the saved ``config.json`` cannot be read.
  """
  if resume and overwrite:
    raise RunDirError("--resume and --overwrite exclude each other")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise RunDirError(f"--out {out_dir} is a file, not a directory")
  config_path = os.path.join(out_dir, "config.json")
  if resume:
    if not os.path.isdir(out_dir):
      raise RunDirError(f"--out {out_dir}: no run to resume (no such directory, no config.json)")
    return read_config(config_path)
  if not os.path.isdir(out_dir) or not os.listdir(out_dir):
    return None
  if not os.path.isfile(config_path):
    raise RunDirError(
      f"--out {out_dir} is not empty and is not a jaxnll run (no config.json): "
      "nothing there is touched; choose a new or empty directory"
    )
  why = _not_a_run_config(config_path)
  if why:
    raise RunDirError(
      f"--out {out_dir} is not empty and is not a jaxnll run ({why}): nothing there is "
      "touched, with or without --overwrite; choose a new or empty directory"
    )
  if not overwrite:
    raise RunDirError(
      f"--out {out_dir} holds a jaxnll run: pass --resume to continue it or --overwrite to "
      "replace it (only the run's own files are removed)"
    )
  return None


#: The keys every jaxnll run's ``config.json`` has held (with these objects inside).
RUN_CONFIG_KEYS = {"model": ("kind", "vocab_size"), "train": ("loss",), "batch": ("rows", "length")}


def _not_a_run_config(path: str) -> str | None:
  """Why the ``config.json`` at ``path`` is not one a jaxnll run wrote, or None if it is: it
  must read back as a :class:`RunConfig` (no unknown key, every value in its domain) and
  hold the keys every run writes (:data:`RUN_CONFIG_KEYS`, ``steps``, ``seed``), so that
  another program's ``config.json`` (a Hugging Face model's, say) is never taken for one."""
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    return f"its config.json cannot be read: {type(e).__name__}"
  if not isinstance(d, dict):
    return f"its config.json holds a JSON {type(d).__name__}, not an object"
  missing = [k for k in (*RUN_CONFIG_KEYS, "steps", "seed") if k not in d]
  missing += [
    f"{k}.{f}"
    for k, fields in RUN_CONFIG_KEYS.items()
    if k not in missing
    for f in fields
    if not isinstance(d[k], dict) or f not in d[k]
  ]
  if missing:
    return f"its config.json has no {', '.join(missing)}"
  try:
    RunConfig.from_dict(d)
  except (ValueError, TypeError) as e:
    return f"its config.json is not a jaxnll run configuration: {' '.join(str(e).split())[:160]}"
  return None


def clear_run_files(out_dir: str, names: Sequence[str] = RUN_FILES) -> None:
  """Removes the run files ``names`` (default :data:`RUN_FILES`) of the run in ``out_dir``
  (nothing else)."""
  for name in names:
    path = os.path.join(out_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def load_examples(path: str | None):
  """``(train, heldout)`` examples: the embedded set, or a JSONL file split 9:1.

  Raises:
    DataError: the file is malformed, or too small to hold out a tenth of it (fewer than 10
      records).
  """
  if path is None:
    return data_lib.embedded_examples("train"), data_lib.embedded_examples("heldout")
  examples = data_lib.load_jsonl(path)
  if len(examples) < 10:
    raise data_lib.DataError(
      f"{path}: {len(examples)} record(s); every tenth record is held out for evaluation, "
      "so at least 10 are needed"
    )
  return data_lib.split_examples(examples, "train"), data_lib.split_examples(examples, "heldout")


# ----------------------------------------------------------------------------- checkpoints


def checkpointer(directory: str, *, cleanup: bool = False):
  """An orbax manager of the run's ``checkpoints/`` (the two newest kept). ``cleanup``: remove
  what an interrupted save left (``<step>.orbax-checkpoint-tmp*``, never read back); only the
  run that writes there may ask for it."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=2, create=True, cleanup_tmp_directories=cleanup
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def checkpoint_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints under ``directory``, oldest first (read from the
  file system: orbax renames a checkpoint to its step number only once it is complete)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def restore_state(directory: str, abstract_state, step: int | None = None):
  """The latest (or ``step``'s) checkpointed state under ``directory``; ``(step, state)``.

  Raises:
    CheckpointError: no checkpoint, or one that cannot be read (one line naming it).
  """
  import orbax.checkpoint as ocp

  with checkpointer(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{directory}: no checkpoint to resume from")
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax / tensorstore raise many kinds; all mean "unreadable"
      cause = _cause(e)
      raise CheckpointError(
        f"{os.path.join(directory, str(step))}: cannot restore the checkpoint"
        + (f" ({cause})" if cause else "")
        + "; it is damaged or from another model"
      ) from None
  return step, state


def _cause(error: Exception) -> str:
  """A short readable cause of a failed restore: the first part of its message, without the
  bound-method and object reprs that TensorStore's messages carry."""
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  text = re.sub(r"<[^<>]*(>|$)", "", text).strip(" .,:;(")[:160]
  if not text:
    return ""
  name = type(error).__name__
  return text if name == "Exception" else f"{name}: {text}"


def build_trainer(config: RunConfig) -> Trainer:
  """A fresh trainer of ``config``: a new model (from ``config.seed``) and optimizer."""
  return Trainer(
    make_model(config.model, seed=config.seed),
    make_optimizer(config.train, config.total_schedule_steps),
  )


class LoadedRun(NamedTuple):
  """A trained run read back by :func:`load_run`."""

  model: Any
  """Its model at the latest checkpoint (None when only the configuration was asked for)."""
  config: RunConfig
  step: int | None
  """The step of that checkpoint."""


def load_run(run_dir: str, *, flag: str = "--init", weights: bool = True) -> LoadedRun:
  """The trained run in ``run_dir``: its configuration and (``weights``) the model of its
  latest checkpoint.  The one way a mode starts from, or is taught by, another run.

  Raises:
    FileNotFoundError: ``run_dir`` holds no ``config.json`` (naming ``flag``, the option that
      gave the directory).
    ConfigError, CheckpointError: the configuration or the checkpoint cannot be read.
  """
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{flag} {run_dir}: no config.json there (a run directory written by `jaxnll train`)"
    )
  config = read_config(path)
  if not weights:
    return LoadedRun(None, config, None)
  graphdef, state = nnx.split(build_trainer(config))
  step, state = restore_state(os.path.join(run_dir, "checkpoints"), state)
  return LoadedRun(nnx.merge(graphdef, state).model, config, step)
