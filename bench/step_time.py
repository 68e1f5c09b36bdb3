"""Train-step time of the fused head with and without packing, side by side in one process.

``python bench/step_time.py [--repeats 15]`` builds the demo model (``jaxnll train``'s
defaults) and times one jitted, accumulated train step on a packed batch (``--fused
--pack``: several samples a row, per-sample losses per packed segment) and on a padded batch
(``--fused``), interleaved, medians of the repeats; it prints both and their ratio.  The
packed step must log per-sample losses; it should cost about what the padded step costs per
target token, not one head pass per packed segment.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train.objectives import SFT
from jaxnll.train.run import RunConfig, build_trainer
from jaxnll.train.step import micro_batches, train_step_fn


def _setup(pack: bool):
  config = RunConfig()
  config = dataclasses.replace(
    config, batch=dataclasses.replace(config.batch, pack=pack), train=config.train
  )
  spec = config.batch
  examples = data_lib.drop_long(data_lib.embedded_examples("train"), spec.length)
  samples = data_lib.encode_all(examples, spec.length)
  item = next(iter(data_lib.train_stream(samples, spec, seed=0)))
  graphdef, state = nnx.split(build_trainer(config))
  step = jax.jit(functools.partial(train_step_fn, graphdef, objective=SFT("subsequence", True)))
  batch = jax.device_put(micro_batches(item.batch, 1))
  b = item.batch
  targets = int(np.sum(shift_targets(b["tokens"], b["span_mask"], b["segment_ids"])[1]))
  return step, state, batch, targets


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", help="JSON file for the result")
  args = p.parse_args(argv)
  runs = {name: _setup(pack) for name, pack in (("fused_pack", True), ("fused", False))}
  times = {name: [] for name in runs}
  for step, state, batch, _ in runs.values():
    jax.block_until_ready(step(state, batch))  # compile + warm-up
  for _ in range(args.repeats):
    for name, (step, state, batch, _) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, batch))
      times[name].append(time.perf_counter() - t0)
  result = {}
  for name, (_, _, _, targets) in runs.items():
    med = statistics.median(times[name])
    result[name] = {"median_s": med, "target_tokens": targets, "us_per_target": 1e6 * med / targets}
  result["ratio_per_target"] = (
    result["fused_pack"]["us_per_target"] / result["fused"]["us_per_target"]
  )
  for name in runs:
    r = result[name]
    print(
      f"{name:>10}: {1e3 * r['median_s']:8.1f} ms/step  {r['target_tokens']:6d} target tokens  "
      f"{r['us_per_target']:7.2f} us/target token"
    )
  print(f"packed / padded time per target token: {result['ratio_per_target']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
