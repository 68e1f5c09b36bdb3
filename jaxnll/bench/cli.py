"""``jaxnll bench`` (and ``python -m jaxnll.bench``): every head of the table, every
implementation, checked, timed, recorded and reported."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax

from jaxnll.bench import harness, records
from jaxnll.bench.argtypes import (
  batch_tokens,
  fraction_list,
  nonnegative_int,
  output_dir,
  positive_float,
  positive_int,
)
from jaxnll.bench.impls import SUITE, implementations
from jaxnll.bench.report import report, summary
from jaxnll.bench.specs import (
  FRACTIONS,
  QUICK_FRACTIONS,
  QUICK_SPEC,
  SPECS,
  Case,
  is_accelerator,
  resolve,
)

DTYPES = ("float32", "bfloat16", "float16")


def script_parser(
  doc: str, *, spec: str, tokens: tuple[int, int], dtype: str = "bfloat16"
) -> argparse.ArgumentParser:
  """The options every script in ``bench/`` shares: results directory, head, tokens, dtype
  (read back by :func:`case_of`)."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument(
    "--out",
    type=output_dir,
    default="bench/results",
    help="results directory (default: %(default)s)",
  )
  p.add_argument("--spec", default=spec, choices=sorted(SPECS), help="head (default: %(default)s)")
  p.add_argument("--tokens", type=batch_tokens, default=tokens, help="B x T, e.g. 8x512")
  p.add_argument("--dtype", default=dtype, choices=DTYPES, help="default: %(default)s")
  return p


def case_of(args: argparse.Namespace) -> Case:
  """The :class:`Case` of a :func:`script_parser`'s arguments (the library's chunks)."""
  return Case(SPECS[args.spec], *args.tokens, args.dtype)


def finish(rows: Sequence[dict], out: str, name: str) -> int:
  """A script's end: appends ``rows`` to ``out/NAME.csv`` / ``.jsonl``, prints their summary;
  the exit status, 1 if an implementation failed or differed from its reference."""
  records.save(rows, out, name)
  print(summary(rows), flush=True)
  return 1 if failures(rows) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The options of ``jaxnll bench``."""
  p.add_argument("--quick", action="store_true", help="one small case, 2 span fractions, 3 reps")
  p.add_argument(
    "--spec",
    action="append",
    choices=sorted(SPECS),
    help="head to run (repeatable; default: all heads of this backend)",
  )
  p.add_argument(
    "--out",
    type=output_dir,
    default="bench/results",
    help="results directory (default: %(default)s)",
  )
  p.add_argument("--impl", action="append", help="implementation to run (repeatable; default: all)")
  p.add_argument(
    "--fractions", type=fraction_list, help="span fractions, comma separated (default: 1,0.5,0.25)"
  )
  p.add_argument(
    "--repeats", type=positive_int, help="interleaved repetitions (default: 5, quick: 3)"
  )
  p.add_argument(
    "--warmup", type=nonnegative_int, help="warm-up calls after the check (default: 1, quick: 0)"
  )
  p.add_argument("--dtype", choices=DTYPES, help="override the dtype")
  p.add_argument("--tokens", type=batch_tokens, help="override B x T, e.g. 2x128")
  p.add_argument(
    "--budget-s", type=positive_float, help="start no new head after this many seconds"
  )
  p.add_argument(
    "--memory-only",
    action="store_true",
    help="compile only, at the accelerator sizes (bf16, 4x2048 tokens) whatever the backend: "
    "temp memory and compile time of every implementation, nothing run",
  )
  p.add_argument(
    "--aot",
    action="store_true",
    help="compile only, for TPU / GPU targets from this CPU (needs the [aot] extra): every "
    "fused implementation x entry x head x target, compiled or the compiler's error, and the "
    "memory, into OUT/aot.md and .jsonl (compiled for TARGET, not run)",
  )
  p.add_argument(
    "--target",
    action="append",
    help="--aot target (repeatable; default: all of jaxnll.bench.aot.TARGETS)",
  )
  p.add_argument("--entry", action="append", help="--aot entry (repeatable; default: all four)")
  p.add_argument(
    "--layout",
    choices=("vd", "dv"),
    default="vd",
    help="--aot head layout: vd, a [V, D] table read in place (default), or dv, [D, V]",
  )
  p.add_argument("--no-report", action="store_true", help="do not write the table and plots")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def fractions_arg(s: str | tuple[float, ...] | None, default: Sequence[float]) -> tuple[float, ...]:
  """``"1,0.5"`` (a command-line value) as span fractions; ``default`` if empty."""
  if not s:
    return tuple(default)
  return tuple(s) if isinstance(s, tuple) else fraction_list(s)


def _cases(args: argparse.Namespace) -> list[Case]:
  accel = is_accelerator()
  if args.spec:
    names = args.spec
  elif args.memory_only:
    names = [n for n, s in SPECS.items() if s.accel is not None]
  elif args.quick:
    names = [QUICK_SPEC["accel" if accel else "cpu"]]
  else:
    names = [n for n, s in SPECS.items() if s.accel is not None or not accel]
  backend = "gpu" if args.memory_only else jax.default_backend()
  return [
    resolve(SPECS[n], backend=backend, quick=args.quick, dtype=args.dtype, tokens=args.tokens)
    for n in names
  ]


def _impl_names(args: argparse.Namespace) -> tuple[str, ...]:
  if not args.impl:
    return SUITE
  unknown = set(args.impl) - set(SUITE)
  if unknown:
    raise ValueError(f"unknown --impl {sorted(unknown)}; choose from {sorted(SUITE)}")
  keep = set(args.impl) | {"optax", "matmul"}
  return tuple(n for n in SUITE if n in keep)


def failures(rows: Sequence[dict]) -> list[str]:
  """``"spec impl: why"`` for every implementation that failed or differed from the reference."""
  return [
    f"{r['spec']} {r['impl']}: {r['note']}"
    for r in rows
    if r["metric"] == "status" and r["stat"] in ("failed", "check_failed")
  ]


def run(args: argparse.Namespace) -> int:
  """Runs the suite for parsed ``args``; 0 if every implementation passed its check."""
  if getattr(args, "aot", False):
    return run_aot(args)
  t_start = time.perf_counter()
  cases = _cases(args)
  fractions = fractions_arg(args.fractions, QUICK_FRACTIONS if args.quick else FRACTIONS)
  repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
  warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
  env = records.environment()
  what = (
    "compile only"
    if args.memory_only
    else f"span fractions {list(fractions)}, {repeats} repetitions"
  )
  print(
    f"jaxnll bench: {env['device']}, jax {env['jax_version']}, commit {env['git_commit']}; "
    f"{len(cases)} head(s), {what}",
    flush=True,
  )
  if args.memory_only:
    return _run_memory(args, cases, env)
  names = _impl_names(args)
  total = len(cases) * harness.steps_of(len(names), len(fractions), repeats)
  progress = harness.Progress(total, not args.no_progress)
  bad = 0
  try:
    for case in harness.within_budget(cases, args.budget_s, progress.write):
      rows = harness.bench_case(
        case,
        env,
        fractions=fractions,
        repeats=repeats,
        warmup=warmup,
        impls=implementations(case, names),
        progress=progress,
      )
      if not args.impl:  # the default suite: the fused distillation at the same head too
        kd = dict(fractions=fractions, repeats=repeats, warmup=warmup)
        names = ("optax", "jaxnll_fused") if args.quick else harness.FUSED_DISTILL_SUITE
        rows += harness.fused_distill_case(case, env, names=names, **kd)
      records.save(rows, args.out)  # each head as soon as it is done: a killed run keeps the others
      for line in failures(rows):
        bad += 1
        progress.write(line)
  finally:
    progress.close()
  if not args.no_report:
    md, pngs = report(args.out)
    print(f"results appended to {os.path.join(args.out, 'bench.csv')} (and .jsonl)")
    print(f"table: {md}; plots: {', '.join(pngs)}")
  print(f"done in {time.perf_counter() - t_start:.0f} s")
  return 1 if bad else 0


def _run_memory(args: argparse.Namespace, cases: Sequence[Case], env: dict) -> int:
  bad = 0
  for case in cases:
    rows = harness.memory_case(case, env)
    records.save(rows, args.out)
    print(summary(rows), flush=True)
    bad += len(failures(rows))
  if not args.no_report:
    md, _ = report(args.out)
    print(f"table: {md}")
  return 1 if bad else 0


def _choices(flag: str, given, allowed) -> tuple:
  if not given:
    return tuple(allowed)
  unknown = set(given) - set(allowed)
  if unknown:
    raise ValueError(f"unknown {flag} {sorted(unknown)}; choose from {list(allowed)}")
  return tuple(dict.fromkeys(given))


def run_aot(args: argparse.Namespace) -> int:
  """``jaxnll bench --aot``: :func:`jaxnll.bench.aot.table` for the chosen targets, heads,
  entries and implementations; 0 if every compile that applies succeeded."""
  from jaxnll.bench import aot

  targets = _choices("--target", args.target, aot.TARGETS)
  impls = _choices("--impl", args.impl, aot.IMPLEMENTATIONS)
  entries = _choices("--entry", args.entry, aot.ENTRIES)
  specs = [SPECS[n] for n in (args.spec or [n for n, s in SPECS.items() if s.accel])]
  tokens = [tuple(args.tokens)] if args.tokens else list(aot.TOKENS)
  t_start = time.perf_counter()
  print(
    f"jaxnll bench --aot: {len(targets)} target(s) x {len(specs)} head(s) x {len(tokens)} "
    f"token count(s) x {len(entries)} entr(ies) x {len(impls)} implementation(s), "
    "compiled on this CPU, not run",
    flush=True,
  )
  rows = []
  env = {**aot.environment(), "git_commit": records.environment().get("git_commit")}
  try:
    # Each row saved as soon as it is compiled: a killed run keeps the others.
    rows = aot.table(
      specs,
      targets,
      implementations=impls,
      entries=entries,
      tokens=tokens,
      layout=args.layout,
      on_row=lambda row: aot.save([row], args.out, env),
    )
  finally:
    md = os.path.join(args.out, "aot.md")
    print(f"table: {md} (and aot.jsonl); done in {time.perf_counter() - t_start:.0f} s")
  return 1 if any(r.get("ok") is False for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m jaxnll.bench [--quick] [--spec NAME] [--out DIR]``."""
  parser = argparse.ArgumentParser(prog="jaxnll bench", description=__doc__.split("\n")[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))
