#!/usr/bin/env bash
# One prepared benchmark run on a TPU machine, in under 8 minutes: bench/accelerators.py at
# the real heads, full size (Llama-3 8B, Gemma-2 2B, Qwen3 8B; 4 x 2048 then 8 x 2048 tokens,
# bfloat16; span 1, 1/2, 1/4), forward + backward of jaxnll's implementations (auto =
# pallas_tpu here, pallas_tpu, token_chunked, chunked, xla) next to optax, tokamax and jax-cce
# where they import; time, planned device memory, useful TFLOP/s and fraction of the dense
# bf16 peak (v5e 197, v5p 459, v6e 918 TFLOP/s), device name.  No case starts after 360 s,
# hard stop at 440 s; each case is saved when done.
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
  timeout -k 10 440 "$PY" bench/accelerators.py --out "$OUT" --budget-s 360
  rc=$?
  [ $rc -eq 0 ] || echo "tpu.sh: jax benchmark ended with status $rc (cases done are kept in $OUT)"
else
  echo "tpu.sh: no TPU backend for JAX (backend: $backend) -- nothing here measures TPU speed."
  OUT="${TMPDIR:-/tmp}/jaxnll-tpu-smoke"
  echo "tpu.sh: running the CPU smoke case of bench/accelerators.py instead (results in $OUT)"
  timeout -k 10 120 "$PY" bench/accelerators.py --smoke --out "$OUT"
fi
echo "tpu.sh: done in $((SECONDS - start)) s; table in $OUT/accelerators.md"
