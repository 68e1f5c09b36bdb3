"""Deviceless compiles through the real TPU and GPU compilers (``jaxnll.bench.aot``).

Needs the ``[aot]`` extra (libtpu, the CUDA plugin, ptxas), which lives in ``.venv-aot``:
``make test`` runs this file there (``make aot``) and leaves it out of the main suite.
Every figure is "compiled for TARGET, not run".
"""

from __future__ import annotations

import pytest

pytest.importorskip("libtpu", reason="needs the [aot] extra: `make test` runs it in .venv-aot")
pytest.importorskip("jax_cuda12_plugin", reason="needs the [aot] extra (.venv-aot)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxnll import linear_nll_loss  # noqa: E402
from jaxnll.bench import aot  # noqa: E402
from jaxnll.fused import auto, pallas_tpu  # noqa: E402

# One real head (Gemma-2 2B: D = 2304, V = 256000), 4 x 2048 bf16 tokens.
B, T, D, V = 4, 2048, 2304, 256000
MIB = 2**20

#: Temp bytes of ``auto`` forward + backward at that head, per target, from these compiles
#: (jax / jaxlib 0.10.2, libtpu 0.0.42.1).  A regression guard: update on purpose only.
RECORDED_TEMP = {
  "h100": 1_524_758_888,
  "a100": 1_524_758_888,
  "b200": 1_524_758_888,
  "tpu-v4": 131_923_968,
  "tpu-v5e": 132_503_552,
  "tpu-v5p": 131_585_952,
  "tpu-v6e": 135_681_952,
  "tpu7x": 186_276_224,
}
#: Bytes of the arguments (hidden, weight, targets, mask) and of the outputs (loss and the
#: bf16 gradients of hidden and weight): the shapes' own, on every target.
ARGUMENT_BYTES = 2 * B * T * D + 2 * D * V + 4 * B * T + B * T
OUTPUT_GRAD_BYTES = 2 * B * T * D + 2 * D * V


def _loss_and_grads(h, w, y, m):
  loss = lambda h, w: linear_nll_loss(h, w, y, m)[0]
  return jax.value_and_grad(loss, argnums=(0, 1))(h, w)


_ARGS = (
  jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
  jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
  jax.ShapeDtypeStruct((B, T), jnp.int32),
  jax.ShapeDtypeStruct((B, T), jnp.bool_),
)


@pytest.fixture(scope="module", params=sorted(aot.TARGETS))
def compiled(request):
  return aot.compile_for(_loss_and_grads, *_ARGS, target=request.param)


def test_every_target_has_one_and_eight_devices():
  for name, t in aot.TARGETS.items():
    one, eight = aot.devices(name, 1), aot.devices(name, 8)
    assert len(one) == 1 and len(eight) == 8 and len({d.id for d in eight}) == 8
    assert one[0].platform == ("tpu" if t.is_tpu else "gpu"), name
  with pytest.raises(ValueError, match="target must be one of"):
    aot.get_target("tpu-v9")
  with pytest.raises(ValueError, match="count must be 1 or 8"):
    aot.devices("h100", 4)


def test_auto_compiles_with_its_plan(compiled):
  r = compiled
  assert r.ok, r.error
  assert r.argument_bytes == ARGUMENT_BYTES
  assert r.output_bytes >= OUTPUT_GRAD_BYTES
  t = aot.TARGETS[r.target]
  if not t.is_tpu:  # token_chunked: token-block loops, never an [N, V] value; its f32
    # weight-gradient buffer (2.2 GiB) is over the budget: vocabulary slabs, no f32 [D, V]
    assert r.while_loops >= 1 and not r.mosaic
    assert not r.has_value(B * T, V), r.largest
    assert f"f32[{D},{V}]" not in r.hlo and f"f32[{D},85376]" in r.hlo, r.largest
  else:  # the Mosaic kernels within each chip's VMEM, v4's 16 MiB included: the forward
    # that accumulates the hidden gradient, the weight gradient (8·N·D·V), and no logits
    assert len(r.mosaic) == 2, r.mosaic
    # Compiled, so each fits; what the kernels ask for stays within the chip's VMEM (the
    # HLO's "used" scoped-memory figure is not a fit measure: it exceeds the limit at times).
    chip = pallas_tpu.CHIPS[aot.devices(r.target, 1)[0].device_kind]
    for call in r.mosaic:
      assert 0 < call["vmem_limit"] <= chip.vmem, (call, chip)
    assert r.while_loops == 0


def test_auto_memory_is_as_recorded(compiled):
  r = compiled
  assert r.ok, r.error
  want = RECORDED_TEMP[r.target]
  assert abs(r.temp_bytes - want) <= 0.05 * max(want, MIB), (r.target, r.temp_bytes, want)


def test_tpu_branch_is_pallas_on_every_generation():
  for name in ("tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x", "h100"):
    assert _branch_on(name) == "pallas_tpu", name
  # Split over 8 devices under jit: XLA would have to partition a Mosaic kernel.
  split = aot.abstract((8, 128), jnp.float32, aot.mesh("tpu-v5e", (8,), ("x",)), jax.P("x"))
  assert _branch_on(split) == "chunked"


@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_the_sharded_fused_train_step_compiles(target):
  # The demo model's Flax NNX step with the fused head + loss, 8 devices, batch rows split.
  r = aot.train_step(target, model={"num_layers": 1}, rows=16, length=64, mesh_shape=(8,))
  assert r.ok, r.error
  assert "all-reduce" in r.hlo  # the gradients' sum over the data axis
  assert not r.mosaic  # on TPU: the chunked kernel (a Mosaic call cannot be auto-partitioned)


def test_a_compile_error_is_reported():
  big = jax.ShapeDtypeStruct((2**20, 2**18), jnp.float32)  # 1 TiB: more than any HBM
  r = aot.compile_for(lambda x: x @ x.T, big, target="tpu-v5e", keep_hlo=False)
  assert not r.ok and r.error and r.total_bytes is None


def _branch_on(where):
  """``auto.tpu_branch`` of an argument traced for a target name or a placed struct."""
  seen = []

  def f(x):
    seen.append(auto.tpu_branch(x))
    return x

  x = aot.abstract((8, 128), jnp.float32, where) if isinstance(where, str) else where
  jax.jit(f).trace(x)
  return seen[0]


def test_bench_aot_writes_the_table(tmp_path):
  from jaxnll import cli

  args = ["bench", "--aot", "--target", "h100", "--spec", "mistral-7b", "--entry", "scalar"]
  args += ["--impl", "auto", "--impl", "pallas_tpu", "--tokens", "1x128", "--out", str(tmp_path)]
  assert cli.main(args) == 0
  md = (tmp_path / "aot.md").read_text()
  assert "| h100 | mistral-7b | 1x128 | [V, D] | scalar | auto | yes |" in md
  assert "| h100 | mistral-7b | 1x128 | [V, D] | scalar | pallas_tpu | n/a: TPU kernel" in md
  assert "not run" in md
  rows = (tmp_path / "aot.jsonl").read_text().splitlines()
  assert len(rows) == 2 and '"jax_version"' in rows[0]


def test_chunked_reads_a_dv_head_on_tpu_without_a_column_major_copy():
  # The target logit comes from the vocabulary loop's own tiles: gathering the targets'
  # columns of a [D, V] weight made XLA:TPU keep a column-major copy of the whole weight
  # (`bench/chunked_tpu_layout.py`: 1.0-1.2 GiB at the real heads).  Small shapes, same plan.
  b, t, d, v = 1, 256, 256, 4096

  def f(h, w, y, m):
    loss = lambda h, w: linear_nll_loss(h, w, y, m, implementation="chunked", vocab_chunk=1024)
    return jax.value_and_grad(lambda h, w: loss(h, w)[0], argnums=(0, 1))(h, w)

  sds = jax.ShapeDtypeStruct
  args = (sds((b, t, d), jnp.bfloat16), sds((d, v), jnp.bfloat16))
  args += (sds((b, t), jnp.int32), sds((b, t), jnp.bool_))
  r = aot.compile_for(f, *args, target="tpu-v5e")
  assert r.ok, r.error
  copies = [ln for ln in r.hlo.splitlines() if " copy(" in ln and f"bf16[{d},{v}]" in ln]
  assert not copies, copies[0][:200]
