"""The student's NLL and the KD term from one head pass, and packed rows in one pass.

Side by side in one process on this machine (times as ratios of interleaved medians; temp
memory from ``jax.jit(f).lower(...).compile().memory_analysis()``), forward + backward
(gradients for the student's hidden states and head) of ``Σ nll + Σ kd``:

* ``one pass``: ``linear_distill_loss(..., targets=y)`` — both terms from the same tiles;
* ``two passes``: ``linear_distill_loss(...)`` plus ``linear_sequence_nll(...)`` — what the
  training step did before;

and per segment of packed rows (``S`` samples per row):

* ``segments, one pass``: ``linear_distill_loss(..., targets=y, segment_ids=seg, num_segments=S)``;
* ``segments, S passes``: the previous training step — ``linear_segment_nll`` plus one
  ``linear_distill_loss`` per segment mask (``jax.vmap`` over the ``S`` masks).

    python bench/fused_distill_one_pass.py [--tokens 4x512] [--student-d 256] [--teacher-d 512]
        [--vocab 32768] [--segments 8] [--repeats 7] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxnll  # noqa: E402


def inputs(b, t, ds, dt, v, segments, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  hs = jax.random.normal(k[0], (b, t, ds))
  ws = jax.random.normal(k[1], (ds, v)) / np.sqrt(ds)
  ht = jax.random.normal(k[2], (b, t, dt))
  wt = jax.random.normal(k[3], (dt, v)) / np.sqrt(dt)
  y = jax.random.randint(k[4], (b, t), 0, v)
  # Packed rows: S equal segments, the second half of each is its target span.
  pos = jnp.arange(t)
  seg = jnp.broadcast_to(1 + pos * segments // t, (b, t))
  within = pos % (t // segments)
  mask = jnp.broadcast_to(within >= (t // segments) // 2, (b, t))
  return hs, ws, ht, wt, mask, y, seg


def variants(segments):
  kw = dict(implementation="chunked")

  def one(hs, ws, ht, wt, mask, y, seg):
    kd, nll = jaxnll.linear_distill_loss(hs, ws, ht, wt, mask, targets=y, **kw)
    return kd.sum() + nll.sum()

  def two(hs, ws, ht, wt, mask, y, seg):
    kd = jaxnll.linear_distill_loss(hs, ws, ht, wt, mask, **kw)
    return kd.sum() + jaxnll.linear_sequence_nll(hs, ws, y, mask, **kw).sum()

  def seg_one(hs, ws, ht, wt, mask, y, seg):
    kd, nll = jaxnll.linear_distill_loss(
      hs, ws, ht, wt, mask, targets=y, segment_ids=seg, num_segments=segments, **kw
    )
    return kd.sum() + nll.sum()

  def seg_many(hs, ws, ht, wt, mask, y, seg):
    nll = jaxnll.linear_segment_nll(hs, ws, y, mask, seg, num_segments=segments, **kw)
    masks = (seg[None] == jnp.arange(1, segments + 1)[:, None, None]) & mask[None]
    kd = jax.vmap(lambda m: jaxnll.linear_distill_loss(hs, ws, ht, wt, m, **kw))(masks)
    return kd.sum() + nll.sum()

  return {
    "one pass": one,
    "two passes": two,
    "segments, one pass": seg_one,
    f"segments, {segments} passes": seg_many,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tokens", default="4x512")
  p.add_argument("--student-d", type=int, default=256)
  p.add_argument("--teacher-d", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--segments", type=int, default=8)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default=os.path.join("bench", "results"))
  args = p.parse_args(argv)
  b, t = (int(x) for x in args.tokens.lower().split("x"))
  arrays = inputs(b, t, args.student_d, args.teacher_d, args.vocab, args.segments)
  fns, temps, values = {}, {}, {}
  for name, f in variants(args.segments).items():
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    compiled = g.lower(*arrays).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes
    fns[name] = compiled
    values[name] = jax.block_until_ready(compiled(*arrays))
  for a, b_ in (("one pass", "two passes"), ("segments, one pass", list(fns)[3])):
    for x, y in zip(jax.tree.leaves(values[a]), jax.tree.leaves(values[b_]), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-4)
  times = {n: [] for n in fns}
  names = list(fns)
  for r in range(args.repeats):  # interleaved, the order rotated
    for n in names[r % len(names) :] + names[: r % len(names)]:
      start = time.perf_counter()
      jax.block_until_ready(fns[n](*arrays))
      times[n].append(time.perf_counter() - start)
  med = {n: float(np.median(ts)) for n, ts in times.items()}
  shape = (
    f"{b} × {t} tokens (half of each of {args.segments} segments per row in the span), student D "
    f"{args.student_d}, teacher D {args.teacher_d}, V {args.vocab}, float32, "
    f"implementation='chunked', forward + backward of Σ nll + Σ kd; {jax.devices()[0]}"
  )
  lines = [f"- {shape}", ""]
  lines += ["| variant | temp MiB | median s | × the other of its pair |", "|---|---:|---:|---:|"]
  pairs = {"one pass": "two passes", "segments, one pass": names[3]}
  for n in names:
    other = pairs.get(n)
    ratio = f"{med[n] / med[other]:.3f}" if other else ""
    lines.append(f"| {n} | {temps[n] / 2**20:.2f} | {med[n]:.3f} | {ratio} |")
  text = "\n".join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fused_distill_one_pass.jsonl"), "a") as f:
    row = dict(shape=shape, temp_bytes=temps, median_s=med, repeats=args.repeats)
    f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
