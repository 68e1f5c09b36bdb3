#!/usr/bin/env bash
# One prepared benchmark run on a TPU machine, in under 12 minutes: bench/accelerators.py at
# the real heads, full size (Llama-3 8B, Gemma-2 2B, Qwen3 8B; 4 x 2048 then 8 x 2048 tokens,
# bfloat16; span 1, 1/2, 1/4), forward + backward of jaxnll's implementations (auto =
# pallas_tpu here, pallas_tpu, token_chunked, chunked, xla) next to optax, tokamax and jax-cce
# where they import; time, planned device memory, useful TFLOP/s and fraction of the dense
# bf16 peak (v5e 197, v5p 459, v6e 918 TFLOP/s), device name.  No case starts after 360 s,
# hard stop at 440 s; each case is saved when done.  Then the fused distillation kernel pair
# (Gemma-2 9B -> 2B heads) against chunked, at most 240 s more (OUT/tpu_distill.jsonl).
# The kernels' modelled roofline per generation needs no TPU: bench/roofline.py (compile-only).
# Without a TPU backend for JAX it says so and runs the tiny smoke case on the CPU instead
# (pallas_tpu then runs in Pallas interpret mode only inside the tests, not here).
#
#   bash bench/tpu.sh [OUT_DIR]          # default OUT_DIR: bench/results
#   PYTHON=/path/to/python bash bench/tpu.sh
set -uo pipefail

ME=tpu.sh
# shellcheck source=bench/setup.sh
source "$(dirname "$0")/setup.sh" "$@"

if [ "$backend" = tpu ]; then
  "$PY" -c 'import jax; print("tpu.sh:", len(jax.devices()), "x", jax.devices()[0].device_kind)'
  # The pallas_tpu tiles this generation gets (Llama-3 8B head, 4 x 2048 bf16 tokens).
  "$PY" -c 'from jaxnll.fused import pallas_tpu as pt; c = pt.chip_of()
print("tpu.sh: pallas_tpu on", c.name, {k: pt.tiles(c, k, 4096, 2, 8192, 128256) for k in pt.MATMULS})'
  # The distillation pair's tiles (Gemma-2 9B -> 2B heads, 4 x 2048 bf16 tokens).
  "$PY" -c 'from jaxnll.fused import pallas_tpu as pt, pallas_tpu_distill as d; c = pt.chip_of()
b = 2 * (2304 + 3584); print("tpu.sh: distill pair on", c.name, {k: d.tiles(c, k, 2304, 3584, b, b, 8192, 256000) for k in d.KERNELS})'
  timeout -k 10 440 "$PY" bench/accelerators.py --out "$OUT" --budget-s 360
  rc=$?
  [ $rc -eq 0 ] || echo "tpu.sh: jax benchmark ended with status $rc (cases done are kept in $OUT)"
  # Fused distillation at the Gemma-2 9B -> 2B head pair (teacher D 3584, student D 2304,
  # V 256000, soft-cap 30; 4 x 2048 bf16 tokens, full span), forward + backward of the student:
  # the pallas_tpu kernel pair against chunked (xla's two [B, T, V] logits do not fit a 16 GiB
  # v5e; tried, reported if refused), each checked against the reference at a small shape
  # first; median of 5 after a warm-up, useful TFLOP/s counting 2·N·V·(Ds + Dt) + 4·N·V·Ds.
  timeout -k 10 240 "$PY" - "$OUT" <<'PYEOF' || echo "tpu.sh: distillation timing ended early"
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxnll import reference
from jaxnll.fused import linear_distill_loss
from jaxnll.fused import pallas_tpu as pt

out_dir, dev = sys.argv[1], jax.devices()[0]
chip = pt.chip_of()
DS, DT, V, CAP, B, T = 2304, 3584, 256000, 30.0, 4, 2048

def step(impl, kind):
  def f(hs, ws, ht, wt, m):
    loss = lambda hs, ws: jnp.sum(linear_distill_loss(
      hs, ws, ht, wt, m, kind=kind, logit_softcap=CAP, implementation=impl))
    return jax.value_and_grad(loss, (0, 1))(hs, ws)
  return jax.jit(f)

def arrays(b, t, v, dtype):
  k = jax.random.split(jax.random.key(0), 4)
  return (jax.random.normal(k[0], (b, t, DS), dtype), (jax.random.normal(k[1], (DS, v)) / 48).astype(dtype),
          jax.random.normal(k[2], (b, t, DT), dtype), (jax.random.normal(k[3], (DT, v)) / 60).astype(dtype),
          jnp.ones((b, t), bool))

for kind in ("kl", "jsd"):
  small = arrays(2, 64, 4096, jnp.float32)
  ref = jax.jit(jax.value_and_grad(lambda hs, ws: jnp.sum(reference.linear_distill_loss(
    hs, ws, *small[2:], kind=kind, logit_softcap=CAP)), (0, 1)))(*small[:2])
  args = arrays(B, T, V, jnp.bfloat16)
  for impl in ("pallas_tpu", "chunked", "xla"):
    rec = {"bench": "tpu_distill", "device": dev.device_kind, "kind": kind, "impl": impl,
           "tokens": [B, T], "pair": "gemma2-9b-2b"}
    try:
      got = step(impl, kind)(*small)
      rec["rel_err"] = max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
                           for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
      if not rec["rel_err"] < 1e-3:  # float32 at the small shape: a wrong kernel, not rounding
        raise ValueError(f"differs from the reference (relative error {rec['rel_err']:.2g})")
      fn = step(impl, kind)
      jax.block_until_ready(fn(*args))
      times = []
      for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); times.append(time.perf_counter() - t0)
      sec = float(np.median(times))
      flops = 2 * B * T * V * (DS + DT) + 4 * B * T * V * DS
      rec |= {"ms": 1e3 * sec, "tflops": flops / sec / 1e12, "of_peak": flops / sec / chip.peak}
    except Exception as e:  # a refusal (out of memory) is a result too
      rec["error"] = str(e).splitlines()[0][:200]
    print("tpu.sh: distill", json.dumps(rec), flush=True)
    with open(f"{out_dir}/tpu_distill.jsonl", "a") as f:
      f.write(json.dumps(rec) + "\n")
PYEOF
else
  echo "tpu.sh: no TPU backend for JAX (backend: $backend) -- nothing here measures TPU speed."
  OUT="${TMPDIR:-/tmp}/jaxnll-tpu-smoke"
  echo "tpu.sh: running the CPU smoke case of bench/accelerators.py instead (results in $OUT)"
  timeout -k 10 120 "$PY" bench/accelerators.py --smoke --out "$OUT"
fi
echo "tpu.sh: done in $((SECONDS - start)) s; table in $OUT/accelerators.md"
