"""The ``"pallas_tpu"`` implementation: a Pallas Mosaic kernel set for TPU.

The compacted target rows are gathered once into ``[R, D]`` (zero past the last target; ``R``
a multiple of every kernel's row block), then kernels run over ``(row block, vocabulary
tile)`` grids, the vocabulary streamed through VMEM in ``[D, tv]`` tiles:

* **forward** (``stats``): per row block, an online log-sum-exp over the tiles (running
  maximum ``m``, sum ``s`` of ``exp(z - m)``), the target logit and, for label smoothing, the
  logit sum; the logits never leave VMEM.  Per-shard ``(m, s, z_y, Σz)`` are combined outside
  the kernel (the vocabulary-parallel collectives of :mod:`jaxnll._core`);
* **forward with the hidden gradient** (``fused``; the scalar entry, whose per-token loss
  weights are known before any logit, and the per-sample and per-token entries, whose
  per-row cotangent ``g`` comes later: ``∂ℓ/∂h`` below is linear in it, so the accumulator
  is the residual and the backward scales it): the same statistics and, flash-attention style, the
  unnormalised ``A = Σ_v exp(z_v - m)·c'_v·W_v`` in an f32 ``[tm, D]`` block rescaled by
  ``exp(m_old - m_new)`` whenever the maximum moves (``c'``: the soft-cap's derivative).
  ``∂ℓ/∂h`` is linear in it: ``scale/τ · ((1 + 2 z_loss·lse) e^{m - m*}/s* · A
  - (1 - α) c'_y W_y - α/V Σ_v W_v)`` (``m*, s*`` over every shard; ``W_y`` a gather);
* **backward, hidden** (``hidden``: the entropy, label smoothing under a soft-cap, or
  ``"auto"``'s per-sample entries, below): per row block, the tiles again;
  each tile's ``∂ℓ/∂z`` times the tile's weight columns summed into the f32 ``[tm, D]``
  output block;
* **backward, weight** (``weight``): per vocabulary tile, the row blocks; ``hᵀ · ∂ℓ/∂z``
  summed into an f32 ``[D, tv]`` accumulator (the bias gradient into ``[1, tv]``), cast once.

FLOPs for forward + backward, in multiples of ``N·D·V``: every entry 4 + 4 = **8** (each
logit tile computed twice: in the fused forward and in the weight-gradient kernel).  The
per-sample and per-token entries keep the f32 ``[N, D]`` accumulator from the forward to the
backward (``plan.hidden_grad_in_forward``, set by :func:`configure`; only when the hidden
states are differentiated — a frozen hidden runs the plain forward, 2 + 4).  Under
``implementation="auto"`` they run 2 + 4 + 4 = 10: the platform branches of
:func:`jax.lax.platform_dependent` must return residuals of one shape, and an ``[N, D]``
carry would then be allocated on every platform.
Why this split rather than one backward kernel feeding both accumulators: the fused forward
reads each weight tile once per row block for two matmuls (arithmetic intensity ``2·tm``
FLOP per byte) and the weight kernel each row block once per vocabulary tile for two
(``2·tv``), so both clear every generation's ridge point with tiles that fit v4's 16 MiB of
VMEM; a single backward kernel has to keep one of the two gradients in HBM and
read-modify-write it in f32 every grid step (intensity ``0.6·tile``), which on v4 at
``D = 4096`` cannot reach the ridge point within VMEM.  Label smoothing together with a
soft-cap needs a second ``[tm, D]`` accumulator (``Σ_v c'_v W_v``), as does the entropy: those
take the 10·N·D·V path (forward, hidden kernel, weight kernel).

**Tiles per TPU generation.** :data:`CHIPS` holds each generation's VMEM, MXU width, dense bf16
peak and HBM bandwidth (ridge point = peak / bandwidth); :func:`tiles` picks, per kernel, the
smallest power-of-two row block (vocabulary tile for the weight kernel) whose arithmetic
intensity clears the ridge point by 10 %, then the largest other tile whose VMEM estimate
(:func:`vmem_estimate`: double-buffered blocks, accumulators, f32 tile temporaries) stays
within 70 % of the chip's VMEM; the kernels ask for ``vmem_limit_bytes`` within capacity.
The generation is read from the devices the computation is placed on — the arguments'
sharding (a deviceless compile for a named TPU carries it), else the default backend — and an
unknown one gets :data:`UNKNOWN_CHIP` (16 MiB, MXU 256: fits every generation).  ``token_chunk=``
/ ``vocab_chunk=`` override every kernel's tiles.  Every ``pallas_call`` declares a
``pl.CostEstimate`` counted from its grid and blocks (:func:`kernel_cost`), which is also
what ``bench/roofline.py`` models.  The row dimension of the row-major kernels and the
vocabulary dimension of the weight kernel are ``parallel``: on a megacore chip (v4, v5p)
the two TensorCores split them.

The number of non-empty row blocks is the scalar-prefetch operand: blocks past it do no work
(``pl.when``) and their input index maps are clamped to the last real block, so they start no
DMA — context positions cost nothing (past the targets a kernel only writes its zero output
block).  Under a vocabulary axis the targets come as local ids and the shard's real-column
count as a small VMEM operand, so the scalar prefetch never varies over the vocabulary axis
(Pallas' interpreter, which the CPU tests use, cannot index with a varying scalar inside
``shard_map``; where the *span mask* varies over a mesh axis, the interpreted kernels run
every block instead — Mosaic on TPU always skips).

Bad input (DESIGN.md): a target id outside ``[0, V)`` whose loss is differentiated makes the
gradient rows of ``∂ℓ/∂z`` NaN (so its hidden gradient and the weight gradient); a row whose
cotangent is exactly 0 is zeroed before any product (its hidden state may be NaN), so it
leaks nothing.

A ``[V, D]`` head (``weight_layout="vd"``, an embedding table) is read in place in
``[tv, D]`` tiles (every matmul contracts ``D`` on the table's rows; no transposed copy) and
its gradient is written ``[V, D]``.  The temperature divides the (soft-capped) logits inside
the kernels, and the chain rule's ``1/τ`` is applied to each tile's ``∂ℓ/∂z``.  With
``plan.entropy`` the forward also sums ``exp(z - m)·(z - m)`` online (the entropy's
``nu``), and the backward adds each row's entropy cotangent times ``∂H/∂z``.

The vocabulary tiles are multiples of 128 columns; a last, partial tile is masked (its
columns never count), ``D`` is padded to a multiple of 128 when it is not one already.
Matmuls accumulate in f32 (``HIGHEST`` precision for f32 operands), as do every exp/log and
sum.

Off TPU the same kernels run in Pallas interpret mode (the branch is picked per platform
with :func:`jax.lax.platform_dependent`), which is how the tests check them on a CPU.

Reference: the Pallas TPU flash-attention kernels (``jax.experimental.pallas.ops.tpu``) for
the grid, scalar-prefetch and online-rescaling patterns; tokamax's and Levanter's TPU fused
cross-entropy kernels for the loss.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxnll import _core
from jaxnll._core import F32
from jaxnll.fused.compact import Compacted, Plan, varying_axes
from jaxnll.fused.kernel import Request

_MIB = 2**20
_STATS = 8  # lanes of the per-row statistics arrays
_NEG = float(jnp.finfo(jnp.float32).min)
#: How Pallas interprets the kernels off TPU: ``True`` (the generic interpreter) or a
#: ``pltpu.InterpretParams()`` (TPU semantics: DMAs, semaphores, races), which tests may set.
INTERPRET: bool | object = True


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, per chip: VMEM per TensorCore (bytes), MXU width, dense bf16 FLOP/s,
  HBM bytes/s, TensorCores per chip."""

  name: str
  vmem: int
  mxu: int
  peak: float
  hbm: float
  cores: int

  @property
  def ridge(self) -> float:
    """FLOPs per HBM byte above which the MXU, not the memory, bounds a kernel."""
    return self.peak / self.hbm


#: Every known generation, keyed by ``device.device_kind`` (published per-chip figures).
CHIPS = {
  "TPU v4": Chip("v4", 16 * _MIB, 128, 275e12, 1.2e12, 2),
  "TPU v5 lite": Chip("v5e", 128 * _MIB, 128, 197e12, 0.819e12, 1),
  "TPU v5": Chip("v5p", 64 * _MIB, 128, 459e12, 2.765e12, 2),
  "TPU v6 lite": Chip("v6e", 128 * _MIB, 256, 918e12, 1.64e12, 1),
  "TPU7x": Chip("tpu7x", 64 * _MIB, 256, 2307e12, 7.37e12, 2),
}
#: An unknown generation (or none known: interpret mode, an export without placed
#: arguments): the smallest VMEM and the widest MXU of the table, so its tiles fit every chip.
UNKNOWN_CHIP = Chip("unknown", 16 * _MIB, 256, 275e12, 1.2e12, 1)
#: Share of VMEM the tiles may plan for (the rest: the compiler's own scratch).
VMEM_SHARE = 0.7
#: The kernels: matmuls per logit tile (``stats``: the logits; ``fused``: logits and the
#: hidden-gradient accumulator; ``hidden`` / ``weight``: logits again and one gradient).
MATMULS = {"stats": 1, "fused": 2, "hidden": 2, "weight": 2}
_TILES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: ``vmem_limit_bytes`` per kernel kind, overriding the rule of ``_compiler_params``
#: (``bench/roofline.py`` sets one low to read the compiler's real VMEM use from its refusal).
VMEM_LIMIT: dict[str, int] = {}


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def chip_of(*arrays) -> Chip:
  """The generation the computation runs on: the device kind of the first argument placed on
  devices (its sharding's mesh; a deviceless compile carries it), else the default backend's
  first device when that is a TPU, else :data:`UNKNOWN_CHIP`."""
  for x in arrays:
    if x is None:
      continue
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if isinstance(mesh, jax.sharding.Mesh):
      device = mesh.devices.flat[0] if mesh.devices.size else None
    else:  # an AbstractMesh: its device kind, when the arguments are placed
      device = getattr(mesh, "abstract_device", None)
    kind = getattr(device, "device_kind", None)
    if kind:
      return CHIPS.get(kind, UNKNOWN_CHIP)
  if jax.default_backend() == "tpu":
    return CHIPS.get(jax.devices()[0].device_kind, UNKNOWN_CHIP)
  return UNKNOWN_CHIP


def vmem_estimate(kind: str, tm: int, tv: int, d: int, itemsize: int) -> int:
  """Bytes of VMEM kernel ``kind`` holds at tiles ``(tm, tv)``: double-buffered row, weight
  and output blocks, accumulators, lane-padded per-row operands and f32 tile temporaries."""
  lanes = tm * 128 * 4  # one [tm, 1..8] f32 / int32 operand padded to 128 lanes
  vmem = 2 * tm * d * itemsize + 2 * tv * d * itemsize + 6 * tm * tv * 4
  if kind in ("stats", "fused"):
    vmem += 2 * lanes + 2 * lanes + 5 * lanes  # targets, statistics out, five accumulators
  if kind == "fused":
    vmem += 2 * tm * d * 4  # the f32 hidden-gradient block
  if kind == "hidden":
    vmem += 4 * lanes + 2 * tm * d * 4
  if kind == "weight":
    vmem += 4 * lanes + tv * d * 4 + 2 * tv * d * itemsize
  return vmem


def _largest_fit(kind, fixed_rows, tm, tv, d, itemsize, budget, rows_cap, cols_cap):
  """The largest free tile (the other fixed) whose VMEM fits ``budget``."""
  free = [t for t in reversed(_TILES) if t >= 128 or fixed_rows]
  for t in free:
    a, b = (tm, t) if fixed_rows else (t, tv)
    a, b = min(a, rows_cap), min(b, cols_cap)
    if vmem_estimate(kind, a, b, d, itemsize) <= budget:
      return a, b
  return (tm, 128) if fixed_rows else (8, tv)


def tiles(
  chip: Chip,
  kind: str,
  d: int,
  itemsize: int,
  rows: int,
  cols: int,
  token_chunk=None,
  vocab_chunk=None,
) -> tuple[int, int]:
  """``(tm, tv)`` of kernel ``kind`` on ``chip`` for ``rows`` target rows, ``cols`` local
  vocabulary columns and a (padded) hidden size ``d``.

  Row-major kernels (``stats``, ``fused``, ``hidden``) read each weight tile once per row
  block: their arithmetic intensity is ``MATMULS[kind]·2·tm / itemsize`` FLOPs per byte, so
  ``tm`` is the smallest power of two (at least the MXU width) that clears the chip's ridge
  point by 10 %, and ``tv`` the largest that fits :data:`VMEM_SHARE` of the VMEM (``tm``
  halved while even 128 columns do not).  The weight kernel reads each row block once per
  vocabulary tile: the same rule with the roles swapped.  ``token_chunk`` / ``vocab_chunk``
  override (rounded to 8 / 128)."""
  rows_cap = max(8, 1 << (_round_up(rows, 8) - 1).bit_length())  # a power of two
  cols_cap = _round_up(cols, 128)
  need = 1.1 * chip.ridge * itemsize / (2 * MATMULS[kind])
  first = next((t for t in _TILES if t >= max(need, chip.mxu)), _TILES[-1])
  budget = int(VMEM_SHARE * chip.vmem)
  if kind == "weight":
    tv = first if vocab_chunk is None else _round_up(vocab_chunk, 128)
    tm, tv = _largest_fit(kind, False, 0, tv, d, itemsize, budget, rows_cap, cols_cap)
    while vocab_chunk is None and tv > 128 and vmem_estimate(kind, tm, tv, d, itemsize) > budget:
      tm, tv = _largest_fit(kind, False, 0, tv // 2, d, itemsize, budget, rows_cap, cols_cap)
  else:
    tm = first if token_chunk is None else _round_up(token_chunk, 8)
    tm, tv = _largest_fit(kind, True, tm, 0, d, itemsize, budget, rows_cap, cols_cap)
    while token_chunk is None and tm > 8 and vmem_estimate(kind, tm, tv, d, itemsize) > budget:
      tm //= 2
  if token_chunk is not None:
    tm = min(_round_up(token_chunk, 8), _round_up(rows, 8))
  if vocab_chunk is not None:
    tv = min(_round_up(vocab_chunk, 128), cols_cap)
  return tm, tv


def configure(plan: Plan, request: Request) -> Plan:
  """The plan with the caller's tiles (``tm`` a multiple of 8, ``tv`` of 128; ``request``:
  :class:`jaxnll.fused.kernel.Request`).  Left unset (``token_chunk = 1``,
  ``vocab_chunk = 0``), each kernel takes its own from :func:`tiles` when traced, where the
  arguments' devices are known."""
  token_chunk, vocab_chunk = request.token_chunk, request.vocab_chunk
  tm = 1 if token_chunk is None else _round_up(token_chunk, 8)
  tv = 0 if vocab_chunk is None else _round_up(vocab_chunk, 128)
  # The per-sample and per-token entries (no schedule): the forward carries the hidden
  # gradient where one [tm, D] accumulator holds it (8·N·D·V in all, not 10).
  carry = request.schedule is None and fuses_hidden_grad(plan)
  return dataclasses.replace(
    plan, token_chunk=tm, vocab_chunk=tv, grad_vocab_chunk=tv, hidden_grad_in_forward=carry
  )


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static shape and option facts one kernel is specialised on."""

  kind: str
  tm: int
  tv: int
  d: int  # padded hidden size
  cols: int  # local vocabulary columns (the weight's)
  vocab: int  # true vocabulary
  padded: bool  # some columns may be vocabulary padding
  nv: int  # vocabulary tiles
  ni: int  # row blocks
  cdt: str  # the matmul dtype (rows and weight tiles in VMEM)
  wdt: str  # the weight's dtype in HBM
  z_loss: float
  label_smoothing: float
  logit_softcap: float | None
  temperature: float
  bias: bool
  vd: bool  # the weight is [V, D]: tiles [tv, D]
  entropy: bool  # the forward keeps Σ exp(z - m)(z - m); the backward takes ∂H cotangents
  vmem: int  # the chip's VMEM per TensorCore

  @property
  def ragged(self) -> bool:  # the last tile reaches past the weight's columns
    return self.cols % self.tv != 0

  @property
  def precision(self):
    return lax.Precision.HIGHEST if jnp.dtype(self.cdt) == F32 else None


def kernel_cost(cfg: _Config, need_w: bool = True) -> tuple[int, int, int]:
  """``(flops, transcendentals, bytes)`` of one call of kernel ``cfg.kind`` from its grid and
  blocks, every row block counted (blocks past the targets are skipped at run time, so this
  is the bound for a full span).  Bytes: a block is fetched when its index changes between
  grid steps (row-major kernels: the weight tile every step, the row blocks once per row
  block; the weight kernel the other way round), outputs written once per block."""
  it, wit = jnp.dtype(cfg.cdt).itemsize, jnp.dtype(cfg.wdt).itemsize
  tm, tv, d, steps = cfg.tm, cfg.tv, cfg.d, cfg.ni * cfg.nv
  flops = steps * 2 * MATMULS[cfg.kind] * tm * tv * d
  if cfg.kind == "weight" and not need_w:
    flops = steps * 2 * tm * tv * d
  trans = steps * tm * tv * (1 + int(cfg.logit_softcap is not None))
  if cfg.kind in ("stats", "fused"):
    trans += steps * tm * 128  # the running maximum's rescale
  row_in = tm * d * it + tm * 4 + (tm * _STATS * 4 if cfg.kind in ("hidden", "weight") else 0)
  w_tile = tv * d * wit + (tv * 4 if cfg.bias else 0)
  if cfg.kind == "weight":
    out = (tv * d * wit if need_w else 0) + (tv * 4 if cfg.bias else 0)
    nbytes = steps * row_in + cfg.nv * (w_tile + out)
  else:
    out = {"stats": tm * _STATS * 4, "fused": tm * (_STATS + d) * 4, "hidden": tm * d * 4}
    nbytes = steps * w_tile + cfg.ni * (row_in + out[cfg.kind])
  return flops, trans, nbytes


def _cost_estimate(cfg: _Config, need_w: bool = True) -> pl.CostEstimate:
  flops, trans, nbytes = kernel_cost(cfg, need_w)
  return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _compiler_params(cfg: _Config, semantics):
  """Row (or vocabulary) blocks ``parallel`` (megacore splits them), the inner axis
  ``arbitrary``; a VMEM limit of 1.5× the estimate, at least 16 MiB, within the chip's VMEM."""
  need = vmem_estimate(cfg.kind, cfg.tm, cfg.tv, cfg.d, jnp.dtype(cfg.cdt).itemsize)
  limit = VMEM_LIMIT.get(cfg.kind) or min(cfg.vmem, max(16 * _MIB, need * 3 // 2))
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=int(limit))


def _dot(cfg: _Config, a, b, contract):
  return lax.dot_general(
    a, b, (contract, ((), ())), preferred_element_type=F32, precision=cfg.precision
  )


def _tile(cfg: _Config, lim_ref, h_ref, w_ref, b_ref, j):
  """One ``[tm, tv]`` tile: ``(h, w, z, col, real)``: rows, the weight tile (columns past the
  weight zeroed), capped f32 logits, local column ids, real-column mask (``lim_ref``: the
  shard's real column count, when the vocabulary is padded)."""
  h = h_ref[...]
  w = w_ref[...].astype(cfg.cdt)
  if cfg.ragged:
    wcol = j * cfg.tv + lax.broadcasted_iota(jnp.int32, w.shape, 0 if cfg.vd else 1)
    w = jnp.where(wcol < cfg.cols, w, jnp.zeros((), w.dtype))
  z = _dot(cfg, h, w, ((1,), (1,)) if cfg.vd else ((1,), (0,)))
  if cfg.bias:
    z = z + b_ref[...].astype(F32)
  if cfg.logit_softcap is not None:
    z = cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)
  if cfg.temperature != 1.0:
    z = z / cfg.temperature
  col = j * cfg.tv + lax.broadcasted_iota(jnp.int32, z.shape, 1)
  real = col < cfg.cols
  if cfg.padded:
    real = real & (col < lim_ref[...][:, :1])
  return h, w, z, col, real


def _cap_grad(cfg: _Config, z):
  """``c' = 1 - tanh²``: the soft-cap's derivative from the scored logits (1 without a cap)."""
  capped = z if cfg.temperature == 1.0 else z * cfg.temperature
  return 1.0 - jnp.square(capped / cfg.logit_softcap)


def _lane(x, k):
  """Column ``k`` of a ``[rows, lanes]`` value as ``[rows, 1]`` (a lane reduction)."""
  lane = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(lane == k, x, 0.0), axis=1, keepdims=True)


def _split(cfg: _Config, refs):
  """``(bias ref or None, limit ref or None, rest)`` of a kernel's refs after the weight."""
  b_ref, refs = (refs[0], refs[1:]) if cfg.bias else (None, refs)
  lim_ref, refs = (refs[0], refs[1:]) if cfg.padded else (None, refs)
  return b_ref, lim_ref, refs


def _forward_kernel(cfg: _Config, s_ref, h_ref, w_ref, *refs):
  b_ref, lim_ref, refs = _split(cfg, refs)
  y_ref, out_ref, *refs = refs
  a_ref = refs.pop(0) if cfg.kind == "fused" else None
  m_ref, l_ref, zy_ref, zs_ref, zd_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _NEG, F32)
    for r in (l_ref, zy_ref, zs_ref, zd_ref) + ((a_ref,) if a_ref is not None else ()):
      r[...] = jnp.zeros(r.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, w, z, col, real = _tile(cfg, lim_ref, h_ref, w_ref, b_ref, j)
    zr = jnp.where(real, z, _NEG)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(zr, axis=1, keepdims=True))
    e = jnp.where(real, jnp.exp(zr - m_new[:, :1]), 0.0)
    rescale = jnp.exp(m_prev - m_new)
    l_prev = l_ref[...]
    l_ref[...] = l_prev * rescale + jnp.sum(e, axis=1, keepdims=True)
    m_ref[...] = m_new
    if cfg.entropy:  # Σ exp(z - m)·(z - m), moved to the new max (0 before any column)
      moved = jnp.where(l_prev > 0, rescale * (zd_ref[...] + l_prev * (m_prev - m_new)), 0.0)
      part = jnp.where(e > 0, e * (zr - m_new[:, :1]), 0.0)
      zd_ref[...] = moved + jnp.sum(part, axis=1, keepdims=True)
    hit = real & (col == y_ref[...])
    zy_ref[...] += jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
    if cfg.label_smoothing:
      zs_ref[...] += jnp.sum(jnp.where(real, z, 0.0), axis=1, keepdims=True)
    if a_ref is not None:
      # Σ_{v ≠ y} exp(z_v - m)·c'_v·W_v: the target's column is added outside, in f32, so
      # that (p_y - 1)·W_y never comes from a difference of rounded terms.
      # (Columns past the weight may hold anything, NaN from a ragged bias tile included:
      # selected away, never multiplied by 0.)
      u = e if cfg.logit_softcap is None else e * _cap_grad(cfg, z)
      u = jnp.where(real & ~hit, u, 0.0)
      part = _dot(cfg, u.astype(w.dtype), w, ((1,), (0,)) if cfg.vd else ((1,), (1,)))
      a_ref[...] = a_ref[...] * rescale[:, :1] + part

  @pl.when(j == cfg.nv - 1)
  def _():
    lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
    m, s, zy, zs, zd = (r[...][:, :1] for r in (m_ref, l_ref, zy_ref, zs_ref, zd_ref))
    out = jnp.where(lane == 3, zs, jnp.where(lane == 4, zd, 0.0))
    out_ref[...] = jnp.where(lane == 0, m, jnp.where(lane == 1, s, jnp.where(lane == 2, zy, out)))


#: Lanes of the backward's per-row operand.
_M, _INV_S, _SCALE, _LSE, _KEEP, _NU, _SCALE_H, _BAD = range(_STATS)


def _logit_grad(cfg: _Config, z, col, real, r, y):
  """``scale · ∂ℓ/∂x (+ scale_h · ∂H/∂x)`` of a tile from the row operand ``r`` (lanes: m,
  1/s, scale, lse, keep, nu, scale_h, bad): zero in rows not kept (no cotangent, or past the
  targets), NaN in rows whose target id is bad and whose loss is differentiated."""
  m, inv_s, scale, lse, keep = (_lane(r, k) for k in range(5))
  p = jnp.exp(z - m) * inv_s
  q = p
  if cfg.z_loss:
    q = p * (1.0 + 2.0 * cfg.z_loss * lse)
  alpha = cfg.label_smoothing
  g = q - jnp.where(real & (col == y), 1.0 - alpha, 0.0)
  if alpha:
    g = g - alpha / cfg.vocab
  g = g * scale
  if cfg.entropy:  # ∂H/∂z = -p (z - m - nu)
    nu, scale_h = _lane(r, _NU), _lane(r, _SCALE_H)
    g = g - scale_h * jnp.where(p > 0, p * ((z - m) - nu), 0.0)
  if cfg.logit_softcap is not None:
    g = g * _cap_grad(cfg, z)
  if cfg.temperature != 1.0:
    g = g * (1.0 / cfg.temperature)
  g = jnp.where(_lane(r, _BAD) > 0.5, jnp.nan, g)
  return jnp.where(real & (keep > 0.5), g, 0.0)


def _hidden_grad_kernel(cfg: _Config, s_ref, h_ref, w_ref, *refs):
  b_ref, lim_ref, refs = _split(cfg, refs)
  y_ref, r_ref, dh_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    dh_ref[...] = jnp.zeros(dh_ref.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, w, z, col, real = _tile(cfg, lim_ref, h_ref, w_ref, b_ref, j)
    g = _logit_grad(cfg, z, col, real, r_ref[...], y_ref[...])
    dh_ref[...] += _dot(cfg, g.astype(w.dtype), w, ((1,), (0,)) if cfg.vd else ((1,), (1,)))


def _weight_grad_kernel(cfg: _Config, need_w: bool, s_ref, h_ref, w_ref, *refs):
  b_ref, lim_ref, refs = _split(cfg, refs)
  y_ref, r_ref, *refs = refs
  n_out = int(need_w) + int(cfg.bias)
  outs, accs = refs[:n_out], refs[n_out:]
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    for acc in accs:
      acc[...] = jnp.zeros(acc.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    h, w, z, col, real = _tile(cfg, lim_ref, h_ref, w_ref, b_ref, j)
    r = r_ref[...]
    g = _logit_grad(cfg, z, col, real, r, y_ref[...])
    k = 0
    if need_w:
      # A row without cotangent may hold anything (NaN): zero, not 0·NaN, in the product.
      h = jnp.where(_lane(r, _KEEP) > 0.5, h, jnp.zeros((), h.dtype))
      a, b = (g.astype(h.dtype), h) if cfg.vd else (h, g.astype(h.dtype))
      accs[0][...] += _dot(cfg, a, b, ((0,), (0,)))
      k = 1
    if cfg.bias:
      accs[k][...] += jnp.sum(g, axis=0, keepdims=True)

  @pl.when(i == cfg.ni - 1)
  def _():
    for out, acc in zip(outs, accs, strict=True):
      out[...] = acc[...].astype(out.dtype)


def _varying(bt: Compacted, x):
  """``x`` varying over every mesh axis the call's inputs vary over (inside ``shard_map``)."""
  missing = tuple(sorted(bt.vma - varying_axes(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


def _on_platform(fn, ops: _Operands, cfg: _Config, *args):
  """``fn(scalars, *args, interpret=...)``: Mosaic on TPU, Pallas interpret mode elsewhere."""
  return lax.platform_dependent(
    tpu=lambda: fn(ops.scalars(cfg.tm), *args, interpret=False),
    default=lambda: fn(ops.scalars(cfg.tm, interpret=True), *args, interpret=INTERPRET),
  )


class _Operands:
  """The kernels' inputs for one call (gathered rows, targets, weight, scalar prefetch) and
  each kernel's configuration (``kinds``: the kernels this call runs)."""

  def __init__(self, bt: Compacted, kinds):
    plan = bt.plan
    self.bt = bt
    rows = bt.valid.shape[0]
    d = bt.hidden.shape[1]
    dp = _round_up(d, 128)
    cdt = jnp.dtype(bt.cdt)
    self.chip = chip_of(bt.hidden, bt.weight)
    user_tm = None if plan.token_chunk <= 1 else plan.token_chunk
    user_tv = plan.vocab_chunk or None
    self.tiles = {
      k: tiles(self.chip, k, dp, cdt.itemsize, rows, bt.cols, user_tm, user_tv) for k in kinds
    }
    self.rows = rows
    self.prows = _round_up(rows, max(tm for tm, _ in self.tiles.values()))
    self.count = jnp.sum(bt.valid, dtype=jnp.int32)
    valid = jnp.arange(self.prows, dtype=jnp.int32) < self.count
    order = jnp.pad(bt.order, (0, self.prows - rows))
    h = jnp.take(bt.hidden, order, axis=0)
    h = jnp.where(valid[:, None], h, jnp.zeros((), h.dtype)).astype(cdt)
    self.h = jnp.pad(h, ((0, 0), (0, dp - d))) if dp != d else h
    pad = ((0, 0), (0, dp - d)) if bt.vd else ((0, dp - d), (0, 0))
    self.w = jnp.pad(bt.weight, pad) if dp != d else bt.weight
    self.b = None if bt.bias is None else bt.bias.astype(F32).reshape(1, -1)
    # Local ids: the shard offset stays out of the scalar prefetch (whose values must not
    # vary over the vocabulary axis for Pallas' interpreter under shard_map).
    local = bt.targets - jnp.asarray(bt.offset, jnp.int32)
    self.y = jnp.pad(local, (0, self.prows - rows)).reshape(-1, 1)
    self.limit = None
    if bt.padded:
      limit = jnp.asarray(bt.vocab, jnp.int32) - jnp.asarray(bt.offset, jnp.int32)
      self.limit = jnp.full((1, 128), limit, jnp.int32)
    opts = bt.opts
    self.cfgs = {
      k: _Config(
        kind=k,
        tm=tm,
        tv=tv,
        d=dp,
        cols=bt.cols,
        vocab=bt.vocab,
        padded=bool(bt.padded),
        nv=-(-bt.cols // tv),
        ni=self.prows // tm,
        cdt=cdt.name,
        wdt=jnp.dtype(bt.weight.dtype).name,
        z_loss=opts.z_loss,
        label_smoothing=opts.label_smoothing,
        logit_softcap=opts.logit_softcap,
        temperature=opts.temperature,
        bias=bt.bias is not None,
        vd=bool(bt.vd),
        entropy=bool(plan.entropy),
        vmem=self.chip.vmem,
      )
      for k, (tm, tv) in self.tiles.items()
    }

  def scalars(self, tm: int, *, interpret=False):
    """The scalar prefetch: non-empty row blocks of ``tm`` rows.  Pallas' interpreter cannot
    index with a scalar that varies over a shard_map axis (the span mask's, say): it then
    runs every block (past the targets they add zeros)."""
    count = ((self.count + tm - 1) // tm).astype(jnp.int32).reshape(1)
    if interpret and varying_axes(count):
      return jnp.full((1,), self.prows // tm, jnp.int32)
    return count

  def inputs(self, *extra):
    arrays = [x for x in (self.h, self.w, self.b, self.limit) if x is not None] + list(extra)
    return [_varying(self.bt, x) for x in arrays]

  def out(self, shape, dtype):
    """An output's type: varying like the weight (every axis of the call) under shard_map."""
    mat = jax.typeof(_varying(self.bt, self.w)).manual_axis_type
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)

  def specs(self, cfg: _Config, row_major: bool, *extra_rows):
    """Block specs of ``(h, w, [b], *extra_rows)`` on a grid ``(i, j)`` (``row_major``) or
    ``(j, i)``; row operands are clamped to the last non-empty block, the weight tile held
    when the row block is empty, so skipped blocks start no DMA."""

    def ij(a, b):
      return (a, b) if row_major else (b, a)

    def row(a, b, s):
      i, _ = ij(a, b)
      return (jnp.minimum(i, jnp.maximum(s[0] - 1, 0)), 0)

    def tile(a, b, s):
      i, j = ij(a, b)
      return jnp.where(i < s[0], j, cfg.nv - 1) if row_major else j

    def col(a, b, s):
      return (0, tile(a, b, s))

    def wcol(a, b, s):
      return (tile(a, b, s), 0) if cfg.vd else (0, tile(a, b, s))

    wblock = (cfg.tv, cfg.d) if cfg.vd else (cfg.d, cfg.tv)
    specs = [pl.BlockSpec((cfg.tm, cfg.d), row), pl.BlockSpec(wblock, wcol)]
    if cfg.bias:
      specs.append(pl.BlockSpec((1, cfg.tv), col))
    if cfg.padded:
      specs.append(pl.BlockSpec((1, 128), lambda a, b, s: (0, 0)))
    specs += [pl.BlockSpec((cfg.tm, width), row) for width in extra_rows]
    return specs


def _forward(ops: _Operands, kind: str = "stats"):
  """``[R, 8]`` f32 per-row local statistics, lanes ``(m, s, z_y, Σz, Σ exp(z - m)(z - m))``;
  with ``kind="fused"`` also the f32 ``[R, D]`` accumulator ``Σ_{v≠y} exp(z_v - m)·c'_v·W_v``."""
  cfg = ops.cfgs[kind]
  fused = kind == "fused"

  def run(scalars, *args, interpret):
    out_specs = [pl.BlockSpec((cfg.tm, _STATS), lambda i, j, s: (i, 0))]
    out_shape = [ops.out((ops.prows, _STATS), F32)]
    if fused:
      out_specs.append(pl.BlockSpec((cfg.tm, cfg.d), lambda i, j, s: (i, 0)))
      out_shape.append(ops.out((ops.prows, cfg.d), F32))
    spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(cfg.ni, cfg.nv),
      in_specs=ops.specs(cfg, True, 1),
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((cfg.tm, 128), F32) for _ in range(5)],
    )
    return pl.pallas_call(
      functools.partial(_forward_kernel, cfg),
      out_shape=out_shape,
      grid_spec=spec,
      compiler_params=_compiler_params(cfg, ("parallel", "arbitrary")),
      cost_estimate=_cost_estimate(cfg),
      interpret=interpret,
      name="jaxnll_fused_nll_fwd_dh" if fused else "jaxnll_fused_nll_fwd",
    )(scalars, *args)

  return _on_platform(run, ops, cfg, *ops.inputs(ops.y))


def _finish_forward(bt: Compacted, ops: _Operands, out):
  """``(stats, loss, local m, local z_y)`` from the forward's per-row lanes."""
  out = out[: ops.rows]
  m, s, zy, zs, zd = (out[:, k] for k in range(5))
  opts = bt.opts
  stats, lse, zs = bt.combine(
    m, s, zs if opts.label_smoothing else None, zd if bt.plan.entropy else None
  )
  zy_all = _core.all_sum(zy, opts)
  zy_all = jnp.where(_core.target_in_range(bt.targets, bt.vocab), zy_all, jnp.nan)
  loss = bt.token_loss(lse, zy_all, zs, bt.valid)
  fill = (0.0, 1.0, 0.0)
  stats = tuple(jnp.where(bt.valid, x, f) for x, f in zip(stats, fill, strict=False))
  return stats, loss, m, zy


def stats_pass(bt: Compacted):
  """Forward: ``(stats, loss [rows])``, float32, ``stats = (m, s[, nu])`` over all shards
  (:meth:`Compacted.combine`), each ``[rows]``."""
  ops = _Operands(bt, ("stats",))
  (out,) = _forward(ops)
  stats, loss, _, _ = _finish_forward(bt, ops, out)
  return stats, loss


def _bad_rows(bt: Compacted, scale_c):
  """Rows whose target id is outside ``[0, V)`` and whose loss is differentiated."""
  return bt.valid & ~_core.target_in_range(bt.targets, bt.vocab) & (scale_c != 0)


def _weight_kernel(ops: _Operands, r, need_w: bool):
  """The weight(-and-bias) gradient kernel: ``(dweight or None, dbias or None)``."""
  bt, cfg = ops.bt, ops.cfgs["weight"]
  out_shape, out_specs, scratch = [], [], []
  if need_w and cfg.vd:
    out_shape.append(ops.out((cfg.cols, cfg.d), bt.weight.dtype))
    out_specs.append(pl.BlockSpec((cfg.tv, cfg.d), lambda j, i, s: (j, 0)))
    scratch.append(pltpu.VMEM((cfg.tv, cfg.d), F32))
  elif need_w:
    out_shape.append(ops.out((cfg.d, cfg.cols), bt.weight.dtype))
    out_specs.append(pl.BlockSpec((cfg.d, cfg.tv), lambda j, i, s: (0, j)))
    scratch.append(pltpu.VMEM((cfg.d, cfg.tv), F32))
  if cfg.bias:
    out_shape.append(ops.out((1, cfg.cols), F32))
    out_specs.append(pl.BlockSpec((1, cfg.tv), lambda j, i, s: (0, j)))
    scratch.append(pltpu.VMEM((1, cfg.tv), F32))

  def run_w(scalars, *args, interpret):
    spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(cfg.nv, cfg.ni),
      in_specs=ops.specs(cfg, False, 1, _STATS),
      out_specs=out_specs,
      scratch_shapes=scratch,
    )
    return pl.pallas_call(
      functools.partial(_weight_grad_kernel, cfg, need_w),
      out_shape=out_shape,
      grid_spec=spec,
      compiler_params=_compiler_params(cfg, ("parallel", "arbitrary")),
      cost_estimate=_cost_estimate(cfg, need_w),
      interpret=interpret,
      name="jaxnll_fused_nll_bwd_weight",
    )(scalars, *args)

  outs = list(_on_platform(run_w, ops, cfg, *ops.inputs(ops.y, r)))
  dw = db = None
  if need_w:
    dw = outs.pop(0)
    d = bt.hidden.shape[1]
    if cfg.d != d:
      dw = dw[:, :d] if cfg.vd else dw[:d]
  if cfg.bias:
    db = outs.pop(0)[0]
  return dw, db


def _row_operand(bt: Compacted, ops: _Operands, scale_c, stats_c, entropy_scale_c=None):
  """The backward's ``[R, 8]`` per-row operand (lanes ``_M`` … ``_BAD``)."""
  m, s = stats_c[0], jnp.where(bt.valid, stats_c[1], 1.0)
  es = None
  if bt.plan.entropy:
    es = jnp.zeros_like(m) if entropy_scale_c is None else entropy_scale_c
  keep = bt.valid & ((scale_c != 0) | ((es != 0) if es is not None else False))
  nu = stats_c[2] if bt.plan.entropy else jnp.zeros_like(m)
  lanes = [m, 1.0 / s, scale_c, m + jnp.log(s), keep.astype(F32), nu]
  lanes += [jnp.zeros_like(m) if es is None else es, _bad_rows(bt, scale_c).astype(F32)]
  r = jnp.stack(lanes, axis=1)
  r = jnp.where(bt.valid[:, None], r, 0.0)
  return jnp.pad(r, ((0, ops.prows - ops.rows), (0, 0)))


def forward_with_hidden(bt: Compacted):
  """The forward of the per-sample and per-token entries when their hidden states are
  differentiated (``plan.hidden_grad_in_forward``): the fused forward kernel, whose
  statistics are :func:`stats_pass`'s and whose f32 ``[rows, D]`` accumulator (with the
  local row maximum and target logit) is the ``carry`` :func:`grad_pass` turns into the
  hidden gradient for any per-row cotangent — ``∂hidden`` is linear in it.  Returns
  ``(stats, loss, carry)``."""
  ops = _Operands(bt, ("fused",))
  out, acc = _forward(ops, "fused")
  stats, loss, m, zy = _finish_forward(bt, ops, out)
  return stats, loss, (m, zy, acc[: ops.rows, : bt.hidden.shape[1]])


def grad_pass(
  bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None, *, carry=None
):
  """Gradients of ``Σ scale·ℓ (+ Σ entropy_scale·H)``: the hidden-gradient kernel and the
  weight-gradient kernel (each skipped when its gradient is not needed).  ``dh_c`` is f32;
  ``dweight`` and ``dbias`` come in the weight's and f32.  With the ``carry`` of
  :func:`forward_with_hidden` the hidden gradient comes from it (no hidden kernel)."""
  need_h, need_w, need_b = need[0], need[1], need[2] and bt.bias is not None
  dh_c = dw = db = None
  if need_h and carry is not None:
    m, zy, acc = carry
    dh_c = _hidden_grad_from_forward(bt, scale_c, stats_c, m, zy, acc)
    need_h = False
  kinds = (("hidden",) if need_h else ()) + (("weight",) if need_w or need_b else ())
  if not kinds:
    return dh_c, None, None
  ops = _Operands(bt, kinds)
  r = _row_operand(bt, ops, scale_c, stats_c, entropy_scale_c)

  if need_h:
    cfg = ops.cfgs["hidden"]

    def run_h(scalars, *args, interpret):
      spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(cfg.ni, cfg.nv),
        in_specs=ops.specs(cfg, True, 1, _STATS),
        out_specs=pl.BlockSpec((cfg.tm, cfg.d), lambda i, j, s: (i, 0)),
      )
      return pl.pallas_call(
        functools.partial(_hidden_grad_kernel, cfg),
        out_shape=ops.out((ops.prows, cfg.d), F32),
        grid_spec=spec,
        compiler_params=_compiler_params(cfg, ("parallel", "arbitrary")),
        cost_estimate=_cost_estimate(cfg),
        interpret=interpret,
        name="jaxnll_fused_nll_bwd_hidden",
      )(scalars, *args)

    dh_c = _on_platform(run_h, ops, cfg, *ops.inputs(ops.y, r))
    d = bt.hidden.shape[1]
    if dh_c.shape != (ops.rows, d):
      dh_c = dh_c[: ops.rows, :d]

  if need_w or need_b:
    dw, db = _weight_kernel(ops, r, need_w)
    db = db if need_b else None
  return dh_c, dw, db


def fuses_hidden_grad(plan: Plan) -> bool:
  """Whether the scalar entry's forward also accumulates ``∂ℓ/∂h`` (8·N·D·V in all): not
  with the entropy, nor with label smoothing under a soft-cap (each would need a second
  ``[tm, D]`` accumulator)."""
  opts = plan.opts
  return not plan.entropy and not (opts.label_smoothing and opts.logit_softcap is not None)


def _hidden_grad_from_forward(bt: Compacted, scale_c, stats, m, zy, acc):
  """``∂(Σ scale·ℓ)/∂h`` (f32 ``[rows, D]``, this shard's part) from the fused forward's
  accumulator ``acc = Σ_{v≠y} exp(z_v - m)·c'_v·W_v`` (``m``: the local maximum, ``zy``: the
  local target logit, 0 where the target lies on another shard)."""
  opts, d = bt.opts, bt.hidden.shape[1]
  tau, alpha = opts.temperature, opts.label_smoothing
  top, total = stats[0], stats[1]
  lse = top + jnp.log(total)
  boost = 1.0 + 2.0 * opts.z_loss * lse if opts.z_loss else 1.0
  scale = scale_c / tau
  dh = (scale * boost * jnp.exp(m - top) / total)[:, None] * acc[: bt.valid.shape[0], :d]
  # The target's column: (p_y·(1 + 2 z_loss·lse) - (1 - α))·c'_y·W_y, in f32.
  local = bt.targets - jnp.asarray(bt.offset, jnp.int32)
  here = (local >= 0) & (local < bt.cols)
  safe = jnp.where(here, local, 0)
  wy = jnp.take(bt.weight, safe, axis=bt.wax).astype(F32)
  wy = wy if bt.vd else wy.T
  coef = jnp.exp(zy - lse) * boost - (1.0 - alpha)
  if opts.logit_softcap is not None:
    capped = zy * tau
    coef = coef * (1.0 - jnp.square(capped / opts.logit_softcap))
  dh = dh + jnp.where(here, scale * coef, 0.0)[:, None] * wy
  if alpha:  # - α/V Σ_v W_v over this shard's real columns (no cap: c' = 1)
    w = bt.weight.astype(F32)
    if bt.padded:
      real = _core.real_columns(bt.cols, bt.offset, bt.vocab)
      w = jnp.where(real[:, None] if bt.vd else real[None, :], w, 0.0)
    total_w = jnp.sum(w, axis=bt.wax)
    dh = dh - (scale * alpha / bt.vocab)[:, None] * total_w[None, :]
  keep = bt.valid & (scale_c != 0)
  dh = jnp.where(keep[:, None], dh, 0.0)
  return jnp.where(_bad_rows(bt, scale_c)[:, None], jnp.nan, dh)


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """The scalar entry (per-token loss weights known before the forward): the fused forward
  (statistics and ``∂ℓ/∂h``), then the weight-gradient kernel — 8·N·D·V FLOPs.  Where
  :func:`fuses_hidden_grad` says no (or ``∂ℓ/∂h`` is not wanted): the forward, then
  :func:`grad_pass`."""
  need_h, need_w, need_b = need[0], need[1], need[2] and bt.bias is not None
  if not (need_h and fuses_hidden_grad(bt.plan)):
    stats, loss = stats_pass(bt)
    return (stats, loss, *grad_pass(bt, scale_c, stats, need))
  kinds = ("fused",) + (("weight",) if need_w or need_b else ())
  ops = _Operands(bt, kinds)
  out, acc = _forward(ops, "fused")
  stats, loss, m, zy = _finish_forward(bt, ops, out)
  dh_c = _hidden_grad_from_forward(bt, scale_c, stats, m, zy, acc)
  dw = db = None
  if need_w or need_b:
    dw, db = _weight_kernel(ops, _row_operand(bt, ops, scale_c, stats), need_w)
    db = db if need_b else None
  return stats, loss, dh_c, dw, db
