"""What a trained run can learn from preferences and rewards: the measurements behind the
README's preference / RL section.

``python bench/learning_probe.py families RUN_DIR [RUN_DIR ...]`` prints, per task family of
the embedded held-out split, the share of preference pairs the run ranks right (chosen NLL sum
below the rejected one's, as ``preference_accuracy``) and the greedy exact match (the reward
of ``--loss grpo``).

``python bench/learning_probe.py grpo RUN_DIR [--family copy] [--steps 30] [--lr 1e-4]``
takes GRPO steps (the training objective :class:`jaxnll.train.policy.Policy`, Adam, fresh
answers sampled every step at temperature 0.7) from the run's model, twice: on the same 16
prompts every step, and on 16 new prompts of the family every step, and prints the sampled
reward per step of each.  The first shows that the objective raises the reward of what it
sees; the second whether that generalises to prompts it has not seen yet.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import jax
import numpy as np
import optax
from flax import nnx

from jaxnll.train import data as data_lib
from jaxnll.train import run as run_lib
from jaxnll.train.modes import policy as pol
from jaxnll.train.modes import preference as pref

GROUP, PROMPTS, TEMPERATURE, MAX_NEW = 8, 16, 0.7, 40


def families(run_dir: str) -> None:
  model, config, step = run_lib.load_run(run_dir)
  spec = dataclasses.replace(config.batch, pack=False)
  pairs = [p for p in pref.embedded_pairs("heldout") if pref.fits(p, spec.length)]
  rows = [s for pair in pref.pair_samples(pairs, spec.length) for s in pair]
  sums = np.asarray(pref.sequence_nlls(model, rows, spec)[0])
  ranked = sums[0::2] < sums[1::2]
  heldout = data_lib.drop_long(run_lib.load_examples(config.data)[1], spec.length)
  greedy = pol.greedy_rewards(model, heldout, spec.length, max_new=MAX_NEW) > 0
  by = collections.defaultdict(lambda: ([], []))
  for pair, right in zip(pairs, ranked, strict=True):
    by[pair.family][0].append(right)
  for ex, right in zip(heldout, greedy, strict=True):
    by[ex.family][1].append(right)
  print(f"{run_dir} (step {step})")
  print(f"  {'family':10s} {'pairs ranked right':>19s} {'greedy exact match':>19s}")
  for family, (r, g) in sorted(by.items()):
    print(f"  {family:10s} {np.mean(r):19.1%} {np.mean(g):19.1%}")
  print(f"  {'all':10s} {np.mean(ranked):19.1%} {np.mean(greedy):19.1%}")


def grpo(run_dir: str, family: str, steps: int, lr: float) -> None:
  pool = [ex for ex in data_lib.embedded_examples("train") if ex.family == family]
  if len(pool) < PROMPTS:
    raise ValueError(f"--family {family!r}: {len(pool)} training examples, need {PROMPTS}")
  settings = pol.PolicyConfig(
    init=run_dir, group_size=GROUP, temperature=TEMPERATURE, max_new=MAX_NEW
  )
  objective = pol.Policy(settings)
  for fresh in (False, True):
    model, config, _ = run_lib.load_run(run_dir)
    length = config.batch.length
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def update(model, optimizer, batch):
      def loss(m):
        numerator, aux = objective(m, batch)
        return numerator / aux["denominator"]

      optimizer.update(model, nnx.grad(loss)(model))

    rewards = []
    for step in range(steps):
      rng = np.random.default_rng(step if fresh else 0)
      ids = rng.choice(len(pool), PROMPTS, replace=False)
      examples = [pool[i] for i in ids for _ in range(GROUP)]
      rows, reward, _ = pol.sampled_batch(model, examples, length, jax.random.key(step), settings)
      ids = np.arange(len(examples), dtype=np.int32)[:, None]
      update(model, optimizer, {**rows, "sample_ids": ids})
      rewards.append(float(reward.mean()))
    which = "16 new prompts a step" if fresh else "the same 16 prompts"
    r = np.asarray(rewards)
    k = max(1, steps // 5)
    print(
      f"{family}, {which}, lr {lr}: sampled reward per step {' '.join(f'{x:.2f}' for x in r)}"
      f"; first {k} steps {r[:k].mean():.3f}, last {k} {r[-k:].mean():.3f}"
    )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("families", help="per-family ranking and greedy exact match")
  f.add_argument("runs", nargs="+")
  g = sub.add_parser("grpo", help="GRPO on fixed vs fresh prompts of one family")
  g.add_argument("run")
  g.add_argument("--family", default="copy")
  g.add_argument("--steps", type=int, default=30)
  g.add_argument("--lr", type=float, default=1e-4)
  args = parser.parse_args(argv)
  if args.command == "families":
    for run in args.runs:
      families(run)
  else:
    grpo(args.run, args.family, args.steps, args.lr)


if __name__ == "__main__":
  main()
