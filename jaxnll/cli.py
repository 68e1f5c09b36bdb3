"""``jaxnll`` command line: ``train``, ``eval`` and ``bench`` (thin: parse, then call the module).

Each subcommand registers itself in :data:`SUBCOMMANDS` with a function that adds its
arguments to a sub-parser and a function that runs it; a new subcommand (``bench``) is one
more entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence


def _add_train(p: argparse.ArgumentParser) -> None:
  from jaxnll.train.model import KINDS
  from jaxnll.train.objectives import LOSS_MODES
  from jaxnll.train.policy import add_arguments as add_policy_arguments
  from jaxnll.train.run import RunConfig
  from jaxnll.train.teacher import add_arguments as add_distill_arguments

  d = RunConfig()
  p.add_argument("--data", help="JSONL file of prompt/response or chat records (default: embedded)")
  p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")
  p.add_argument("--steps", type=int, default=d.steps, help="total steps (default: %(default)s)")
  p.add_argument(
    "--loss", choices=(*LOSS_MODES, "grpo"), default=d.train.loss, help="loss mode (grpo: RL)"
  )
  p.add_argument("--pack", action="store_true", help="pack several samples per row")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per step (default: 1)")
  p.add_argument("--fused", action="store_true", help="fused head + loss (no [B, T, V] logits)")
  p.add_argument("--resume", action="store_true", help="continue from DIR's latest checkpoint")
  p.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed")
  p.add_argument("--model", choices=KINDS, default=d.model.kind, help="architecture")
  p.add_argument("--d-model", type=int, help="model width (default: the demo's size)")
  p.add_argument("--layers", type=int, help="transformer blocks / LSTM layers")
  p.add_argument("--batch-size", type=int, default=d.batch.rows, help="rows per step")
  p.add_argument("--lr", type=float, default=d.train.learning_rate, help="peak learning rate")
  p.add_argument(
    "--context-gradient",
    choices=("flow", "stop"),
    default=d.model.context_gradient,
    help="'stop': no gradient into the model's activations at context positions",
  )
  p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out eval interval")
  p.add_argument(
    "--table-rows", type=int, default=d.table_rows, help="held-out samples decoded at the end"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  _add_devices(p)
  add_distill_arguments(p)
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
    help="device mesh over all processes' devices, e.g. data=4,model=2 (default: data=<all>); "
    "'model' splits the head along the vocabulary, 'data' the batch and (FSDP) the weights",
  )
  g.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
  g.add_argument("--num-processes", type=int, help="number of cooperating processes")
  g.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes - 1")
  g.add_argument(
    "--distributed",
    action="store_true",
    help="join a multi-process job whose coordinator JAX detects (Cloud TPU, SLURM, Open MPI)",
  )


def _init_devices(args: argparse.Namespace) -> None:
  from jaxnll.train import runtime

  runtime.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def _run_train(args: argparse.Namespace) -> int:
  _init_devices(args)  # before anything touches a device
  from jaxnll.train import policy
  from jaxnll.train.loop import fit
  from jaxnll.train.model import default_config
  from jaxnll.train.run import RunConfig
  from jaxnll.train.teacher import config_from_args as distill_config

  d = RunConfig()
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
      loss=policy.loss_mode(args.loss),
      accum=args.accum,
      fused=args.fused,
      learning_rate=args.lr,
    ),
    batch=dataclasses.replace(d.batch, rows=args.batch_size, pack=args.pack),
    steps=args.steps,
    seed=args.seed,
    data=args.data,
    eval_every=args.eval_every,
    table_rows=args.table_rows,
    distill=distill_config(args),
  )
  config = policy.apply_config(config, policy.config_from_args(args))
  fit(config, args.out, resume=args.resume, progress=not args.no_progress, mesh=args.mesh)
  return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
  p.add_argument("--run", required=True, help="run directory written by `jaxnll train`")
  p.add_argument("--data", help="JSONL file to score (default: the run's data, all splits)")
  p.add_argument("--out", required=True, help="CSV file to write")


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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jaxnll", description="Sub-sequence negative log-likelihood for JAX / Flax."
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    add_arguments(p)
    p.set_defaults(handler=run)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jaxnll`` console script."""
  args = build_parser().parse_args(argv)
  try:
    return args.handler(args)
  except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
    print(f"jaxnll {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
