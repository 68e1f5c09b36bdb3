"""The ``"pallas_tpu"`` implementation of fused distillation: a Pallas Mosaic kernel pair.

:func:`jaxnll.fused.linear_distill_loss` with ``implementation="pallas_tpu"`` (and ``"auto"``
on TPU).  Both heads' compacted target rows are gathered once (``[R, Ds]`` and ``[R, Dt]``,
zero past the last target, ``R`` a multiple of every kernel's row block; the compaction is
:class:`jaxnll.fused.compact.Compacted`, one per head, one order), then kernels run over
``(row block, vocabulary tile)`` grids, the vocabulary of **both** heads streamed through VMEM
in tiles of ``tv`` columns (``[Ds, tv]`` and ``[Dt, tv]``, or ``[tv, D]`` rows of a ``[V, D]``
table read in place):

* **forward** (``fwd``): per row block, for each tile both scored logit tiles ``z_s = h_s W_s /
  τ`` and ``z_t = h_t W_t / τ`` (soft-cap and biases first, when given), then online in f32
  VMEM scratch both running maxima and sums of ``exp(z - m)`` and the one running weighted sum
  the divergence needs — ``Σ e_t (z_s - m_t)`` (``"ce"``), ``Σ e_t (z_t - z_s)`` (``"kl"``),
  ``Σ e_s (z_s - z_t)`` (``"reverse_kl"``) — rescaled when a maximum moves.  Neither logits
  tensor leaves VMEM.  The per-row lanes are combined over vocabulary shards and turned into
  the loss outside the kernel;
* **forward, second pass** (``jsd``): ``log m = log(β p_t + (1 - β) p_s)`` needs both final
  log-sum-exps, so ``"jsd"`` streams the tiles once more with them and sums
  ``Σ p_t (log p_t - log m)`` and ``Σ p_s (log p_s - log m)``;
* **backward, hidden** (``hidden``): per row block, the tiles again (both heads recomputed);
  each tile's ``g = scale · ∂D/∂z_s · dz/dx`` — ``p_s - p_t`` for ``"ce"`` / ``"kl"``,
  ``p_s (log p_s - log p_t - KL(p_s ‖ p_t))`` for ``"reverse_kl"``,
  ``(1 - β) p_s (log p_s - log m - KL(p_s ‖ m))`` for ``"jsd"``, times ``1/τ`` and the
  soft-cap's derivative — times the student's tile summed into an f32 ``[tm, Ds]`` VMEM block,
  written once in the hidden states' dtype;
* **backward, weight** (``weight``): per vocabulary tile, the row blocks; ``h_sᵀ g`` summed
  into an f32 ``[Ds, tv]`` (``[tv, Ds]``) accumulator, the bias gradient into ``[1, tv]``,
  cast once.

FLOPs for forward + backward in multiples of ``N·V``: ``2(Ds + Dt)`` forward (twice that for
``"jsd"``), ``2(Ds + Dt) + 2 Ds`` for each backward kernel: ``6(Ds + Dt) + 4 Ds`` in all
(``7.57·N·V·(Ds + Dt)`` at Gemma-2 9B → 2B).  **Why the hidden gradient is not folded into
the forward** (as the NLL's scalar kernel does): the entry returns per-sample values, so the
cotangent arrives after the forward, and folding would mean an unscaled f32 ``[N, Ds]``
residual kept from forward to backward; more to the point, ``∂D/∂z_s`` is not online for every
kind: ``"ce"`` / ``"kl"`` would need two ``[tm, Ds]`` accumulators (``Σ e_s W`` and
``Σ e_t W``, rescaled by different maxima), ``"reverse_kl"`` a third term weighted by
``z_s - z_t``, and ``"jsd"``'s ``log m`` needs both final log-sum-exps, so it cannot be
accumulated before the last tile at all.  For ``"ce"`` / ``"kl"`` the fold would drop the
hidden kernel (``2(Ds + Dt) + 2 Ds``) for two accumulator matmuls in the forward (``4 Ds``):
``2 Dt`` saved of ``6(Ds + Dt) + 4 Ds``, while the forward's VMEM grows by two f32
``[tm, Ds]`` blocks (on v4's 16 MiB that halves the row block and drops the forward below the
ridge point) and the ``custom_vjp`` carries an f32 ``[N, Ds]`` residual; not worth it here.

**Each tile is recomputed twice in the backward** (once per backward kernel), not once: one
backward kernel would keep ``∂W_s`` in VMEM (vocabulary outside, rows inside) and
read-modify-write the f32 ``∂h_s`` row block in HBM every grid step — an output block
revisited non-consecutively through an aliased input, which the automatic pipeline does not
order against its own prefetch when two or fewer row blocks are non-empty, and whose VMEM at
the tiles that clear the ridge point (``tv`` 512: intensity ``0.7·tv``) exceeds v4's 16 MiB.
Nor could either grid axis of that kernel be ``parallel``: both accumulate across the other
(``∂h_s`` over vocabulary tiles, ``∂W_s`` over row blocks), so a megacore chip (v4, v5p,
TPU7x) would run it on one of its two TensorCores, where the pair splits each kernel over
both.  On a single-core chip (v5e, v6e) at the Gemma-2 9B → 2B pair it would cut ``7.57`` to
``5.57·N·V·(Ds + Dt)`` and raise the modelled fraction on v5e from 0.47 to 0.64 (every kernel
there is compute-bound): the next step for those chips, with a manually double-buffered
``∂h_s`` copy (``memory_space=pl.ANY`` and semaphores).

**Tiles per TPU generation** from the chip table of :mod:`jaxnll.fused.pallas_tpu`
(:data:`~jaxnll.fused.pallas_tpu.CHIPS`, :func:`~jaxnll.fused.pallas_tpu.chip_of`: read from
the arguments' placement, so a deviceless compile for a named TPU gets its chip's tiles):
:func:`tiles` takes, per kernel, the smallest power-of-two reused tile (rows for the row-major
kernels, vocabulary columns for the weight kernel; at least the MXU width) whose arithmetic
intensity — FLOPs of a grid step over the bytes it streams, both heads counted — clears the
ridge point by 10 %, then the largest other tile whose VMEM estimate (:func:`vmem_estimate`)
fits :data:`~jaxnll.fused.pallas_tpu.VMEM_SHARE` of the chip's VMEM (halving the first while
even the smallest does not).  ``token_chunk=`` / ``vocab_chunk=`` override.  Every
``pallas_call`` declares a ``pl.CostEstimate`` (:func:`kernel_cost`); the row dimension of the
row-major kernels and the vocabulary dimension of the weight kernel are ``parallel``.

The number of non-empty row blocks is the scalar-prefetch operand: blocks past it do nothing
and start no DMA (index maps clamped), so the cost follows the target tokens.  Hidden sizes
are padded to multiples of 128 (each head its own), a last partial vocabulary tile is masked.
Rows without a cotangent (or past the targets) send back exactly 0, whatever they hold.
Off TPU the kernels run in Pallas interpret mode (:data:`INTERPRET`), which is how the tests
check them on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.fused import pallas_tpu
from jaxnll.fused.compact import Compacted, varying_axes

_MIB = 2**20
_LANES = 8  # lanes of the per-row operands and outputs
_NEG = float(jnp.finfo(jnp.float32).min)
#: How Pallas interprets the kernels off TPU: ``True`` or a ``pltpu.InterpretParams()``.
INTERPRET: bool | object = True
#: The kernels of the pair.
KERNELS = ("fwd", "jsd", "hidden", "weight")
#: f32 ``[tm, tv]`` temporaries a kernel body may hold at once (both logit tiles, both
#: exponentials, the gradient tile, masks), for the VMEM estimate.
TILE_TEMPS = 10
_TILES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: ``vmem_limit_bytes`` per kernel, overriding the rule (1.5× the VMEM estimate, at least 16 MiB).
VMEM_LIMIT: dict[str, int] = {}
#: Lanes of the backward's per-row operand: both maxima and log-sums, the cotangent, the
#: kind's own statistic (``KL(p_s ‖ p_t)`` / ``KL(p_s ‖ m)``), whether the row takes part.
_MS, _LSS, _MT, _LST, _SCALE, _R, _KEEP = range(7)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def flops_per_column(kernel: str, ds: int, dt: int, need_w: bool = True) -> int:
  """FLOPs of one row × one vocabulary column of kernel ``kernel``: both logits, and for the
  backward kernels one gradient matmul with the student's head."""
  both = 2 * (ds + dt)
  if kernel == "hidden" or (kernel == "weight" and need_w):
    return both + 2 * ds
  return both


def vmem_estimate(kernel: str, tm: int, tv: int, ds: int, dt: int, row_bytes: int,
                  col_bytes: int) -> int:  # fmt: skip
  """Bytes of VMEM ``kernel`` holds at tiles ``(tm, tv)``: double-buffered row blocks of both
  heads (``row_bytes`` per row) and weight tiles (``col_bytes`` per column), f32 tile
  temporaries, lane-padded per-row operands, accumulators and outputs."""
  lanes = tm * 128 * 4
  vmem = 2 * tm * row_bytes + 2 * tv * col_bytes + TILE_TEMPS * tm * tv * 4
  if kernel in ("fwd", "jsd"):
    vmem += 2 * lanes + 2 * lanes + 5 * lanes  # row operand, statistics out, accumulators
  elif kernel == "hidden":
    vmem += 2 * lanes + 2 * tm * ds * 4
  else:
    vmem += 2 * lanes + 3 * tv * ds * 4 + 3 * tv * 4  # f32 accumulator, output (at most f32)
  return vmem


def tiles(chip: pallas_tpu.Chip, kernel: str, ds: int, dt: int, row_bytes: int, col_bytes: int,
          rows: int, cols: int, token_chunk=None, vocab_chunk=None) -> tuple[int, int]:  # fmt: skip
  """``(tm, tv)`` of ``kernel`` on ``chip`` for ``rows`` target rows, ``cols`` vocabulary
  columns and (padded) hidden sizes ``ds``, ``dt``.

  A row-major kernel streams ``tv·col_bytes`` of weight per grid step for
  ``tm·tv·flops_per_column`` FLOPs: ``tm`` is the smallest power of two (at least the MXU
  width) whose intensity clears the ridge point by 10 %, ``tv`` the largest that fits; the
  weight kernel streams ``tm·row_bytes`` of rows per step: the same with the roles swapped.
  ``token_chunk`` / ``vocab_chunk`` override (rounded to 8 / 128)."""
  rows_cap = max(8, 1 << (_round_up(rows, 8) - 1).bit_length())
  cols_cap = _round_up(cols, 128)
  fpc = flops_per_column(kernel, ds, dt)
  streamed = row_bytes + _LANES * 4 if kernel == "weight" else col_bytes
  need = 1.1 * chip.ridge * streamed / fpc
  first = next((t for t in _TILES if t >= max(need, chip.mxu)), _TILES[-1])
  budget = int(pallas_tpu.VMEM_SHARE * chip.vmem)

  def fits(tm, tv):
    return vmem_estimate(kernel, tm, tv, ds, dt, row_bytes, col_bytes) <= budget

  def largest(fixed):  # the other tile, as large as fits
    for t in reversed(_TILES):
      if kernel == "weight":
        tm, tv = min(t, rows_cap), min(fixed, cols_cap)
      else:
        if t < 128:
          break
        tm, tv = min(fixed, rows_cap), min(t, cols_cap)
      if fits(tm, tv):
        return tm, tv
    return (8, min(fixed, cols_cap)) if kernel == "weight" else (min(fixed, rows_cap), 128)

  if kernel == "weight":
    tv = first if vocab_chunk is None else _round_up(vocab_chunk, 128)
    tm, tv = largest(tv)
    while vocab_chunk is None and tv > 128 and not fits(tm, tv):
      tm, tv = largest(tv // 2)
  else:
    tm = first if token_chunk is None else _round_up(token_chunk, 8)
    tm, tv = largest(tm)
    while token_chunk is None and tm > 8 and not fits(tm, tv):
      tm, tv = largest(tm // 2)
  if token_chunk is not None:
    tm = min(_round_up(token_chunk, 8), _round_up(rows, 8))
  if vocab_chunk is not None:
    tv = min(_round_up(vocab_chunk, 128), cols_cap)
  return tm, tv


def kernel_plan(base, token_chunk, vocab_chunk):
  """The :class:`~jaxnll.fused.distill.DistillPlan` of this implementation: the caller's tiles
  (``tm`` a multiple of 8, ``tv`` of 128) or, left unset (``token_chunk = 1``,
  ``vocab_chunk = 0``), each kernel's own from :func:`tiles` when traced."""
  tm = 1 if token_chunk is None else _round_up(token_chunk, 8)
  tv = 0 if vocab_chunk is None else _round_up(vocab_chunk, 128)
  return dataclasses.replace(
    base, implementation="pallas_tpu", token_chunk=tm, vocab_chunk=tv, grad_vocab_chunk=tv
  )


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static facts one kernel is specialised on."""

  kernel: str
  kind: str  # the divergence
  beta: float
  tm: int
  tv: int
  ds: int  # padded hidden sizes
  dt: int
  cols: int  # local vocabulary columns
  nv: int
  ni: int
  cdt_s: str  # matmul dtypes (rows and tiles in VMEM) and the heads' HBM dtypes
  cdt_t: str
  wdt_s: str
  wdt_t: str
  bias_s: bool
  bias_t: bool
  vd_s: bool
  vd_t: bool
  logit_softcap: float | None
  temperature: float
  vmem: int
  need_w: bool = True
  dh_itemsize: int = 4  # the hidden-gradient kernel's output

  @property
  def ragged(self) -> bool:
    return self.cols % self.tv != 0

  @property
  def row_bytes(self) -> int:
    return self.ds * jnp.dtype(self.cdt_s).itemsize + self.dt * jnp.dtype(self.cdt_t).itemsize

  @property
  def col_bytes(self) -> int:
    bias = 4 * (int(self.bias_s) + int(self.bias_t))
    heads = self.ds * jnp.dtype(self.wdt_s).itemsize + self.dt * jnp.dtype(self.wdt_t).itemsize
    return heads + bias


def kernel_cost(cfg: _Config) -> tuple[int, int, int]:
  """``(flops, transcendentals, bytes)`` of one call of ``cfg.kernel`` from its grid and
  blocks, every row block counted (the bound for a full span).  A block is fetched when its
  index changes between grid steps: row-major kernels fetch both weight tiles every step and
  the row blocks once per row block, the weight kernel the other way round."""
  tm, tv, steps = cfg.tm, cfg.tv, cfg.ni * cfg.nv
  flops = steps * tm * tv * flops_per_column(cfg.kernel, cfg.ds, cfg.dt, cfg.need_w)
  per_elem = {"fwd": 2, "jsd": 5, "hidden": 2, "weight": 2}[cfg.kernel]
  per_elem += 2 * int(cfg.logit_softcap is not None)
  trans = steps * tm * tv * per_elem + (steps * tm * 2 * 128 if cfg.kernel == "fwd" else 0)
  lanes = tm * _LANES * 4
  if cfg.kernel == "weight":
    out = tv * cfg.ds * jnp.dtype(cfg.wdt_s).itemsize if cfg.need_w else 0
    out += tv * 4 if cfg.bias_s else 0
    nbytes = steps * (tm * cfg.row_bytes + lanes) + cfg.nv * (tv * cfg.col_bytes + out)
  else:
    row_in = tm * cfg.row_bytes + (lanes if cfg.kernel != "fwd" else 0)
    out = tm * cfg.ds * cfg.dh_itemsize if cfg.kernel == "hidden" else lanes
    nbytes = steps * tv * cfg.col_bytes + cfg.ni * (row_in + out)
  return flops, trans, nbytes


def _cost_estimate(cfg: _Config) -> pl.CostEstimate:
  flops, trans, nbytes = kernel_cost(cfg)
  return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _compiler_params(cfg: _Config):
  """The outer grid axis ``parallel`` (rows, or the weight kernel's vocabulary tiles: a
  megacore chip splits them), the inner ``arbitrary``; a VMEM limit of 1.5× the estimate, at
  least 16 MiB, within the chip's VMEM."""
  need = vmem_estimate(cfg.kernel, cfg.tm, cfg.tv, cfg.ds, cfg.dt, cfg.row_bytes, cfg.col_bytes)
  limit = VMEM_LIMIT.get(cfg.kernel) or min(cfg.vmem, max(16 * _MIB, need * 3 // 2))
  return pltpu.CompilerParams(
    dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=int(limit)
  )


# ----------------------------------------------------------------------------- kernel bodies


def _dot(a, b, contract):
  precision = lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32,
                         precision=precision)  # fmt: skip


def _lane(x, k):
  """Column ``k`` of a ``[rows, lanes]`` value as ``[rows, 1]``."""
  lane = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(lane == k, x, 0.0), axis=1, keepdims=True)


def _lanes(shape, values):
  """A ``[rows, lanes]`` f32 value holding ``values`` (each ``[rows, 1]``) in its first lanes."""
  lane = lax.broadcasted_iota(jnp.int32, shape, 1)
  out = jnp.zeros(shape, F32)
  for k, v in enumerate(values):
    out = jnp.where(lane == k, v, out)
  return out


def _split(cfg: _Config, refs):
  """``((hs, ws, bs, ht, wt, bt), rest)`` of a kernel's refs (after the scalar prefetch)."""
  refs = list(refs)
  hs, ws = refs.pop(0), refs.pop(0)
  bs = refs.pop(0) if cfg.bias_s else None
  ht, wt = refs.pop(0), refs.pop(0)
  bt = refs.pop(0) if cfg.bias_t else None
  return (hs, ws, bs, ht, wt, bt), refs


def _logits(cfg: _Config, h_ref, w_ref, b_ref, j, vd: bool, cdt: str):
  """``(h, w, z)``: a head's rows, weight tile (columns past the weight zeroed) and scored
  f32 logits ``[tm, tv]``."""
  h = h_ref[...]
  w = w_ref[...].astype(cdt)
  if cfg.ragged:
    wcol = j * cfg.tv + lax.broadcasted_iota(jnp.int32, w.shape, 0 if vd else 1)
    w = jnp.where(wcol < cfg.cols, w, jnp.zeros((), w.dtype))
  z = _dot(h, w, ((1,), (1,)) if vd else ((1,), (0,)))
  if b_ref is not None:
    z = z + b_ref[...].astype(F32)
  if cfg.logit_softcap is not None:
    z = cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)
  if cfg.temperature != 1.0:
    z = z / cfg.temperature
  return h, w, z


def _both(cfg: _Config, heads, j):
  """Both heads' tiles at vocabulary tile ``j``: ``(h_s, w_s, z_s, z_t, real)``."""
  hs, ws, bs, ht, wt, bt = heads
  h_s, w_s, zs = _logits(cfg, hs, ws, bs, j, cfg.vd_s, cfg.cdt_s)
  _, _, zt = _logits(cfg, ht, wt, bt, j, cfg.vd_t, cfg.cdt_t)
  col = j * cfg.tv + lax.broadcasted_iota(jnp.int32, zs.shape, 1)
  return h_s, w_s, zs, zt, col < cfg.cols


def _log_m(cfg: _Config, lps, lpt):
  """``log(β p_t + (1 - β) p_s)`` from both log-probabilities."""
  if cfg.beta == 0.0:
    return lps
  if cfg.beta == 1.0:
    return lpt
  a, b = math.log(cfg.beta) + lpt, math.log1p(-cfg.beta) + lps
  top = jnp.maximum(a, b)
  return top + jnp.log(jnp.exp(a - top) + jnp.exp(b - top))


def _terms(p, a, b, real):
  """``Σ_v p (a - b)`` per row ``[tm, 1]`` over real columns, 0 where ``p = 0``."""
  return jnp.sum(jnp.where(real & (p > 0), p * (a - b), 0.0), axis=1, keepdims=True)


def _forward_kernel(cfg: _Config, s_ref, *refs):
  heads, refs = _split(cfg, refs)
  out_ref, ms_ref, ls_ref, mt_ref, lt_ref, acc_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    ms_ref[...] = jnp.full(ms_ref.shape, _NEG, F32)
    mt_ref[...] = jnp.full(mt_ref.shape, _NEG, F32)
    for r in (ls_ref, lt_ref, acc_ref):
      r[...] = jnp.zeros(r.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, _, zs, zt, real = _both(cfg, heads, j)
    zs_r, zt_r = jnp.where(real, zs, _NEG), jnp.where(real, zt, _NEG)
    ms, mt = ms_ref[...], mt_ref[...]
    ms_new = jnp.maximum(ms, jnp.max(zs_r, axis=1, keepdims=True))
    mt_new = jnp.maximum(mt, jnp.max(zt_r, axis=1, keepdims=True))
    es = jnp.where(real, jnp.exp(zs_r - ms_new[:, :1]), 0.0)
    et = jnp.where(real, jnp.exp(zt_r - mt_new[:, :1]), 0.0)
    rs, rt = jnp.exp(ms - ms_new), jnp.exp(mt - mt_new)
    ls, lt, acc = ls_ref[...], lt_ref[...], acc_ref[...]
    if cfg.kind == "ce":  # Σ e_t (z_s - m_t), moved to the new teacher maximum
      moved = jnp.where(lt > 0, rt * (acc + lt * (mt - mt_new)), 0.0)
      acc_ref[...] = moved + _terms(et, zs, mt_new[:, :1], real)
    elif cfg.kind == "kl":  # Σ e_t (z_t - z_s)
      acc_ref[...] = rt * acc + _terms(et, zt, zs, real)
    elif cfg.kind == "reverse_kl":  # Σ e_s (z_s - z_t)
      acc_ref[...] = rs * acc + _terms(es, zs, zt, real)
    ls_ref[...] = ls * rs + jnp.sum(es, axis=1, keepdims=True)
    lt_ref[...] = lt * rt + jnp.sum(et, axis=1, keepdims=True)
    ms_ref[...] = ms_new
    mt_ref[...] = mt_new

  @pl.when(j == cfg.nv - 1)
  def _():
    values = [r[...][:, :1] for r in (ms_ref, ls_ref, mt_ref, lt_ref, acc_ref)]
    out_ref[...] = _lanes(out_ref.shape, values)


def _jsd_kernel(cfg: _Config, s_ref, *refs):
  heads, refs = _split(cfg, refs)
  r_ref, out_ref, kt_ref, ks_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    kt_ref[...] = jnp.zeros(kt_ref.shape, F32)
    ks_ref[...] = jnp.zeros(ks_ref.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, _, zs, zt, real = _both(cfg, heads, j)
    r = r_ref[...]
    lps, lpt = zs - _lane(r, 0), zt - _lane(r, 1)
    lm = _log_m(cfg, lps, lpt)
    kt_ref[...] += _terms(jnp.exp(lpt), lpt, lm, real)
    ks_ref[...] += _terms(jnp.exp(lps), lps, lm, real)

  @pl.when(j == cfg.nv - 1)
  def _():
    out_ref[...] = _lanes(out_ref.shape, [kt_ref[...][:, :1], ks_ref[...][:, :1]])


def _logit_grad(cfg: _Config, zs, zt, real, r):
  """``scale · ∂D/∂x_s`` of a tile (raw student logits ``x_s``), f32; exactly 0 in rows not
  kept (no cotangent, past the targets) and in columns past the vocabulary."""
  lps = zs - _lane(r, _MS) - _lane(r, _LSS)
  ps = jnp.exp(lps)
  lpt = zt - _lane(r, _MT) - _lane(r, _LST)
  if cfg.kind in ("ce", "kl"):
    dz = ps - jnp.exp(lpt)
  elif cfg.kind == "reverse_kl":
    dz = jnp.where(ps > 0, ps * ((lps - lpt) - _lane(r, _R)), 0.0)
  else:
    lm = _log_m(cfg, lps, lpt)
    dz = (1.0 - cfg.beta) * jnp.where(ps > 0, ps * ((lps - lm) - _lane(r, _R)), 0.0)
  g = dz * _lane(r, _SCALE)
  if cfg.logit_softcap is not None:
    capped = zs if cfg.temperature == 1.0 else zs * cfg.temperature
    g = g * (1.0 - jnp.square(capped / cfg.logit_softcap))
  if cfg.temperature != 1.0:
    g = g * (1.0 / cfg.temperature)
  return jnp.where(real & (_lane(r, _KEEP) > 0.5), g, 0.0)


def _hidden_kernel(cfg: _Config, s_ref, *refs):
  heads, refs = _split(cfg, refs)
  r_ref, dh_ref, *acc = refs
  acc_ref = acc[0] if acc else dh_ref  # an f32 output accumulates in place
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, w, zs, zt, real = _both(cfg, heads, j)
    g = _logit_grad(cfg, zs, zt, real, r_ref[...])
    acc_ref[...] += _dot(g.astype(w.dtype), w, ((1,), (0,)) if cfg.vd_s else ((1,), (1,)))

  if acc:

    @pl.when(j == cfg.nv - 1)
    def _():
      dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _weight_kernel(cfg: _Config, s_ref, *refs):
  heads, refs = _split(cfg, refs)
  r_ref, *refs = refs
  n_out = int(cfg.need_w) + int(cfg.bias_s)
  outs, accs = refs[:n_out], refs[n_out:]
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    for acc in accs:
      acc[...] = jnp.zeros(acc.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    h, _, zs, zt, real = _both(cfg, heads, j)
    r = r_ref[...]
    g = _logit_grad(cfg, zs, zt, real, r)
    k = 0
    if cfg.need_w:
      # A row without cotangent may hold anything (NaN): zero, not 0·NaN, in the product.
      h = jnp.where(_lane(r, _KEEP) > 0.5, h, jnp.zeros((), h.dtype))
      a, b = (g.astype(h.dtype), h) if cfg.vd_s else (h, g.astype(h.dtype))
      accs[0][...] += _dot(a, b, ((0,), (0,)))
      k = 1
    if cfg.bias_s:
      accs[k][...] += jnp.sum(g, axis=0, keepdims=True)

  @pl.when(i == cfg.ni - 1)
  def _():
    for out, acc in zip(outs, accs, strict=True):
      out[...] = acc[...].astype(out.dtype)


# ----------------------------------------------------------------------------- operands


class _Operands:
  """The kernels' inputs for one call: both heads' gathered rows (``[R, D]``, zero past the
  last target), weights, biases, and each kernel's configuration."""

  def __init__(self, plan, s: Compacted, t: Compacted, kernels, need_w: bool = True):
    self.s, self.t = s, t
    rows = s.valid.shape[0]
    ds, dt = s.hidden.shape[1], t.hidden.shape[1]
    dsp, dtp = _round_up(ds, 128), _round_up(dt, 128)
    self.chip = pallas_tpu.chip_of(s.hidden, s.weight, t.hidden, t.weight)
    self.vma = s.vma | t.vma
    user_tm = None if plan.token_chunk <= 1 else plan.token_chunk
    user_tv = plan.vocab_chunk or None
    cs, ct = jnp.dtype(s.cdt), jnp.dtype(t.cdt)
    ws_dt, wt_dt = jnp.dtype(s.weight.dtype), jnp.dtype(t.weight.dtype)
    nbias = int(s.bias is not None) + int(t.bias is not None)
    row_bytes = dsp * cs.itemsize + dtp * ct.itemsize
    col_bytes = dsp * ws_dt.itemsize + dtp * wt_dt.itemsize + 4 * nbias
    self.tiles = {
      k: tiles(self.chip, k, dsp, dtp, row_bytes, col_bytes, rows, s.cols, user_tm, user_tv)
      for k in kernels
    }
    self.rows = rows
    self.prows = _round_up(rows, max(tm for tm, _ in self.tiles.values()))
    self.count = jnp.sum(s.valid, dtype=jnp.int32)
    valid = jnp.arange(self.prows, dtype=jnp.int32) < self.count
    order = jnp.pad(s.order, (0, self.prows - rows))

    def gather(bt: Compacted, dp):
      h = jnp.take(bt.hidden, order, axis=0)
      h = jnp.where(valid[:, None], h, jnp.zeros((), h.dtype)).astype(bt.cdt)
      d = bt.hidden.shape[1]
      h = jnp.pad(h, ((0, 0), (0, dp - d))) if dp != d else h
      pad = ((0, 0), (0, dp - d)) if bt.vd else ((0, dp - d), (0, 0))
      w = jnp.pad(bt.weight, pad) if dp != d else bt.weight
      b = None if bt.bias is None else bt.bias.astype(F32).reshape(1, -1)
      return h, w, b

    self.hs, self.ws, self.bs = gather(s, dsp)
    self.dh_dtype = jnp.dtype(s.hidden.dtype if plan.opts.vocab_axis is None else F32)
    self.ht, self.wt, self.bt = gather(t, dtp)
    self.cfgs = {
      k: _Config(
        kernel=k,
        kind=plan.kind,
        beta=float(plan.beta),
        tm=tm,
        tv=tv,
        ds=dsp,
        dt=dtp,
        cols=s.cols,
        nv=-(-s.cols // tv),
        ni=self.prows // tm,
        cdt_s=cs.name,
        cdt_t=ct.name,
        wdt_s=ws_dt.name,
        wdt_t=wt_dt.name,
        bias_s=s.bias is not None,
        bias_t=t.bias is not None,
        vd_s=bool(s.vd),
        vd_t=bool(t.vd),
        logit_softcap=plan.opts.logit_softcap,
        temperature=float(plan.opts.temperature),
        vmem=self.chip.vmem,
        need_w=need_w,
        dh_itemsize=self.dh_dtype.itemsize,
      )
      for k, (tm, tv) in self.tiles.items()
    }

  def varying(self, x):
    """``x`` varying over every mesh axis the call's inputs vary over (inside shard_map)."""
    missing = tuple(sorted(self.vma - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  def scalars(self, tm: int, *, interpret=False):
    """The scalar prefetch: non-empty row blocks of ``tm`` rows (Pallas' interpreter cannot
    index with a scalar varying over a shard_map axis: it then runs every block)."""
    count = ((self.count + tm - 1) // tm).astype(jnp.int32).reshape(1)
    if interpret and varying_axes(count):
      return jnp.full((1,), self.prows // tm, jnp.int32)
    return count

  def inputs(self, *extra):
    arrays = (self.hs, self.ws, self.bs, self.ht, self.wt, self.bt) + extra
    return [self.varying(x) for x in arrays if x is not None]

  def out(self, shape, dtype):
    mat = jax.typeof(self.varying(self.ws)).manual_axis_type
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)

  def specs(self, cfg: _Config, row_major: bool, *extra_rows):
    """Block specs of ``(h_s, w_s, [b_s], h_t, w_t, [b_t], *extra_rows)`` on a grid
    ``(i, j)`` (``row_major``) or ``(j, i)``; rows clamped to the last non-empty block and
    tiles held while a row block is empty, so skipped blocks start no DMA."""

    def ij(a, b):
      return (a, b) if row_major else (b, a)

    def row(a, b, s):
      i, _ = ij(a, b)
      return (jnp.minimum(i, jnp.maximum(s[0] - 1, 0)), 0)

    def tile(a, b, s):
      i, j = ij(a, b)
      return jnp.where(i < s[0], j, cfg.nv - 1) if row_major else j

    def head(d, vd, bias):
      block = (cfg.tv, d) if vd else (d, cfg.tv)
      w = pl.BlockSpec(block, (lambda a, b, s: (tile(a, b, s), 0)) if vd else
                       (lambda a, b, s: (0, tile(a, b, s))))  # fmt: skip
      out = [pl.BlockSpec((cfg.tm, d), row), w]
      if bias:
        out.append(pl.BlockSpec((1, cfg.tv), lambda a, b, s: (0, tile(a, b, s))))
      return out

    specs = head(cfg.ds, cfg.vd_s, cfg.bias_s) + head(cfg.dt, cfg.vd_t, cfg.bias_t)
    return specs + [pl.BlockSpec((cfg.tm, width), row) for width in extra_rows]

  def call(self, cfg: _Config, kernel_fn, extra, out_specs, out_shape, scratch, name):
    """One ``pallas_call`` of ``kernel_fn``: Mosaic on TPU, interpret mode elsewhere."""
    row_major = cfg.kernel != "weight"
    grid = (cfg.ni, cfg.nv) if row_major else (cfg.nv, cfg.ni)

    def run(scalars, *args, interpret):
      spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=grid,
        in_specs=self.specs(cfg, row_major, *(_LANES for _ in extra)),
        out_specs=out_specs,
        scratch_shapes=scratch,
      )
      return pl.pallas_call(
        functools.partial(kernel_fn, cfg),
        out_shape=out_shape,
        grid_spec=spec,
        compiler_params=_compiler_params(cfg),
        cost_estimate=_cost_estimate(cfg),
        interpret=interpret,
        name=name,
      )(scalars, *args)

    args = self.inputs(*extra)
    return lax.platform_dependent(
      *args,
      tpu=lambda *a: run(self.scalars(cfg.tm), *a, interpret=False),
      default=lambda *a: run(self.scalars(cfg.tm, interpret=True), *a, interpret=INTERPRET),
    )

  def row_call(self, cfg: _Config, kernel_fn, extra, width, dtype, n_scratch, name):
    """A row-major kernel with one ``[R, width]`` output and ``n_scratch`` per-row f32
    accumulators."""
    (out,) = self.call(
      cfg,
      kernel_fn,
      extra,
      [pl.BlockSpec((cfg.tm, width), lambda i, j, s: (i, 0))],
      [self.out((self.prows, width), dtype)],
      [pltpu.VMEM((cfg.tm, 128), F32) for _ in range(n_scratch)],
      name,
    )
    return out


# ----------------------------------------------------------------------------- passes


def _combine(opts, m, total, acc, *, shift=False):
  """``(m, total, acc)`` over the vocabulary shards (the identity without a vocabulary axis);
  ``shift``: ``acc`` is relative to ``m`` and moves with it."""
  if opts.vocab_axis is None:
    return m, total, acc
  top = _core.all_max(m, opts)
  rescale = jnp.exp(m - top)
  if acc is not None:
    if shift:
      acc = jnp.where(total > 0, rescale * (acc + total * (m - top)), 0.0)
    else:
      acc = rescale * acc
    acc = _core.all_sum(acc, opts)
  return top, _core.all_sum(total * rescale, opts), acc


def forward(plan, s: Compacted, t: Compacted):
  """Compacted per-token ``(stats, loss)``: ``stats = (m_s, s_s, m_t, s_t, r)`` float32
  ``[rows]`` each over the whole vocabulary (``r``: the loss for ``"reverse_kl"``,
  ``KL(p_s ‖ m)`` for ``"jsd"``, else 0), zero past the last target — the residuals of every
  implementation of :func:`jaxnll.fused.linear_distill_loss`."""
  kind, opts = plan.kind, plan.opts
  kernels = ("fwd", "jsd") if kind == "jsd" else ("fwd",)
  ops = _Operands(plan, s, t, kernels)
  out = ops.row_call(ops.cfgs["fwd"], _forward_kernel, (), _LANES, F32, 5,
                     "jaxnll_fused_distill_fwd")[: ops.rows]  # fmt: skip
  ms, ss, mt, st, acc = (out[:, k] for k in range(5))
  ms, ss, acc_s = _combine(opts, ms, ss, acc if kind == "reverse_kl" else None)
  mt, st, acc_t = _combine(opts, mt, st, acc if kind in ("ce", "kl") else None, shift=kind == "ce")
  ok = s.valid
  ss_safe, st_safe = jnp.where(ok, ss, 1.0), jnp.where(ok, st, 1.0)
  lse_s, lse_t = ms + jnp.log(ss_safe), mt + jnp.log(st_safe)
  r = jnp.zeros_like(ms)
  if kind == "ce":  # lse_s - Σ p_t z_s = log s_s + (m_s - m_t) - Σ p_t (z_s - m_t)
    loss = jnp.log(ss_safe) + (ms - mt) - acc_t / st_safe
  elif kind == "kl":  # never negative, but for rounding
    loss = jnp.maximum(acc_t / st_safe + (lse_s - lse_t), 0.0)
  elif kind == "reverse_kl":
    loss = jnp.maximum(acc_s / ss_safe + (lse_t - lse_s), 0.0)
    r = loss
  else:
    lanes = jnp.stack([lse_s, lse_t] + [jnp.zeros_like(ms)] * (_LANES - 2), axis=1)
    lanes = jnp.pad(jnp.where(ok[:, None], lanes, 0.0), ((0, ops.prows - ops.rows), (0, 0)))
    out = ops.row_call(ops.cfgs["jsd"], _jsd_kernel, (lanes,), _LANES, F32, 2,
                       "jaxnll_fused_distill_jsd")[: ops.rows]  # fmt: skip
    kt, ks = _core.all_sum(out[:, 0], opts), _core.all_sum(out[:, 1], opts)
    kt, ks = jnp.maximum(kt, 0.0), jnp.maximum(ks, 0.0)
    loss = plan.beta * kt + (1.0 - plan.beta) * ks
    r = ks
  stats = tuple(jnp.where(ok, x, 0.0) for x in (ms, ss, mt, st, r))
  return stats, jnp.where(ok, loss, 0.0)


def backward(plan, s: Compacted, t: Compacted, scale_c, stats_c, need):
  """Gradients of ``Σ scale·D`` for the student's (hidden compacted ``[rows, Ds]`` in the hidden
  states' dtype — f32 under a vocabulary axis, whose shards' parts are summed after —, head
  in its layout and dtype, bias f32): the hidden-gradient kernel and the weight-gradient
  kernel, each skipped when its gradient is not needed (``None``)."""
  need_h, need_w, need_b = need[0], need[1], need[2] and s.bias is not None
  kernels = (("hidden",) if need_h else ()) + (("weight",) if need_w or need_b else ())
  if not kernels:
    return None, None, None
  ops = _Operands(plan, s, t, kernels, need_w=need_w)
  ms, ss, mt, st, r = stats_c
  ok = s.valid
  keep = ok & (scale_c != 0)
  lanes = [ms, jnp.log(jnp.where(ok, ss, 1.0)), mt, jnp.log(jnp.where(ok, st, 1.0)), scale_c, r]
  lanes = jnp.stack(lanes + [keep.astype(F32), jnp.zeros_like(ms)], axis=1)
  lanes = jnp.pad(jnp.where(ok[:, None], lanes, 0.0), ((0, ops.prows - ops.rows), (0, 0)))
  dh_c = dw = db = None
  ds = s.hidden.shape[1]
  if need_h:
    cfg = ops.cfgs["hidden"]
    # Summed in f32 in VMEM, written once in the hidden states' dtype (half the HBM of an f32
    # [R, Ds] for 16-bit states) — in f32 when the vocabulary shards' parts are summed after.
    dtype = ops.dh_dtype
    (dh_c,) = ops.call(
      cfg,
      _hidden_kernel,
      (lanes,),
      [pl.BlockSpec((cfg.tm, cfg.ds), lambda i, j, q: (i, 0))],
      [ops.out((ops.prows, cfg.ds), dtype)],
      [] if dtype == F32 else [pltpu.VMEM((cfg.tm, cfg.ds), F32)],
      "jaxnll_fused_distill_bwd_hidden",
    )
    dh_c = dh_c[: ops.rows, :ds]
  if need_w or need_b:
    cfg = ops.cfgs["weight"]
    out_shape, out_specs, scratch = [], [], []
    if need_w:
      shape, block = ((cfg.cols, cfg.ds), (cfg.tv, cfg.ds)) if cfg.vd_s else \
        ((cfg.ds, cfg.cols), (cfg.ds, cfg.tv))  # fmt: skip
      index = (lambda j, i, q: (j, 0)) if cfg.vd_s else (lambda j, i, q: (0, j))
      out_shape.append(ops.out(shape, s.weight.dtype))
      out_specs.append(pl.BlockSpec(block, index))
      scratch.append(pltpu.VMEM(block, F32))
    if cfg.bias_s:
      out_shape.append(ops.out((1, cfg.cols), F32))
      out_specs.append(pl.BlockSpec((1, cfg.tv), lambda j, i, q: (0, j)))
      scratch.append(pltpu.VMEM((1, cfg.tv), F32))
    outs = list(ops.call(cfg, _weight_kernel, (lanes,), out_specs, out_shape, scratch,
                         "jaxnll_fused_distill_bwd_weight"))  # fmt: skip
    if need_w:
      dw = outs.pop(0)
      if cfg.ds != ds:
        dw = dw[:, :ds] if cfg.vd_s else dw[:ds]
    if cfg.bias_s:
      db = outs.pop(0)[0] if need_b else None
  return dh_c, dw, db
