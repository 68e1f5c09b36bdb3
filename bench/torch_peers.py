"""PyTorch peers of ``jaxnll bench``: Liger's fused linear cross-entropy, Apple's Cut
Cross-Entropy and, where this torch has it, ``torch.nn.functional.linear_cross_entropy``.

They run at the suite's accelerator shapes (:data:`jaxnll.bench.SPECS`, ``4 × 2048`` tokens,
bfloat16, the same span layout: the last fraction of every row is the target span, the rest
``ignore_index``), measure the same things (first-call time, forward and forward + backward
time as median and p20 / p80 over interleaved repetitions, peak memory above inputs and
outputs, useful FLOP/s and its fraction of ``torch`` matmul of the same shape timed in the
same run) and append to the same ``OUT/bench.csv`` / ``OUT/bench.jsonl``, so
``bench/report.py`` puts them in the same tables (their "× optax" is a ratio of medians
across two processes, marked †).

Every peer is checked before it is timed against a float32 materialised-logits reference
(``cross_entropy(h.float() @ W.float().T)``, the formula of :mod:`jaxnll.reference`), value and
both gradients.  Anything missing — torch, a CUDA device, a peer package — is reported and
skipped; the script then exits 0 (``bench/gpu.sh`` calls it unconditionally).

    python bench/torch_peers.py --out bench/results [--spec llama3-8b] [--budget-s 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# JAX is imported only for the shape table and file helpers: keep it off the GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from jaxnll import bench  # noqa: E402

IGNORE = -100


def _torch():
  """``(torch, None)`` or ``(None, reason)``."""
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    return None, f"torch not importable ({type(e).__name__}: {e})"
  if not torch.cuda.is_available():
    return None, f"no CUDA device for torch {torch.__version__}"
  return torch, None


def _loss_only(out):
  """Some peer versions return ``(loss, extras...)``."""
  return out[0] if isinstance(out, tuple) else out


def peers(torch) -> tuple[dict, dict[str, str]]:
  """``({name: loss(h [N, D], W [V, D], labels [N]) -> scalar sum}, {name: why skipped})``."""
  import torch.nn.functional as F

  fns, skipped = {}, {}

  def naive(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE, reduction="sum")

  fns["torch_naive"] = naive
  if hasattr(F, "linear_cross_entropy"):
    fns["torch_linear_cross_entropy"] = lambda h, w, y: F.linear_cross_entropy(
      h, w, y, reduction="sum", ignore_index=IGNORE
    )
  else:
    skipped["torch_linear_cross_entropy"] = f"torch {torch.__version__} has none"
  try:
    try:
      from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lf

      fns["liger"] = lambda h, w, y: _loss_only(lf(h, w, y, ignore_index=IGNORE, reduction="sum"))
    except ImportError:
      from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

      liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
      fns["liger"] = lambda h, w, y: _loss_only(liger(w, h, y))
  except Exception as e:  # noqa: BLE001
    skipped["liger"] = f"liger_kernel not importable ({type(e).__name__}: {e})"
  try:
    from cut_cross_entropy import linear_cross_entropy

    fns["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="sum")
  except Exception as e:  # noqa: BLE001
    skipped["cce"] = f"cut_cross_entropy not importable ({type(e).__name__}: {e})"
  return fns, skipped


def reference(torch, h, w, y):
  import torch.nn.functional as F

  h32 = h.detach().float().requires_grad_()
  w32 = w.detach().float().requires_grad_()
  loss = F.cross_entropy(h32 @ w32.T, y, ignore_index=IGNORE, reduction="sum")
  loss.backward()
  out = (loss.detach(), h32.grad, w32.grad)
  return out


def rel_err(torch, got, want) -> float:
  worst = 0.0
  for g, w in zip(got, want, strict=True):
    g, w = g.float(), w.float()
    scale = max(float(w.abs().max()), 1e-30)
    worst = max(worst, float((g - w).abs().max()) / scale)
  return worst if np.isfinite(worst) else float("inf")


def bench_case(torch, case: bench.Case, env: dict, *, fractions, repeats: int, warmup: int):
  fns, skipped = peers(torch)
  dev = torch.device("cuda")
  dtype = getattr(torch, case.dtype)
  g = torch.Generator(device=dev).manual_seed(0)
  n_all, d, v = case.tokens, case.hidden, case.vocab
  h = torch.randn(n_all, d, device=dev, generator=g).to(dtype).requires_grad_()
  bound = (3.0 / d) ** 0.5
  w = ((torch.rand(v, d, device=dev, generator=g) * 2 - 1) * bound).to(dtype).requires_grad_()
  ids = torch.randint(0, v, (n_all,), device=dev, generator=g)
  base = dict(
    env,
    spec=case.spec.name,
    model=case.spec.model,
    batch=case.batch,
    length=case.length,
    tokens=case.tokens,
    hidden=d,
    vocab=v,
    dtype=case.dtype,
    token_chunk="",
  )
  rows = []

  def record(*args, **kwargs):
    rows.append(bench._record(base, *args, **kwargs))

  def sync_time(f) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t0

  def run_fwd(fn, y):
    return lambda: fn(h.detach(), w.detach(), y)

  def run_fwd_bwd(fn, y):
    def f():
      h.grad = w.grad = None
      fn(h, w, y).backward()

    return f

  failed = dict(skipped)
  rtol = bench.tolerance(case.dtype, "gpu")
  first = {}
  for fraction in fractions:
    mask = torch.as_tensor(bench.span_mask(case.batch, case.length, fraction).reshape(-1))
    mask = mask.to(dev)
    y = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    n = int(mask.sum())
    want = reference(torch, h, w, y)
    live = []
    for name, fn in fns.items():
      if name in failed:
        continue
      try:
        t_first = sync_time(run_fwd_bwd(fn, y))
        first.setdefault(name, t_first)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        h.grad = w.grad = None
        loss = fn(h, w, y)
        loss.backward()
        torch.cuda.synchronize()
        outputs = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
        temp = torch.cuda.max_memory_allocated() - before - outputs
        err = rel_err(torch, (loss.detach(), h.grad, w.grad), want)
      except Exception as e:  # noqa: BLE001
        failed[name] = f"run: {type(e).__name__}: {e}".splitlines()[0][:300]
        continue
      record(name, "fwd_bwd", "max_rel_err", "value", err, "", fraction, n)
      if not err <= rtol:
        failed[name] = f"check_failed: differs from the f32 reference by {err:.3g} > {rtol:g}"
        continue
      if fraction == fractions[0]:
        record(name, "fwd_bwd", "temp_bytes", "value", temp, "B", note="peak above in+out")
        record(name, "fwd_bwd", "compile_s", "value", t_first, "s", note="first call (JIT)")
      live.append(name)
    del want
    calls = {
      name: {"fwd": run_fwd(fns[name], y), "fwd_bwd": run_fwd_bwd(fns[name], y)} for name in live
    }
    calls["torch_matmul"] = {"fwd": lambda: h.detach() @ w.detach().T}
    for fs in calls.values():
      for _ in range(warmup):
        for f in fs.values():
          sync_time(f)
    times = {name: {p: [] for p in fs} for name, fs in calls.items()}
    order0 = list(calls)
    for r in range(repeats):
      k = r % len(order0)
      order = order0[k:] + order0[:k]
      for name in order[:: -1 if r % 2 else 1]:
        for p, f in calls[name].items():
          times[name][p].append(sync_time(f))
    roof = 2.0 * n_all * d * v / float(np.median(times["torch_matmul"]["fwd"]))
    for name, by_pass in times.items():
      for p, ts in by_pass.items():
        for stat, val in bench._percentiles(ts).items():
          record(name, p, "time_s", stat, val, "s", fraction, n)
        useful = (
          2.0 * n_all * d * v if name == "torch_matmul" else (2 if p == "fwd" else 6) * n * d * v
        )
        flops = useful / float(np.median(ts))
        record(name, p, "flops_per_s", "median", flops, "FLOP/s", fraction, n)
        record(name, p, "matmul_fraction", "median", flops / roof, "", fraction, n)
    h.grad = w.grad = None
  versions = f"torch {torch.__version__}"
  for name in [*fns, *skipped, "torch_matmul"]:
    if name in failed:
      kind = (
        "check_failed"
        if failed[name].startswith("check_failed")
        else ("skipped" if name in skipped else "failed")
      )
      record(name, "", "status", kind, 1, note=failed[name])
    else:
      record(name, "", "status", "ok", 1, note=versions)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="bench/results")
  p.add_argument("--spec", action="append", choices=sorted(bench.SPECS))
  p.add_argument("--fractions", default=",".join(str(f) for f in bench.FRACTIONS))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--budget-s", type=float, help="start no new head after this many seconds")
  args = p.parse_args(argv)
  torch, why = _torch()
  if torch is None:
    print(f"torch peers skipped: {why}")
    return 0
  t0 = time.perf_counter()
  names = args.spec or [n for n, s in bench.SPECS.items() if s.accel is not None]
  fractions = tuple(float(x) for x in args.fractions.split(",") if x)
  env = bench.environment(backend="gpu", device=torch.cuda.get_device_name())
  for name in names:
    if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
      print(f"budget of {args.budget_s:g} s spent: {name} not run")
      continue
    case = bench.resolve(bench.SPECS[name], backend="gpu", dtype=args.dtype)
    rows = bench_case(
      torch, case, env, fractions=fractions, repeats=args.repeats, warmup=args.warmup
    )
    bench.save(rows, args.out)
    for r in rows:
      if r["metric"] == "status":
        print(f"{name} {r['impl']}: {r['stat']} {r['note']}", flush=True)
    torch.cuda.empty_cache()
  return 0


if __name__ == "__main__":
  sys.exit(main())
