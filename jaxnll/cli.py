"""``jaxnll`` command line: ``train``, ``eval`` and ``bench`` (thin: parse, then call the module).

Each subcommand registers itself in :data:`SUBCOMMANDS` with a function that adds its
arguments to a sub-parser and a function that runs it; a new subcommand (``bench``) is one
more entry.  ``jaxnll train`` looks its training mode up in :mod:`jaxnll.train.modes`, which
knows every mode's flags, defaults and run; the value types of the flags are
:mod:`jaxnll.bench.argtypes` (the one application package without flax, which every
subcommand's parser loads anyway).  Nothing here imports flax at module level: ``jaxnll
bench`` runs without the training extra.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence

from jaxnll.bench.argtypes import (
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
  from jaxnll.train import modes
  from jaxnll.train.model import KINDS
  from jaxnll.train.run import RunConfig

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
    help=f"total steps (default: {d.steps}; {modes.defaults_text('steps')}). The "
    "learning-rate schedule (warm-up, cosine decay) spans the --steps of the run's start, "
    "saved as schedule_steps in config.json; "
    "--resume --steps M past it keeps that schedule, so the extra steps run at the final "
    "learning rate",
  )
  p.add_argument(
    "--loss",
    choices=modes.LOSSES,
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
    help=f"peak learning rate (default: {d.train.learning_rate}; "
    f"{modes.defaults_text('learning_rate')})",
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
  p.add_argument(
    "--init",
    metavar="RUN_DIR",
    help="trained run to start from (and the frozen reference of) preference or RL training",
  )
  _add_devices(p)
  modes.add_arguments(p)  # each mode's own flags


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


def _run_train(args: argparse.Namespace) -> int:
  _init_devices(args)  # before anything touches a device
  from jaxnll.train import modes

  if args.resume:
    config = modes.resumed(args, getattr(args, "given", set()))
  else:
    config = modes.from_args(args)  # the mode's defaults where no flag is given
  summary = modes.fit(
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
