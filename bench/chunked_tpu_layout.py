"""``chunked`` on TPU with a ``[D, V]`` head against a ``[V, D]`` table: no weight copy.

``python bench/chunked_tpu_layout.py`` (in ``.venv-aot``: the TPU compiler, no device) compiles
forward + backward of ``linear_nll_loss(implementation="chunked")`` at the Mistral 7B head
(D 4096, V 32768; 4 x 2048 bf16 tokens) for TPU v5e with both weight layouts and prints the
temp memory and the HLO copies of a ``[D, V]`` value.  The copy it used to find came from the
target logit: a gather of the targets' columns of a ``[D, V]`` weight, for which XLA:TPU
copied the whole weight to column-major and back (2 copies, 257 MiB of temp against
129 MiB); the logit is now read from the vocabulary loop's own tile, and neither layout is
copied.  Compiled for TPU v5e, not run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxnll
from jaxnll.bench import aot

B, T, D, V = 4, 2048, 4096, 32768


def compile_layout(layout: str) -> aot.Report:
  weight = (D, V) if layout == "dv" else (V, D)
  args = (
    jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
    jax.ShapeDtypeStruct(weight, jnp.bfloat16),
    jax.ShapeDtypeStruct((B, T), jnp.int32),
    jax.ShapeDtypeStruct((B, T), jnp.bool_),
  )

  def f(h, w, y, m):
    loss = lambda h, w: jaxnll.linear_nll_loss(
      h, w, y, m, implementation="chunked", weight_layout=layout
    )[0]
    return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

  return aot.compile_for(f, *args, target="tpu-v5e")


def main() -> None:
  for layout in ("dv", "vd"):
    r = compile_layout(layout)
    copies = [
      line.strip()[:160]
      for line in (r.hlo or "").splitlines()
      if " copy(" in line and f"{D},{V}" in line
    ]
    temp = "error" if not r.ok else f"{r.temp_bytes / 2**20:,.0f} MiB"
    print(f"{layout}: temp {temp} (compiled for TPU v5e, not run); {len(copies)} weight copies")
    for line in copies:
      print("   ", line)


if __name__ == "__main__":
  main()
