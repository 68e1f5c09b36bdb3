"""Per-device memory of the vocabulary-parallel loss at a real model head, for 1, 2, 4, 8 shards.

For each shard count ``n`` the head weight ``[D, V]`` is split along the vocabulary over a
``model`` mesh axis of ``n`` devices and forward + backward (gradients w.r.t. ``hidden`` and
``weight``) is lowered and compiled — never run — so ``memory_analysis()`` reports the bytes
one device needs.  Paths:

* ``fused`` — :func:`jaxnll.parallel.linear_nll_loss` (the fused head + loss, each device
  holding only ``[C, K]`` logits blocks of its own columns);
* ``logits`` — the vocabulary-parallel loss from materialised logits: each device computes its
  ``[B, T, V/n]`` slice ``hidden @ weight_shard`` and calls
  :func:`jaxnll.sequence_nll` with ``vocab_axis="model"``.

On CPU the ``n`` devices are faked (``--xla_force_host_platform_device_count``); on an
accelerator host the real devices are used.  Run::

    python bench/bench_parallel.py            # Llama-3-8B head, 8 x 2048 tokens, bf16

Results are appended to ``bench/results/parallel.json`` (long format, one record per number).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _fake_devices(count: int) -> None:
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}={count}").strip()


# Named heads: (hidden size D, vocabulary V).
HEADS = {
  "llama3-8b": (4096, 128256),
  "qwen3-8b": (4096, 151936),
  "gemma2-2b": (2304, 256000),
  "cpu": (256, 32768),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PATHS = ("fused", "logits")


def step(path: str, mesh, vocab: int):
  """``jax.value_and_grad`` (hidden, weight) of the global token-mean loss on ``mesh``."""
  import jax
  from jax.sharding import PartitionSpec as P

  from jaxnll import nll, parallel

  if path == "fused":

    def loss(h, w, y, m):
      return parallel.linear_nll_loss(h, w, y, m, mesh=mesh, vocab_size=vocab)[0]

  else:

    def local(h, w, y, m):
      logits = h @ w  # [B, T, V/n] on each device
      sums = nll.sequence_nll(logits, y, m, vocab_axis="model", vocab_size=vocab)
      return nll.batch_loss(sums, nll.span_counts(m))

    sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P()), out_specs=P()
    )
    loss = sharded

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def memory(path: str, shards: int, batch: int, length: int, head: str, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxnll import parallel

  d, v = HEADS[head]
  mesh = parallel.make_mesh({"model": shards}, devices=jax.devices()[:shards])
  padded = parallel.padded_vocab(v, shards)
  dt = jnp.dtype(dtype)
  sharded = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, spec)
  )
  args = (
    sharded((batch, length, d), dt, P()),
    sharded((d, padded), dt, P(None, "model")),
    sharded((batch, length), jnp.int32, P()),
    sharded((batch, length), jnp.bool_, P()),
  )
  stats = step(path, mesh, v).lower(*args).compile().memory_analysis()
  return dict(
    temp_bytes=int(stats.temp_size_in_bytes),
    argument_bytes=int(stats.argument_size_in_bytes),
    output_bytes=int(stats.output_size_in_bytes),
  )


def environment() -> dict:
  """The columns every record carries (device, versions, commit, date): jaxnll.bench's."""
  from jaxnll import bench

  return bench.environment()


def run(args: argparse.Namespace) -> int:
  import jax

  env = environment()
  print(json.dumps(env))
  (b, t), head, dtype = (
    (int(x) for x in args.shape.split(":")[0].split("x")),
    *args.shape.split(":")[1:],
  )
  shard_counts = [int(x) for x in args.shards.split(",")]
  if max(shard_counts) > len(jax.devices()):
    raise SystemExit(f"need {max(shard_counts)} devices, have {len(jax.devices())}")
  rows = []
  base = {}
  for path in args.paths.split(","):
    for n in shard_counts:
      stats = memory(path, n, b, t, head, dtype)
      base.setdefault(path, stats["temp_bytes"])
      ratio = stats["temp_bytes"] / base[path]
      print(
        f"{path:7s} {head} {b}x{t} {dtype} model={n}: temp {stats['temp_bytes'] / 2**20:9.1f} MiB"
        f" per device ({ratio:.3f} x 1 shard); arguments {stats['argument_bytes'] / 2**20:.1f} MiB,"
        f" outputs {stats['output_bytes'] / 2**20:.1f} MiB",
        flush=True,
      )
      for metric, value in stats.items():
        rows.append(
          dict(
            bench="parallel_memory",
            path=path,
            head=head,
            hidden_size=HEADS[head][0],
            vocab=HEADS[head][1],
            batch=b,
            length=t,
            dtype=dtype,
            model_shards=n,
            metric=metric,
            value=value,
            **env,
          )
        )
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "parallel.json")
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  with open(path, "w") as f:
    json.dump(old + rows, f, indent=1)
  print(f"wrote {len(rows)} records to {path}")
  return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--shape", default="8x2048:llama3-8b:bfloat16", help="BxT:head:dtype")
  p.add_argument("--shards", default="1,2,4,8", help="model shard counts")
  p.add_argument("--paths", default=",".join(PATHS), help="fused,logits")
  p.add_argument("--out", default=RESULTS, help="results directory (default: bench/results)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  _fake_devices(max(int(x) for x in args.shards.split(",")))
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
