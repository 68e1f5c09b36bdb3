#!/usr/bin/env bash
# One prepared benchmark run on a GPU machine, in under 8 minutes:
#   1. bench/accelerators.py: the real heads at full size (Llama-3 8B, Gemma-2 2B, Qwen3 8B;
#      4 x 2048 then 8 x 2048 tokens, bfloat16; span 1, 1/2, 1/4), forward + backward of
#      jaxnll's implementations (auto = token_chunked here, chunked, xla) next to optax,
#      tokamax and jax-cce where they import; time, planned device memory, useful TFLOP/s and
#      fraction of the dense bf16 peak (H100 / H200: 989 TFLOP/s), device name.  No case
#      starts after 270 s, hard stop at 330 s; each case is saved when done;
#   2. the PyTorch peers (Liger fused linear cross-entropy, Cut Cross-Entropy, torch's
#      linear_cross_entropy) at the suite's shapes where they import, 70 s budget, stop at 100 s;
#   3. the table of the torch peers (bench/report.py).
# Without a GPU backend for JAX it says so and runs the tiny smoke case on the CPU instead;
# the torch peers report why they are skipped.  Missing peers never fail the script.
#
#   bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: bench/results
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Peers the machine lacks can travel as wheels in .whl/ (pure-Python packages such as
# liger-kernel, cut-cross-entropy, jax-cce); they are installed into /tmp/site first.
set -uo pipefail

ME=gpu.sh
# shellcheck source=bench/setup.sh
source "$(dirname "$0")/setup.sh" "$@"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "$backend" = gpu ] || [ "$backend" = cuda ] || [ "$backend" = rocm ]; then
  timeout -k 10 330 "$PY" bench/accelerators.py --out "$OUT" --budget-s 270
  rc=$?
  [ $rc -eq 0 ] || echo "gpu.sh: jax benchmark ended with status $rc (cases done are kept in $OUT)"
  timeout -k 10 100 "$PY" bench/torch_peers.py --out "$OUT" --budget-s 70
  rc=$?
  [ $rc -eq 0 ] || echo "gpu.sh: torch peers ended with status $rc (results so far are kept)"
  [ -f "$OUT/bench.csv" ] && timeout -k 10 30 "$PY" bench/report.py --out "$OUT"
else
  echo "gpu.sh: no GPU backend for JAX (backend: $backend) -- nothing here measures GPU speed."
  OUT="${TMPDIR:-/tmp}/jaxnll-gpu-smoke"
  echo "gpu.sh: running the CPU smoke case of bench/accelerators.py instead (results in $OUT)"
  timeout -k 10 120 "$PY" bench/accelerators.py --smoke --out "$OUT"
  timeout -k 10 60 "$PY" bench/torch_peers.py --out "$OUT" --budget-s 30
fi

echo "gpu.sh: done in $((SECONDS - start)) s; table in $OUT/accelerators.md"
