"""Compile-only memory of every fused implementation at the real LM heads.

For each head (bf16, ``--batch`` × ``--tokens`` positions, every position a target) and each
``implementation=``, the forward + backward of the scalar training entry
(``jaxnll.linear_nll_loss``, gradients for ``hidden`` and ``weight``) is compiled for this
machine's backend and its ``memory_analysis().temp_size_in_bytes`` recorded — no run, so the
full-size heads fit a laptop.  Also printed: the ``token_chunked`` block each head gets.

On a CPU, ``"pallas_tpu"`` compiles the Pallas *interpreter* (the kernels as XLA loops), which
says nothing of the Mosaic kernels' VMEM; it is labelled so.  ``"auto"`` compiles the branch of
this backend.

  python bench/kernel_memory.py      # table + bench/results/kernel_memory.json (and .md)
  python bench/kernel_memory.py --heads llama-3-8b --implementations xla,token_chunked
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import jaxnll
from jaxnll.fused import token_chunked

#: name: (hidden size D, vocabulary V)
HEADS = {
  "gemma-2-2b": (2304, 256000),
  "llama-3-8b": (4096, 128256),
  "qwen3-8b": (4096, 151936),
  "mistral-7b": (4096, 32768),
}
IMPLEMENTATIONS = ("xla", "chunked", "token_chunked", "pallas_tpu", "auto")
MIB = 2**20


def temp_bytes(implementation: str, batch: int, tokens: int, d: int, v: int) -> int:
  """Temp bytes of the compiled forward + backward (hidden and weight gradients), bf16."""
  s = jax.ShapeDtypeStruct
  args = (
    s((batch, tokens, d), jnp.bfloat16),
    s((d, v), jnp.bfloat16),
    s((batch, tokens), jnp.int32),
    s((batch, tokens), jnp.bool_),
  )

  def fwd_bwd(h, w, y, m):
    loss = lambda h, w: jaxnll.linear_nll_loss(h, w, y, m, implementation=implementation)[0]
    return jax.value_and_grad(loss, (0, 1))(h, w)

  compiled = jax.jit(fwd_bwd).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", default=",".join(HEADS))
  parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--out", default="bench/results/kernel_memory.json")
  args = parser.parse_args(argv)
  heads = args.heads.split(",")
  impls = args.implementations.split(",")
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  n = args.batch * args.tokens
  records = []
  for head in heads:
    d, v = HEADS[head]
    for impl in impls:
      start = time.perf_counter()
      temp = temp_bytes(impl, args.batch, args.tokens, d, v)
      note = "Pallas interpreter" if impl == "pallas_tpu" and backend != "tpu" else ""
      records.append(
        dict(
          head=head,
          d=d,
          v=v,
          tokens=n,
          dtype="bfloat16",
          implementation=impl,
          temp_bytes=temp,
          compile_s=round(time.perf_counter() - start, 1),
          token_chunked_block=token_chunked.block_rows(v, n),
          backend=backend,
          device=device,
          jax=jax.__version__,
          note=note,
        )
      )
      print(f"{head} {impl}: {temp / MIB:.0f} MiB ({records[-1]['compile_s']} s)", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(records, indent=1) + "\n")
  text = table(records, heads, impls, n)
  out.with_suffix(".md").write_text(text + "\n")
  print()
  print(text)


def table(records, heads, impls, n) -> str:
  """Markdown: one row per head, temp MiB per implementation, the token_chunked block."""
  by = {(r["head"], r["implementation"]): r for r in records}
  first = records[0]
  lines = [
    f"Forward + backward temp memory, MiB (compile-only on {first['backend']}: "
    f"{first['device']}; jax {first['jax']}; {n} bf16 target tokens)",
    "",
    "| head | D | V | " + " | ".join(impls) + " | token_chunked block C |",
    "|---|---|---|" + "---|" * len(impls) + "---|",
  ]
  for head in heads:
    d, v = HEADS[head]
    cells = []
    for impl in impls:
      r = by[(head, impl)]
      cells.append(f"{r['temp_bytes'] / MIB:.0f}" + ("\\*" if r["note"] else ""))
    block = token_chunked.block_rows(v, n)
    lines.append(f"| {head} | {d} | {v} | " + " | ".join(cells) + f" | {block} |")
  if any(r["note"] for r in records):
    lines += ["", "\\* the Pallas interpreter's XLA loops, not the Mosaic kernels' VMEM."]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
