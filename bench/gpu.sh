#!/usr/bin/env bash
# One prepared run of the benchmark suite on a GPU machine, in under 8 minutes:
#   1. `python -m jaxnll.bench` at every real head (4 x 2048 tokens, bfloat16), heads started
#      within a 220 s budget, hard stop at 300 s (each head is saved as soon as it is done);
#   2. the PyTorch peers (Liger fused linear cross-entropy, Cut Cross-Entropy, torch's own
#      linear_cross_entropy) at the same shapes where they import, 70 s budget, stop at 110 s;
#   3. the table and plots (bench/report.py).
# Without a GPU backend for JAX it falls back to the CPU quick run, and the torch peers report
# why they are skipped.  Missing peers never fail the script.
#
#   bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: bench/results
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Peers the machine lacks can travel as wheels in .whl/ (pure-Python packages such as
# liger-kernel and cut-cross-entropy); they are installed into /tmp/site first.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
start=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "gpu.sh: wheels in .whl/ did not install; going on without them"
  fi
fi

backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
echo "gpu.sh: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), JAX backend: $backend"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "$backend" = gpu ] || [ "$backend" = cuda ] || [ "$backend" = tpu ]; then
  timeout -k 10 300 "$PY" -m jaxnll.bench --out "$OUT" --budget-s 220 --no-report --no-progress
  rc=$?
  [ $rc -eq 0 ] || echo "gpu.sh: jax suite ended with status $rc (results so far are kept)"
  timeout -k 10 110 "$PY" bench/torch_peers.py --out "$OUT" --budget-s 70
  rc=$?
  [ $rc -eq 0 ] || echo "gpu.sh: torch peers ended with status $rc (results so far are kept)"
else
  echo "gpu.sh: no GPU backend for JAX ($backend): CPU fallback, quick run"
  timeout -k 10 300 "$PY" -m jaxnll.bench --quick --out "$OUT" --no-report --no-progress
  rc=$?
  [ $rc -eq 0 ] || echo "gpu.sh: jax suite ended with status $rc"
  timeout -k 10 110 "$PY" bench/torch_peers.py --out "$OUT" --budget-s 30
fi

timeout -k 10 30 "$PY" bench/report.py --out "$OUT"
echo "gpu.sh: done in $((SECONDS - start)) s; records in $OUT/bench.csv, table in $OUT/bench.md"
