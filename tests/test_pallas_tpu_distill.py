"""The Pallas TPU kernel pair of fused distillation (jaxnll.fused.pallas_tpu_distill), in Pallas
interpret mode on this CPU, against the plain-jnp reference on materialised logits and a
float64 formula: values, the student's gradients, none for the teacher.

One set of shapes for the whole file (``B·T = 16`` positions, 11 of them targets; ``V = 384``;
hidden sizes 12 and 20, neither a multiple of 128) so each configuration compiles once.
``EVEN`` tiles divide ``B·T`` and ``V`` (16 × 128), ``ODD`` ones divide neither the 11 targets
nor ``V`` (8 × 256: a last partial row block, a ragged last vocabulary tile).  Each numeric
test compiles one configuration of the kernels in interpret mode (three or four
``pallas_call``s, forward and backward): about 2-3 s of CPU each, the price of checking a
kernel that only runs on a TPU; the configurations are chosen to cover each option once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from jaxnll import parallel, reference
from jaxnll.fused import linear_distill_loss
from jaxnll.fused import pallas_tpu as pt
from jaxnll.fused import pallas_tpu_distill as ptd
from jaxnll.fused.distill import KINDS

B, T, DS, DT, V = 2, 8, 12, 20, 384
EVEN = dict(token_chunk=16, vocab_chunk=128)
ODD = dict(token_chunk=8, vocab_chunk=256)
MASK = np.array([[0, 1, 1, 1, 0, 1, 1, 1], [1, 1, 0, 1, 0, 0, 1, 1]], bool)  # 11 targets


def make(seed=0, dtype=jnp.float32, scale=2.0):
  k = jax.random.split(jax.random.key(seed), 4)
  hs = scale * jax.random.normal(k[0], (B, T, DS), jnp.float32)
  ws = jax.random.normal(k[1], (DS, V), jnp.float32) / np.sqrt(DS)
  ht = scale * jax.random.normal(k[2], (B, T, DT), jnp.float32)
  wt = jax.random.normal(k[3], (DT, V), jnp.float32) / np.sqrt(DT)
  return tuple(x.astype(dtype) for x in (hs, ws, ht, wt))


def f64_formula(hs, ws, ht, wt, mask, kind, tau, beta=0.5):
  """The divergence in NumPy float64, from the definitions."""
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  zs, zt = f(hs) @ f(ws) / tau, f(ht) @ f(wt) / tau

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lps, lpt = log_softmax(zs), log_softmax(zt)
  ps, pt_ = np.exp(lps), np.exp(lpt)
  if kind == "ce":
    tok = -(pt_ * lps).sum(-1)
  elif kind == "kl":
    tok = (pt_ * (lpt - lps)).sum(-1)
  elif kind == "reverse_kl":
    tok = (ps * (lps - lpt)).sum(-1)
  else:
    lm = np.log(beta * pt_ + (1 - beta) * ps)
    tok = beta * (pt_ * (lpt - lm)).sum(-1) + (1 - beta) * (ps * (lps - lm)).sum(-1)
  w = np.asarray(mask, np.float64)
  return (np.where(w != 0, tok, 0.0) * w).sum(-1)


@functools.cache
def run(impl, kind, tau, chunks=(), kw=()):
  """One jitted function: per-sample values and the gradients of ``Σ_b c_b L_b`` (unequal
  ``c_b``) for all four arrays (the teacher's must come back zero)."""
  chunks, kw = dict(chunks), dict(kw)
  c = jnp.array([1.0, -0.5])

  def loss(hs, ws, ht, wt, mask, bs, bt):
    extra = dict(student_bias=bs, teacher_bias=bt) if bs is not None else {}
    if impl == "reference":
      return reference.linear_distill_loss(
        hs, ws, ht, wt, mask, kind=kind, temperature=tau, **extra, **kw
      )
    return linear_distill_loss(
      hs, ws, ht, wt, mask, kind=kind, temperature=tau, implementation=impl, **chunks, **extra,
      **kw,
    )  # fmt: skip

  def both(hs, ws, ht, wt, mask, bs=None, bt=None):
    def total(hs, ws, ht, wt, bs):
      out = loss(hs, ws, ht, wt, mask, bs, bt)
      return jnp.sum(out * c), out

    argnums = (0, 1, 2, 3) + ((4,) if bs is not None else ())
    (_, out), grads = jax.value_and_grad(total, argnums, has_aux=True)(hs, ws, ht, wt, bs)
    return out, grads[:4], (grads[4] if bs is not None else None)

  return jax.jit(both)


def call(impl, kind, tau, *args, chunks=None, **kw):
  items = lambda d: tuple(sorted((d or {}).items()))  # noqa: E731
  return run(impl, kind, tau, items(chunks), items(kw))(*args)


def assert_close(got, want, rtol=2e-5, atol=2e-6):
  """Elementwise, with the absolute tolerance relative to the array's largest entry: both
  sides round in f32, and where a gradient entry comes from cancelling terms its f32 error
  is a fraction of the largest entry, not of itself (against float64 the reference's own
  error reaches 5e-7 of the largest entry here)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol, atol * max(1.0, float(np.max(np.abs(w), initial=0))))


def check_against_reference(kind, tau, chunks, *, seed=1, rtol=2e-5, atol=2e-6, **kw):
  hs, ws, ht, wt = make(seed)
  mask = jnp.asarray(MASK)
  val, (dhs, dws, dht, dwt), _ = call("pallas_tpu", kind, tau, hs, ws, ht, wt, mask,
                                      chunks=chunks, **kw)  # fmt: skip
  want_val, (want_dhs, want_dws, _, _), _ = call("reference", kind, tau, hs, ws, ht, wt, mask, **kw)
  assert_close(val, want_val, rtol, atol)
  assert_close((dhs, dws), (want_dhs, want_dws), rtol, atol)
  # The teacher is under stop_gradient: exactly zero, not merely small.
  assert not np.any(np.asarray(dht)) and not np.any(np.asarray(dwt))
  return val


# ----------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", ["even", "odd"])
def test_each_kind_matches_reference_and_float64(kind, chunks):
  """Every divergence with tiles that divide the problem and tiles that do not, at a
  temperature per (kind, tiles): 0.7, 1, 1.3, 2.5."""
  tau = {"ce": 1.0, "kl": 0.7, "reverse_kl": 2.5, "jsd": 1.3}[kind]
  tau = tau if chunks == "even" else {1.0: 0.7, 0.7: 2.5, 2.5: 1.3, 1.3: 1.0}[tau]
  chunks = EVEN if chunks == "even" else ODD
  val = check_against_reference(kind, tau, chunks)
  hs, ws, ht, wt = make(1)
  np.testing.assert_allclose(val, f64_formula(hs, ws, ht, wt, MASK, kind, tau), 1e-5, 2e-6)


def test_targets_give_the_nll_beside_the_divergence_as_the_one_pass_kernels_do():
  """``targets=`` on ``pallas_tpu``: the divergence from the pair, the student's NLL from the
  NLL kernels; values and student gradients of ``Σ c·kd + Σ c'·nll`` equal ``chunked``'s one
  pass (packed segments, ``τ ≠ 1``)."""
  hs, ws, ht, wt = make(3)
  mask = jnp.asarray(MASK)
  y = jax.random.randint(jax.random.key(4), (B, T), 0, V)
  seg = jnp.array([[0, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 2, 2, 2, 2, 0]])

  def total(impl):
    def f(hs, ws):
      kd, nll = linear_distill_loss(
        hs, ws, ht, wt, mask, kind="kl", temperature=1.5, targets=y, segment_ids=seg,
        num_segments=2, implementation=impl, **(ODD if impl == "pallas_tpu" else {}),
      )  # fmt: skip
      return jnp.sum(kd * jnp.array([1.0, -0.5])) + jnp.sum(nll * 0.3), (kd, nll)

    return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(hs, ws)

  (_, got), got_grads = total("pallas_tpu")
  (_, want), want_grads = total("chunked")
  assert got[0].shape == got[1].shape == (B, 2)
  assert_close(got, want)
  assert_close(got_grads, want_grads)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_ends_with_the_kernels_own_tiles(beta):
  """``β`` at its ends (``log m`` is one of the log-probabilities), the tiles from the chip
  table (an unknown chip here: one block)."""
  check_against_reference("jsd", 1.0, None, beta=beta)


@pytest.mark.parametrize("kind", ["reverse_kl"])
def test_bf16(kind):
  """bf16 hidden states and heads: bf16 matmuls on the MXU with f32 accumulation, statistics
  in f32; gradients come back bf16, within bf16 rounding of the f32 reference's."""
  hs, ws, ht, wt = make(2, jnp.bfloat16)
  mask = jnp.asarray(MASK)
  val, (dhs, dws, _, _), _ = call("pallas_tpu", kind, 1.0, hs, ws, ht, wt, mask, chunks=ODD)
  f32 = tuple(x.astype(jnp.float32) for x in (hs, ws, ht, wt))
  want_val, (want_dhs, want_dws, _, _), _ = call("reference", kind, 1.0, *f32, mask)
  assert dhs.dtype == jnp.bfloat16 and dws.dtype == jnp.bfloat16
  np.testing.assert_allclose(val, want_val, rtol=2e-2, atol=2e-2)
  for g, w in ((dhs, want_dhs), (dws, want_dws)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.max(np.abs(g - w)) <= 3e-2 * np.max(np.abs(w))


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_vd_heads_biases_softcap_float_weights_mean(kind):
  """``[V, D]`` heads read in place, both biases (the student's differentiated), a soft-cap,
  float-weight mask, ``"mean"``: the reference on materialised logits."""
  hs, ws, ht, wt = make(3)
  k = jax.random.split(jax.random.key(4), 3)
  bs, bt = jax.random.normal(k[0], (V,)), jax.random.normal(k[1], (V,))
  mask = jnp.where(jnp.asarray(MASK), jax.random.uniform(k[2], (B, T), minval=0.5, maxval=2), 0)
  kw = dict(reduction="mean", logit_softcap=3.0, student_weight_layout="vd",
            teacher_weight_layout="vd")  # fmt: skip
  args = (hs, ws.T, ht, wt.T, mask, bs, bt)
  got = call("pallas_tpu", kind, 1.3, *args, chunks=ODD, **kw)
  want = call("reference", kind, 1.3, *args, **kw)
  assert got[1][1].shape == (V, DS)
  assert_close(got[0], want[0])
  assert_close((got[1][:2], got[2]), (want[1][:2], want[2]))


def test_each_student_gradient_alone():
  """Differentiated for one of the student's hidden states, head or bias only, the backward
  runs only the kernel that gradient needs (the weight kernel without its matmul for the
  bias alone) and each equals the reference's."""
  hs, ws, ht, wt = make(8)
  mask = jnp.asarray(MASK)
  bs = jax.random.normal(jax.random.key(9), (V,))
  c = jnp.array([1.0, -0.5])

  def loss(impl, hs, ws, bs):
    if impl == "reference":
      out = reference.linear_distill_loss(hs, ws, ht, wt, mask, kind="kl", student_bias=bs)
    else:
      out = linear_distill_loss(hs, ws, ht, wt, mask, kind="kl", student_bias=bs,
                                implementation=impl, **ODD)  # fmt: skip
    return jnp.sum(out * c)

  @jax.jit
  def grads(hs, ws, bs):
    out = []
    for impl in ("pallas_tpu", "reference"):
      f = functools.partial(loss, impl)
      out.append(tuple(jax.grad(f, k)(hs, ws, bs) for k in range(3)))
    return out

  got, want = grads(hs, ws, bs)
  assert_close(got, want)


def test_empty_span_is_zero_with_zero_gradients_and_nan_outside_reaches_nothing():
  """An empty span costs exactly 0 with zero gradients; NaN hidden states outside the span
  (and in the sample without targets) reach no value or gradient."""
  hs, ws, ht, wt = make(5)
  mask = jnp.asarray(MASK).at[1].set(False)
  inside = mask[..., None]
  hs, ht = jnp.where(inside, hs, jnp.nan), jnp.where(inside, ht, jnp.nan)
  val, (dhs, dws, _, _), _ = call("pallas_tpu", "reverse_kl", 1.0, hs, ws, ht, wt, mask,
                                  chunks=ODD)  # fmt: skip
  assert float(val[1]) == 0.0 and np.isfinite(float(val[0])) and float(val[0]) > 0
  assert not np.any(np.asarray(dhs)[1]) and np.all(np.isfinite(np.asarray(dws)))
  none = jnp.zeros((B, T), bool)
  val, (dhs, dws, _, _), _ = call("pallas_tpu", "reverse_kl", 1.0, hs, ws, ht, wt, none,
                                  chunks=ODD)  # fmt: skip
  assert not np.any(np.asarray(val)) and not np.any(np.asarray(dhs))
  assert not np.any(np.asarray(dws))


@pytest.mark.parametrize("kind", ["ce"])
def test_sharded_vocabulary_inside_shard_map(kind):
  """Both heads' vocabulary split over 2 devices (``vocab_axis``; 192 columns each, a ragged
  128-column tile): the per-shard statistics combined outside the kernels (``"ce"``: the
  running sum relative to the teacher's maximum moves with it), the per-sample result and the
  student's gradients (f32 parts summed over the shards) equal the reference's."""
  mesh = parallel.make_mesh("data=4,model=2")
  hs, ws, ht, wt = make(7)
  mask = jnp.asarray(MASK)
  c = jnp.array([1.0, -0.5])

  def local(hs, ws, ht, wt):
    return linear_distill_loss(hs, ws, ht, wt, mask, kind=kind, vocab_axis="model",
                               implementation="pallas_tpu", **EVEN)  # fmt: skip

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")), out_specs=P()
  )

  def vg(fn):
    total = lambda hs, ws: jnp.sum(fn(hs, ws, ht, wt) * c)  # noqa: E731
    return fn(hs, ws, ht, wt), jax.grad(total, (0, 1))(hs, ws)

  got = jax.jit(lambda: vg(sharded))()
  want = call("reference", kind, 1.0, hs, ws, ht, wt, mask)
  assert_close(got, (want[0], want[1][:2]))


def test_tpu_interpret_semantics_match_reference():
  """The kernels under ``pltpu.InterpretParams()`` (TPU semantics: DMAs and semaphores
  simulated), where the installed JAX has it."""
  from jax.experimental.pallas import tpu as pltpu

  if not hasattr(pltpu, "InterpretParams"):
    pytest.skip("this JAX has no pltpu.InterpretParams")
  old = ptd.INTERPRET
  ptd.INTERPRET = pltpu.InterpretParams()
  try:
    run.cache_clear()  # traced again under the new interpreter
    check_against_reference("jsd", 0.8, ODD, seed=6)
  finally:
    ptd.INTERPRET = old
    run.cache_clear()


# ----------------------------------------------------------------------------- plan


def test_auto_exports_the_mosaic_kernel_pair_for_tpu():
  """``"auto"`` lowered for TPU carries the Mosaic kernels (forward, hidden and weight
  gradients; ``"jsd"`` a second forward pass); for CPU, none."""
  hs, ws, ht, wt = make(0)
  mask = jnp.asarray(MASK)

  def fwd_bwd(kind):
    def f(hs, ws):
      return jnp.sum(linear_distill_loss(hs, ws, ht, wt, mask, kind=kind))

    return jax.jit(jax.value_and_grad(f, (0, 1)))

  for kind, count in (("kl", 3), ("jsd", 4)):
    text = export.export(fwd_bwd(kind), platforms=("tpu",))(hs, ws).mlir_module()
    assert text.count("tpu_custom_call") == count, kind
  text = export.export(fwd_bwd("kl"), platforms=("cpu",))(hs, ws).mlir_module()
  assert "tpu_custom_call" not in text


#: Gemma-2 9B → 2B: student and teacher hidden sizes, vocabulary; 4 × 2048 bf16 target rows.
PAIR = dict(ds=2304, dt=3584, rows=8192, cols=256000)


@pytest.mark.parametrize("chip", ["TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU7x"])
def test_tiles_fit_the_chip_and_clear_its_ridge_where_they_can(chip):
  """At the Gemma-2 pair, per generation: every kernel's VMEM estimate within the share of
  the chip's VMEM; its intensity (grid-step FLOPs over streamed bytes, both heads) at the
  ridge point except where VMEM forbids the tile (v4's 16 MiB: the backward kernels)."""
  c = pt.CHIPS[chip]
  ds, dt = PAIR["ds"], PAIR["dt"]
  row_bytes = col_bytes = 2 * (ds + dt)
  for kernel in ptd.KERNELS:
    tm, tv = ptd.tiles(c, kernel, ds, dt, row_bytes, col_bytes, PAIR["rows"], PAIR["cols"])
    assert tm % 8 == 0 and tv % 128 == 0 and tm >= 8 and tv >= 128
    vmem = ptd.vmem_estimate(kernel, tm, tv, ds, dt, row_bytes, col_bytes)
    assert vmem <= pt.VMEM_SHARE * c.vmem, (kernel, tm, tv, vmem)
    fpc = ptd.flops_per_column(kernel, ds, dt)
    intensity = fpc * (tv / (row_bytes + 32) if kernel == "weight" else tm / col_bytes)
    if chip != "TPU v4" or kernel in ("fwd", "jsd"):
      assert intensity >= c.ridge, (kernel, tm, tv, intensity, c.ridge)
  # Overrides win, rounded up to 8 rows / 128 columns and capped by the problem.
  assert ptd.tiles(c, "fwd", ds, dt, row_bytes, col_bytes, 20, 300, 10, 200) == (16, 256)


def test_cost_estimate_counts_the_kernel_bodies_matmuls():
  """Each Mosaic call's declared ``pl.CostEstimate`` FLOPs equal its body's matmuls × grid,
  and the forward + backward total is ``(6 (Ds + Dt) + 4 Ds)·rows·cols`` (padded)."""
  from jax.extend import core

  hs, ws, ht, wt = make(0)
  mask = jnp.asarray(MASK)

  def f(hs, ws):
    return jnp.sum(linear_distill_loss(hs, ws, ht, wt, mask, kind="kl",
                                       implementation="pallas_tpu", **EVEN))  # fmt: skip

  jaxpr = jax.make_jaxpr(jax.value_and_grad(f, (0, 1)))(hs, ws).jaxpr

  def subs(eqn):
    for v in eqn.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        if isinstance(sub, core.ClosedJaxpr):
          yield sub.jaxpr
        elif isinstance(sub, core.Jaxpr):
          yield sub

  def dots(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        depth = int(np.prod([eqn.invars[0].aval.shape[k] for k in contract]))
        total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * depth
      total += sum(dots(s) for s in subs(eqn))
    return total

  def calls(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call" and eqn.params["interpret"] is False:
        yield eqn
      for s in subs(eqn):
        yield from calls(s)

  found = list(calls(jaxpr))
  assert len(found) == 3
  total = 0
  for eqn in found:
    grid = int(np.prod(eqn.params["grid_mapping"].grid))
    flops = dots(eqn.params["jaxpr"]) * grid
    assert eqn.params["cost_estimate"].flops == flops
    assert eqn.params["cost_estimate"].bytes_accessed > 0
    total += flops
  ds, dt = 128, 128  # padded hidden sizes
  assert total == (6 * (ds + dt) + 4 * ds) * 16 * V
