# Set-up shared by bench/gpu.sh and bench/tpu.sh (sourced; $ME names the calling script):
# the repository root, $OUT and $PY, wheels from .whl/ into /tmp/site, and $backend.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
    echo "$ME: wheels in .whl/ did not install; going on without them"
  fi
fi

backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
echo "$ME: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), JAX backend: $backend"
