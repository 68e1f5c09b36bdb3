"""Train-step time of the fused head with and without packing, side by side in one process.

``python bench/step_time.py [--repeats 15]`` builds the demo model (``jaxnll train``'s
defaults) and times one jitted, accumulated train step on a packed batch (``--fused
--pack``: several samples a row, per-sample losses per packed segment) and on a padded batch
(``--fused``), interleaved, medians of the repeats; it prints both and their ratio.  The
packed step must log per-sample losses; it should cost about what the padded step costs per
target token, not one head pass per packed segment.

It also runs the packed step the former way (``fused_pack_2x``: the scalar loss, then a
second head pass only for the per-segment sums, :class:`TwoPassSFT`) and counts the head
passes of each step's trace (calls of the CPU kernel's passes while tracing the jitted step:
``one_pass`` / ``stats_pass`` / ``grad_pass`` of :mod:`jaxnll.fused.chunked`, the branch
``"auto"`` runs here).
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

from jaxnll import parallel
from jaxnll.fused import chunked
from jaxnll.spans import shift_targets
from jaxnll.train import data as data_lib
from jaxnll.train import objectives
from jaxnll.train.objectives import SFT
from jaxnll.train.run import RunConfig, build_trainer
from jaxnll.train.step import micro_batches, train_step_fn


@dataclasses.dataclass(frozen=True)
class TwoPassSFT(SFT):
  """The fused SFT objective as it was: the scalar loss, then the head once more (under
  ``stop_gradient``) for the per-segment sums of packed rows — kept here to compare."""

  def __call__(self, model, batch):
    targets, target_mask, valid_mask, num_segments = objectives.batch_masks(batch)
    seg = batch["segment_ids"]
    train_mask = valid_mask if self.loss == "full" else target_mask
    kwargs = dict(segment_ids=seg, positions=batch["positions"], span_mask=target_mask)
    sg = jax.lax.stop_gradient
    hidden = model(batch["tokens"], return_hidden=True, **kwargs)
    weight, layout = model.output_head()
    numerator, row_sums = parallel.head_loss(
      hidden, weight, targets, train_mask, normalize="sum", weight_layout=layout
    )
    if self.loss == "subsequence" and num_segments == 1:
      sample_sums = sg(row_sums)[:, None]
    else:
      sample_sums = parallel.head_segment_nll(
        sg(hidden), sg(weight), targets, target_mask, seg,
        num_segments=num_segments, weight_layout=layout,
      )  # fmt: skip
    aux = objectives.common_aux(batch, target_mask, valid_mask, sample_sums, num_segments)
    if self.loss == "full":
      aux["full_sum"] = sg(numerator)
    aux["denominator"] = aux["full_count"] if self.loss == "full" else aux["target_count"]
    return numerator, aux


def head_passes(step, state, batch) -> dict[str, int]:
  """Calls of each pass of the CPU kernel while tracing ``step`` (its head passes)."""
  counts = {}
  saved = {name: getattr(chunked, name) for name in ("one_pass", "stats_pass", "grad_pass")}

  def counting(name, fn):
    def call(*args, **kwargs):
      counts[name] = counts.get(name, 0) + 1
      return fn(*args, **kwargs)

    return call

  try:
    for name, fn in saved.items():
      setattr(chunked, name, counting(name, fn))
    jax.make_jaxpr(step)(state, batch)
  finally:
    for name, fn in saved.items():
      setattr(chunked, name, fn)
  return counts


def _setup(pack: bool, objective: SFT | None = None):
  objective = SFT("subsequence", True) if objective is None else objective
  config = RunConfig()
  config = dataclasses.replace(
    config, batch=dataclasses.replace(config.batch, pack=pack), train=config.train
  )
  spec = config.batch
  examples = data_lib.drop_long(data_lib.embedded_examples("train"), spec.length)
  samples = data_lib.encode_all(examples, spec.length)
  item = next(iter(data_lib.train_stream(samples, spec, seed=0)))
  graphdef, state = nnx.split(build_trainer(config))
  step = jax.jit(functools.partial(train_step_fn, graphdef, objective=objective))
  batch = jax.device_put(micro_batches(item.batch, 1))
  b = item.batch
  targets = int(np.sum(shift_targets(b["tokens"], b["span_mask"], b["segment_ids"])[1]))
  return step, state, batch, targets


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", help="JSON file for the result")
  args = p.parse_args(argv)
  before = TwoPassSFT("subsequence", True)
  runs = {
    "fused_pack": _setup(True),
    "fused_pack_2x": _setup(True, before),
    "fused": _setup(False),
  }
  passes = {name: head_passes(*run[:3]) for name, run in runs.items()}
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
    result[name] = {
      "median_s": med,
      "target_tokens": targets,
      "us_per_target": 1e6 * med / targets,
      "head_passes": passes[name],
    }
  result["ratio_per_target"] = (
    result["fused_pack"]["us_per_target"] / result["fused"]["us_per_target"]
  )
  result["ratio_one_pass_vs_two"] = (
    result["fused_pack"]["median_s"] / result["fused_pack_2x"]["median_s"]
  )
  for name in runs:
    r = result[name]
    print(
      f"{name:>13}: {1e3 * r['median_s']:8.1f} ms/step  {r['target_tokens']:6d} target tokens  "
      f"{r['us_per_target']:7.2f} us/target token  head passes {r['head_passes']}"
    )
  print(f"packed / padded time per target token: {result['ratio_per_target']:.2f}")
  print(f"packed step, one head pass / the former two: {result['ratio_one_pass_vs_two']:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
