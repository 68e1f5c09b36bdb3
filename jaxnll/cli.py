"""``jaxnll`` command line: ``train``, ``eval`` and ``bench`` (thin: parse, then call the module).

Each subcommand registers itself in :data:`SUBCOMMANDS` with a function that adds its
arguments to a sub-parser and a function that runs it; a new subcommand (``bench``) is one
more entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence

from jaxnll.argtypes import (
  nonnegative_int,
  output_dir,
  output_file,
  positive_float,
  positive_int,
)


def mesh_axes(text: str) -> str:
  """A device mesh ``"data=4,model=2"`` over the axes training knows (``data``, ``model``)."""
  from jaxnll import parallel

  try:
    axes = parallel.parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  valid = (parallel.DATA, parallel.MODEL)
  unknown = [a for a in axes if a not in valid]
  if unknown:
    raise argparse.ArgumentTypeError(
      f"unknown mesh axis {unknown[0]!r} in {text!r}; valid axes: {', '.join(valid)}"
    )
  return text


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse`` parser whose errors are one line on stderr (exit status 2)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- subcommands


def _add_train(p: argparse.ArgumentParser) -> None:
  from jaxnll.train.model import KINDS
  from jaxnll.train.objectives import LOSS_MODES
  from jaxnll.train.policy import add_arguments as add_policy_arguments
  from jaxnll.train.preference import CLI_KINDS
  from jaxnll.train.preference import add_arguments as add_preference_arguments
  from jaxnll.train.run import RunConfig
  from jaxnll.train.teacher import add_arguments as add_distill_arguments

  d = RunConfig()
  p.add_argument("--data", help="JSONL file of prompt/response or chat records (default: embedded)")
  p.add_argument(
    "--out",
    type=output_dir,
    default="runs/demo",
    help="run directory: new, empty, or a run with --resume / --overwrite; anything else is "
    "refused, nothing is deleted (default: %(default)s)",
  )
  p.add_argument(
    "--steps",
    type=positive_int,
    help=f"total steps (default: {d.steps}; preference losses: 60). The learning-rate "
    "schedule (warm-up, cosine decay) spans the --steps of the run's start, saved as "
    "schedule_steps in config.json; "
    "--resume --steps M past it keeps that schedule, so the extra steps run at the final "
    "learning rate",
  )
  p.add_argument(
    "--loss",
    choices=(*LOSS_MODES, *CLI_KINDS, "grpo"),
    default=d.train.loss,
    help="loss mode; dpo|ipo|simpo|orpo: preference optimisation of an --init run; "
    "grpo: RL from verifiable rewards of an --init run",
  )
  p.add_argument("--pack", action="store_true", help="pack several samples per row")
  p.add_argument(
    "--accum", type=positive_int, default=1, help="micro-batches per step (default: 1)"
  )
  p.add_argument("--fused", action="store_true", help="fused head + loss (no [B, T, V] logits)")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --out from its latest checkpoint (Ctrl-C and SIGTERM save one) "
    "with its saved configuration, up to its --steps; --steps (not below the steps done), "
    "--eval-every and --table-rows may change, any other flag that differs from its "
    "config.json is refused",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the jaxnll run in --out (its own files only; a directory whose config.json "
    "a run did not write is refused)",
  )
  p.add_argument("--seed", type=nonnegative_int, default=d.seed, help="init and data-order seed")
  p.add_argument("--model", choices=KINDS, default=d.model.kind, help="architecture")
  p.add_argument("--d-model", type=positive_int, help="model width (default: the demo's size)")
  p.add_argument("--layers", type=positive_int, help="transformer blocks / LSTM layers")
  p.add_argument("--batch-size", type=positive_int, default=d.batch.rows, help="rows per step")
  p.add_argument(
    "--lr",
    type=positive_float,
    help=f"peak learning rate (default: {d.train.learning_rate}; preference losses: 5e-5; "
    "grpo: 1e-4)",
  )
  p.add_argument(
    "--context-gradient",
    choices=("flow", "stop"),
    default=d.model.context_gradient,
    help="'stop': no gradient into the model's activations at context positions",
  )
  p.add_argument(
    "--eval-every", type=nonnegative_int, default=d.eval_every, help="held-out eval interval"
  )
  p.add_argument(
    "--table-rows",
    type=nonnegative_int,
    default=d.table_rows,
    help="held-out samples decoded at the end",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  _add_devices(p)
  add_distill_arguments(p)
  p.add_argument(
    "--init",
    metavar="RUN_DIR",
    help="trained run to start from (and the frozen reference of) preference or RL training",
  )
  add_preference_arguments(p)
  add_policy_arguments(p)


def _add_devices(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
    "devices and processes",
    "Where the run lives (see jaxnll.train.runtime). Several processes: start the same command on "
    "each host with its own --process-id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
    "JAX_PROCESS_ID; or --distributed on a TPU slice / SLURM job, where JAX finds them itself).",
  )
  g.add_argument(
    "--mesh",
    type=mesh_axes,
    help="device mesh over all processes' devices, e.g. data=4,model=2 (default: data=<all>); "
    "'model' splits the head along the vocabulary, 'data' the batch and (FSDP) the weights",
  )
  g.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
  g.add_argument("--num-processes", type=positive_int, help="number of cooperating processes")
  g.add_argument(
    "--process-id", type=nonnegative_int, help="this process's id, 0 .. num-processes - 1"
  )
  g.add_argument(
    "--distributed",
    action="store_true",
    help="join a multi-process job whose coordinator JAX detects (Cloud TPU, SLURM, Open MPI)",
  )


def _init_devices(args: argparse.Namespace) -> None:
  from jaxnll.train import runtime

  runtime.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def _path(value) -> str | None:
  return None if value is None else os.path.realpath(value)


def _saved(section: str, key: str, *, path: bool = False):
  def get(c):
    value = (getattr(c, section) or {}).get(key)
    return _path(value) if path else value

  return get


#: How ``jaxnll train --resume`` reads each flag that sets a saved field: ``dest: (the saved
#: value, the flag's value as saved)``. A given flag whose value differs is refused.
RESUME_FIXED: dict[str, tuple[Callable, Callable]] = {
  "data": (lambda c: _path(c.preference["data"] if c.preference else c.data), _path),
  "loss": (
    lambda c: "grpo" if c.policy else c.preference["kind"] if c.preference else c.train.loss,
    None,
  ),
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
  "teacher": (_saved("distill", "teacher", path=True), _path),
  "init": (lambda c: _path((c.preference or c.policy or {}).get("init")), _path),
  **{k: (_saved("distill", k), None) for k in ("kd_weight", "temperature", "kd")},
  **{k: (_saved("preference", k), None) for k in ("beta", "gamma", "label_smoothing")},
  **{
    k: (_saved("policy", k), None)
    for k in ("group_size", "prompts_per_step", "clip_low", "clip_high", "kl_coef", "normalize")
  },
}
#: Flags ``--resume`` applies (logged): the run's length and its reporting.
RESUME_CHANGEABLE = {"steps": "steps", "eval_every": "eval_every", "table_rows": "table_rows"}
#: Flags that are not part of the saved run: where and how it runs.
NOT_SAVED = {"out", "resume", "overwrite", "no_progress", "mesh"}
NOT_SAVED |= {"coordinator", "num_processes", "process_id", "distributed"}


def _given(argv: Sequence[str] | None, command: str) -> set[str]:
  """The destinations of the options written on the command line of ``command`` (whatever
  their value: ``--batch-size 32`` is given even where 32 is the default)."""
  parser = build_parser()
  for action in parser._actions:  # noqa: SLF001 (argparse has no public walk of sub-parsers)
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      sub = action.choices[command]
      for a in sub._actions:  # noqa: SLF001
        a.default = argparse.SUPPRESS
  args, _ = parser.parse_known_args(argv)
  return set(vars(args)) - {"command", "handler", "missing_extra"}


def _resume_config(args: argparse.Namespace):
  """``--resume``: the saved configuration, with ``--steps`` / ``--eval-every`` /
  ``--table-rows`` where given; any other given flag must equal the saved value (one-line
  ``RunDirError`` naming it otherwise), before anything is built."""
  from jaxnll.train import run as run_lib

  saved = run_lib.check_run_dir(args.out, resume=True, overwrite=args.overwrite)
  where = os.path.join(args.out, "config.json")
  for dest in sorted(getattr(args, "given", set())):
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
  given = {
    field: getattr(args, dest)
    for dest, field in RESUME_CHANGEABLE.items()
    if getattr(args, dest) is not None and dest in getattr(args, "given", set())
  }
  return dataclasses.replace(saved, **given)


def _run_train(args: argparse.Namespace) -> int:
  _init_devices(args)  # before anything touches a device
  from jaxnll.train import policy, preference
  from jaxnll.train.loop import fit
  from jaxnll.train.model import default_config
  from jaxnll.train.run import RunConfig
  from jaxnll.train.teacher import config_from_args as distill_config

  if args.resume:
    config = _resume_config(args)
    run = functools.partial(preference.fit, train_loop=fit) if config.preference else fit
    return _train(run, config, args)
  d = RunConfig()
  preference_config = preference.config_from_args(args)  # None unless --loss dpo|ipo|...
  if preference_config is not None:
    d = dataclasses.replace(
      d,
      steps=preference.DEFAULT_STEPS,
      train=dataclasses.replace(d.train, learning_rate=preference.DEFAULT_LR),
    )
  sizes = {"d_model": args.d_model, "num_layers": args.layers}
  sizes = {k: v for k, v in sizes.items() if v is not None}
  if "d_model" in sizes and args.model == "transformer":
    sizes["d_ff"] = 3 * sizes["d_model"]
  model = default_config(args.model, context_gradient=args.context_gradient, **sizes)
  config = dataclasses.replace(
    d,
    model=model,
    train=dataclasses.replace(
      d.train,
      loss=d.train.loss if preference_config else policy.loss_mode(args.loss),
      accum=args.accum,
      fused=args.fused,
      learning_rate=d.train.learning_rate if args.lr is None else args.lr,
    ),
    batch=dataclasses.replace(d.batch, rows=args.batch_size, pack=args.pack),
    steps=d.steps if args.steps is None else args.steps,
    seed=args.seed,
    data=args.data,
    eval_every=args.eval_every,
    table_rows=args.table_rows,
    distill=distill_config(args),
    preference=preference_config,
  )
  config = policy.apply_config(config, policy.config_from_args(args), lr=args.lr, steps=args.steps)
  run = functools.partial(preference.fit, train_loop=fit) if preference_config else fit
  return _train(run, config, args)


def _train(run, config, args: argparse.Namespace) -> int:
  summary = run(
    config,
    args.out,
    resume=args.resume,
    overwrite=args.overwrite,
    progress=not args.no_progress,
    mesh=args.mesh,
  )
  # Interrupted: the shell's status for death by that signal (the run is resumable).
  interrupted = summary.get("interrupted") if isinstance(summary, dict) else None
  return {"SIGINT": 130, "SIGTERM": 143}.get(interrupted, 0)


def _add_eval(p: argparse.ArgumentParser) -> None:
  p.add_argument("--run", required=True, help="run directory written by `jaxnll train`")
  p.add_argument("--data", help="JSONL file to score (default: the run's data, all splits)")
  p.add_argument("--out", required=True, type=output_file, help="CSV file to write")


def _run_eval(args: argparse.Namespace) -> int:
  from jaxnll.train.loop import evaluate_run
  from jaxnll.train.metrics import write_csv

  rows = evaluate_run(args.run, args.data)
  write_csv(rows, args.out)
  hardest = rows[0]
  print(
    f"wrote {len(rows)} samples to {args.out}; hardest: {hardest['nll_mean']:.3f} nats/token "
    f"({hardest['prompt'][-60:]!r} -> {hardest['reference'][:30]!r})"
  )
  return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
  from jaxnll.bench import add_arguments

  add_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
  from jaxnll.bench import run

  return run(args)


SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
  "train": ("fine-tune a small model with the sub-sequence NLL", _add_train, _run_train),
  "eval": ("per-sample NLL of a trained run, hardest first, as CSV", _add_eval, _run_eval),
  "bench": ("time, memory and FLOP/s of the losses against their peers", _add_bench, _run_bench),
}


#: The extra each subcommand needs beyond the library (``pip install 'jaxnll[EXTRA]'``), and the
#: packages whose absence means that extra is not installed.
EXTRAS = {"train": "train", "eval": "train", "bench": "bench"}
EXTRA_PACKAGES = ("flax", "optax", "orbax")


def _missing_extra(command: str, error: ImportError) -> str | None:
  """The one line to print when ``command`` fails for want of its extra, else None."""
  package = (error.name or "").split(".")[0]
  if package not in EXTRA_PACKAGES:
    return None
  extra = EXTRAS.get(command, "train")
  return f"jaxnll {command}: needs {package}; install it with: pip install 'jaxnll[{extra}]'"


def _report(message: str, args: argparse.Namespace) -> int:
  print(message, file=sys.stderr)
  return 2


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(
    prog="jaxnll", description="Sub-sequence negative log-likelihood for JAX / Flax."
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    try:
      add_arguments(p)
    except ImportError as e:  # the library is installed without this subcommand's extra
      message = _missing_extra(name, e)
      if message is None:
        raise
      run = functools.partial(_report, message)
      p.set_defaults(missing_extra=True)  # its arguments are unknown: accept any
    p.set_defaults(handler=run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jaxnll`` console script."""
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  if unknown and not getattr(args, "missing_extra", False):
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if args.command == "train" and not getattr(args, "missing_extra", False):
    args.given = _given(argv, "train")
  try:
    return args.handler(args)
  except (ValueError, OSError) as e:  # DataError, ConfigError, CheckpointError: ValueErrors
    message = " ".join(str(e).split())  # one line
    print(f"jaxnll {args.command}: error: {message}", file=sys.stderr)
    return 2
  except ImportError as e:
    message = _missing_extra(args.command, e)
    if message is None:
      raise
    return _report(message, args)
  except KeyboardInterrupt as e:  # a third Ctrl-C (a second one before the run loop started)
    detail = f": {e}" if str(e) else ""  # the run loop says which checkpoint the run ends at
    print(f"jaxnll {args.command}: interrupted{detail}", file=sys.stderr)
    global _ABANDONED
    _ABANDONED = True
    return 130


#: Set when a run quit at once (a save may be left running in a background thread).
_ABANDONED = False


def entry() -> None:
  """The ``jaxnll`` command: :func:`main`, then the exit.  A run that quit at once leaves no
  traceback behind: a checkpoint save still running in a background thread is abandoned
  with the process (``os._exit``; the save writes to a temporary directory that resuming
  removes, so nothing half-written is read back) instead of failing noisily while the
  interpreter shuts down."""
  code = main()
  if _ABANDONED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  entry()
