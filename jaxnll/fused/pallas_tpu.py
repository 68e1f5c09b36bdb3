"""The ``"pallas_tpu"`` implementation: a Pallas Mosaic kernel set for TPU.

The compacted target rows are gathered once into ``[R, D]`` (zero past the last target; ``R``
a multiple of the row block ``tm``), then three kernels run over ``(row block, vocabulary
tile)`` grids, the vocabulary streamed through VMEM in ``[D, tv]`` tiles:

* **forward**: per row block, an online log-sum-exp over the tiles (running maximum ``m``, sum
  ``s`` of ``exp(z - m)``), the target logit and, for label smoothing, the logit sum; the
  logits never leave VMEM.  Per-shard ``(m, s, z_y, Σz)`` are combined outside the kernel
  (the vocabulary-parallel collectives of :mod:`jaxnll._core`);
* **backward, hidden**: per row block, the tiles again; each tile's ``∂ℓ/∂z`` (softmax
  ``exp(z - m) / s``) times the tile's weight columns is summed into an f32 ``[tm, D]`` VMEM
  accumulator;
* **backward, weight**: per vocabulary tile, the row blocks; ``hᵀ · ∂ℓ/∂z`` summed into an
  f32 ``[D, tv]`` accumulator (and the bias gradient into ``[1, tv]``), cast once.

Splitting the backward like the Pallas TPU flash-attention kernels (one kernel per gradient,
each owning its accumulator) recomputes the logits once more: 10·N·D·V FLOPs for forward +
backward, against 6 for a single pass that could keep neither accumulator in VMEM.

The number of non-empty row blocks is the scalar-prefetch operand: blocks past it do no work
(``pl.when``) and their input index maps are clamped to the last real block, so they start no
DMA — context positions cost nothing (past the targets a kernel only writes its zero output
block).  Under a vocabulary axis the targets come as local ids and the shard's real-column
count as a small VMEM operand, so the scalar prefetch never varies over the vocabulary axis
(Pallas' interpreter, which the CPU tests use, cannot index with a varying scalar inside
``shard_map``; where the *span mask* varies over a mesh axis, the interpreted kernels run
every block instead — Mosaic on TPU always skips).

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
the grid, scalar-prefetch and accumulator patterns; tokamax's and Levanter's TPU fused
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

#: Target rows per block (a multiple of 8; 256 fills the MXU on every TPU generation).
DEFAULT_BLOCK_ROWS = 256
#: Vocabulary columns per tile (a multiple of 128).
DEFAULT_VOCAB_TILE = 512
#: Upper bound asked of the compiler for the kernels' VMEM (tiles, accumulators, buffers).
MAX_VMEM_BYTES = 96 * 2**20
_STATS = 8  # lanes of the per-row statistics arrays
_NEG = float(jnp.finfo(jnp.float32).min)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def configure(plan: Plan, token_chunk, vocab_chunk, num_tokens: int, vocab: int) -> Plan:
  """The plan with this kernel's tiles: ``tm`` rows (multiple of 8), ``tv`` columns (of 128);
  ``vocab``: the head's local vocabulary columns."""
  tm = DEFAULT_BLOCK_ROWS if token_chunk is None else _round_up(token_chunk, 8)
  tm = min(tm, _round_up(num_tokens, 8))
  tv = DEFAULT_VOCAB_TILE if vocab_chunk is None else _round_up(vocab_chunk, 128)
  tv = min(tv, _round_up(vocab, 128))
  return dataclasses.replace(plan, token_chunk=tm, vocab_chunk=tv, grad_vocab_chunk=tv)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static shape and option facts one kernel is specialised on."""

  tm: int
  tv: int
  d: int  # padded hidden size
  cols: int  # local vocabulary columns (the weight's)
  vocab: int  # true vocabulary
  padded: bool  # some columns may be vocabulary padding
  nv: int  # vocabulary tiles
  ni: int  # row blocks
  cdt: str
  z_loss: float
  label_smoothing: float
  logit_softcap: float | None
  temperature: float
  bias: bool
  vd: bool  # the weight is [V, D]: tiles [tv, D]
  entropy: bool  # the forward keeps Σ exp(z - m)(z - m); the backward takes ∂H cotangents

  @property
  def ragged(self) -> bool:  # the last tile reaches past the weight's columns
    return self.cols % self.tv != 0


def _tile(cfg: _Config, lim_ref, h_ref, w_ref, b_ref, j):
  """One ``[tm, tv]`` tile: ``(h, w, z, col, real)``: rows, the weight tile (columns past the
  weight zeroed), capped f32 logits, local column ids, real-column mask (``lim_ref``: the
  shard's real column count, when the vocabulary is padded)."""
  h = h_ref[...]
  w = w_ref[...].astype(cfg.cdt)
  if cfg.ragged:
    wcol = j * cfg.tv + lax.broadcasted_iota(jnp.int32, w.shape, 0 if cfg.vd else 1)
    w = jnp.where(wcol < cfg.cols, w, jnp.zeros((), w.dtype))
  precision = lax.Precision.HIGHEST if jnp.dtype(cfg.cdt) == F32 else None
  contract = (((1,), (1,)), ((), ())) if cfg.vd else (((1,), (0,)), ((), ()))
  z = lax.dot_general(h, w, contract, preferred_element_type=F32, precision=precision)
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
  y_ref, out_ref, m_ref, l_ref, zy_ref, zs_ref, zd_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _NEG, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)
    zy_ref[...] = jnp.zeros(zy_ref.shape, F32)
    zs_ref[...] = jnp.zeros(zs_ref.shape, F32)
    zd_ref[...] = jnp.zeros(zd_ref.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, _, z, col, real = _tile(cfg, lim_ref, h_ref, w_ref, b_ref, j)
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

  @pl.when(j == cfg.nv - 1)
  def _():
    lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
    m, s, zy, zs, zd = (r[...][:, :1] for r in (m_ref, l_ref, zy_ref, zs_ref, zd_ref))
    out = jnp.where(lane == 3, zs, jnp.where(lane == 4, zd, 0.0))
    out_ref[...] = jnp.where(lane == 0, m, jnp.where(lane == 1, s, jnp.where(lane == 2, zy, out)))


def _logit_grad(cfg: _Config, z, col, real, r, y):
  """``scale · ∂ℓ/∂x (+ scale_h · ∂H/∂x)`` of a tile from the row statistics ``r`` (lanes:
  m, 1/s, scale, lse, valid, and with the entropy nu, scale_h)."""
  m, inv_s, scale, lse, ok = (_lane(r, k) for k in range(5))
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
    nu, scale_h = _lane(r, 5), _lane(r, 6)
    g = g - scale_h * jnp.where(p > 0, p * ((z - m) - nu), 0.0)
  tau = cfg.temperature
  if cfg.logit_softcap is not None:
    capped = z if tau == 1.0 else z * tau
    g = g * (1.0 - jnp.square(capped / cfg.logit_softcap))
  if tau != 1.0:
    g = g * (1.0 / tau)
  return jnp.where(real & (ok > 0.5), g, 0.0)


def _hidden_grad_kernel(cfg: _Config, s_ref, h_ref, w_ref, *refs):
  b_ref, lim_ref, refs = _split(cfg, refs)
  y_ref, r_ref, dh_ref, acc_ref = refs
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  @pl.when(i < s_ref[0])
  def _():
    _, w, z, col, real = _tile(cfg, lim_ref, h_ref, w_ref, b_ref, j)
    g = _logit_grad(cfg, z, col, real, r_ref[...], y_ref[...])
    contract = (((1,), (0,)), ((), ())) if cfg.vd else (((1,), (1,)), ((), ()))
    acc_ref[...] += lax.dot_general(g.astype(w.dtype), w, contract, preferred_element_type=F32)

  @pl.when(j == cfg.nv - 1)
  def _():
    dh_ref[...] = acc_ref[...]


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
    g = _logit_grad(cfg, z, col, real, r_ref[...], y_ref[...])
    k = 0
    if need_w:
      a, b = (g.astype(h.dtype), h) if cfg.vd else (h, g.astype(h.dtype))
      accs[0][...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)
      k = 1
    if cfg.bias:
      accs[k][...] += jnp.sum(g, axis=0, keepdims=True)

  @pl.when(i == cfg.ni - 1)
  def _():
    for out, acc in zip(outs, accs, strict=True):
      out[...] = acc[...].astype(out.dtype)


def _compiler_params(cfg: _Config, semantics, itemsize: int):
  tile = cfg.tm * cfg.tv * 4
  blocks = 2 * (cfg.tm * cfg.d * itemsize + cfg.d * cfg.tv * itemsize)
  accumulators = max(cfg.tm, cfg.tv) * cfg.d * 4 * 2
  need = blocks + accumulators + 6 * tile + (4 << 20)
  return pltpu.CompilerParams(
    dimension_semantics=semantics, vmem_limit_bytes=int(min(MAX_VMEM_BYTES, max(need, 32 << 20)))
  )


def _varying(bt: Compacted, x):
  """``x`` varying over every mesh axis the call's inputs vary over (inside ``shard_map``)."""
  missing = tuple(sorted(bt.vma - varying_axes(x)))
  return lax.pcast(x, missing, to="varying") if missing else x


def _on_platform(fn, ops: _Operands, *args):
  """``fn(scalars, *args, interpret=...)``: Mosaic on TPU, Pallas interpret mode elsewhere."""
  return lax.platform_dependent(
    tpu=lambda: fn(ops.scalars, *args, interpret=False),
    default=lambda: fn(ops.interpret_scalars, *args, interpret=True),
  )


class _Operands:
  """The kernels' inputs for one call: gathered rows, targets, tiles, scalar prefetch."""

  def __init__(self, bt: Compacted):
    plan = bt.plan
    self.bt = bt
    rows = bt.valid.shape[0]
    tm, tv = plan.token_chunk, plan.vocab_chunk
    self.rows, self.prows = rows, _round_up(rows, tm)
    d = bt.hidden.shape[1]
    dp = _round_up(d, 128)
    count = jnp.sum(bt.valid, dtype=jnp.int32)
    valid = jnp.arange(self.prows, dtype=jnp.int32) < count
    order = jnp.pad(bt.order, (0, self.prows - rows))
    h = jnp.take(bt.hidden, order, axis=0)
    h = jnp.where(valid[:, None], h, jnp.zeros((), h.dtype)).astype(bt.cdt)
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
    self.valid = valid
    self.scalars = ((count + tm - 1) // tm).astype(jnp.int32).reshape(1)
    # Pallas' interpreter cannot index with a scalar that varies over a shard_map axis (the
    # span mask's, say): it then runs every block (past the targets they add zeros).
    self.interpret_scalars = self.scalars
    if varying_axes(self.scalars):
      self.interpret_scalars = jnp.full((1,), self.prows // tm, jnp.int32)
    opts = bt.opts
    self.cfg = _Config(
      tm=tm,
      tv=tv,
      d=dp,
      cols=bt.cols,
      vocab=bt.vocab,
      padded=bool(bt.padded),
      nv=-(-bt.cols // tv),
      ni=self.prows // tm,
      cdt=jnp.dtype(bt.cdt).name,
      z_loss=opts.z_loss,
      label_smoothing=opts.label_smoothing,
      logit_softcap=opts.logit_softcap,
      temperature=opts.temperature,
      bias=bt.bias is not None,
      vd=bool(bt.vd),
      entropy=bool(plan.entropy),
    )

  def inputs(self, *extra):
    arrays = [x for x in (self.h, self.w, self.b, self.limit) if x is not None] + list(extra)
    return [_varying(self.bt, x) for x in arrays]

  def out(self, shape, dtype):
    """An output's type: varying like the weight (every axis of the call) under shard_map."""
    mat = jax.typeof(_varying(self.bt, self.w)).manual_axis_type
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)

  def specs(self, row_major: bool, *extra_rows):
    """Block specs of ``(h, w, [b], *extra_rows)`` on a grid ``(i, j)`` (``row_major``) or
    ``(j, i)``; row operands are clamped to the last non-empty block, the weight tile held
    when the row block is empty, so skipped blocks start no DMA."""
    cfg = self.cfg

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


def _forward(ops: _Operands):
  """``[R, 8]`` f32 per-row local statistics: lanes ``(m, s, z_y, Σz, Σ exp(z - m)(z - m))``."""
  cfg = ops.cfg

  def run(scalars, *args, interpret):
    spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(cfg.ni, cfg.nv),
      in_specs=ops.specs(True, 1),
      out_specs=pl.BlockSpec((cfg.tm, _STATS), lambda i, j, s: (i, 0)),
      scratch_shapes=[pltpu.VMEM((cfg.tm, 128), F32) for _ in range(5)],
    )
    return pl.pallas_call(
      functools.partial(_forward_kernel, cfg),
      out_shape=ops.out((ops.prows, _STATS), F32),
      grid_spec=spec,
      compiler_params=_compiler_params(cfg, ("parallel", "arbitrary"), jnp.dtype(cfg.cdt).itemsize),
      interpret=interpret,
      name="jaxnll_fused_nll_fwd",
    )(scalars, *args)

  return _on_platform(run, ops, *ops.inputs(ops.y))


def stats_pass(bt: Compacted):
  """Forward: ``(stats, loss [rows])``, float32, ``stats = (m, s[, nu])`` over all shards
  (:meth:`Compacted.combine`), each ``[rows]``."""
  ops = _Operands(bt)
  out = _forward(ops)[: ops.rows]
  m, s, zy, zs, zd = (out[:, k] for k in range(5))
  opts = bt.opts
  stats, lse, zs = bt.combine(
    m, s, zs if opts.label_smoothing else None, zd if bt.plan.entropy else None
  )
  zy = _core.all_sum(zy, opts)
  zy = jnp.where(_core.target_in_range(bt.targets, bt.vocab), zy, jnp.nan)
  loss = bt.token_loss(lse, zy, zs, bt.valid)
  fill = (0.0, 1.0, 0.0)
  stats = tuple(jnp.where(bt.valid, x, f) for x, f in zip(stats, fill, strict=False))
  return stats, loss


def grad_pass(bt: Compacted, scale_c, stats_c, need=(True, True, True), entropy_scale_c=None):
  """Gradients of ``Σ scale·ℓ (+ Σ entropy_scale·H)``: the hidden-gradient kernel and the
  weight-gradient kernel (each skipped when its gradient is not needed).  ``dh_c`` is f32;
  ``dweight`` and ``dbias`` come in the weight's and f32."""
  need_h, need_w, need_b = need[0], need[1], need[2] and bt.bias is not None
  ops = _Operands(bt)
  cfg = ops.cfg
  m, s = stats_c[0], jnp.where(bt.valid, stats_c[1], 1.0)
  lanes = [m, 1.0 / s, scale_c, m + jnp.log(s), bt.valid.astype(F32)]
  if cfg.entropy:
    es = jnp.zeros_like(m) if entropy_scale_c is None else entropy_scale_c
    lanes += [stats_c[2], es]
  r = jnp.stack(lanes, axis=1)
  r = jnp.where(bt.valid[:, None], r, 0.0)
  r = jnp.pad(r, ((0, ops.prows - ops.rows), (0, _STATS - len(lanes))))
  itemsize = jnp.dtype(cfg.cdt).itemsize
  dh_c = dw = db = None

  if need_h:

    def run_h(scalars, *args, interpret):
      spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(cfg.ni, cfg.nv),
        in_specs=ops.specs(True, 1, _STATS),
        out_specs=pl.BlockSpec((cfg.tm, cfg.d), lambda i, j, s: (i, 0)),
        scratch_shapes=[pltpu.VMEM((cfg.tm, cfg.d), F32)],
      )
      return pl.pallas_call(
        functools.partial(_hidden_grad_kernel, cfg),
        out_shape=ops.out((ops.prows, cfg.d), F32),
        grid_spec=spec,
        compiler_params=_compiler_params(cfg, ("parallel", "arbitrary"), itemsize),
        interpret=interpret,
        name="jaxnll_fused_nll_bwd_hidden",
      )(scalars, *args)

    dh_c = _on_platform(run_h, ops, *ops.inputs(ops.y, r))
    d = bt.hidden.shape[1]
    if dh_c.shape != (ops.rows, d):
      dh_c = dh_c[: ops.rows, :d]

  if need_w or need_b:
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
        in_specs=ops.specs(False, 1, _STATS),
        out_specs=out_specs,
        scratch_shapes=scratch,
      )
      return pl.pallas_call(
        functools.partial(_weight_grad_kernel, cfg, need_w),
        out_shape=out_shape,
        grid_spec=spec,
        compiler_params=_compiler_params(cfg, ("parallel", "arbitrary"), itemsize),
        interpret=interpret,
        name="jaxnll_fused_nll_bwd_weight",
      )(scalars, *args)

    outs = list(_on_platform(run_w, ops, *ops.inputs(ops.y, r)))
    if need_w:
      dw = outs.pop(0)
      d = bt.hidden.shape[1]
      if cfg.d != d:
        dw = dw[:, :d] if cfg.vd else dw[:d]
    if cfg.bias:
      db = outs.pop(0)[0] if need_b else None
  return dh_c, dw, db


def one_pass(bt: Compacted, scale_c, need=(True, True, True)):
  """The forward kernel, then the gradient kernels (the scalar entry's forward rule)."""
  stats, loss = stats_pass(bt)
  return (stats, loss, *grad_pass(bt, scale_c, stats, need))
