"""PyTorch peers of the head suite: Liger's fused linear cross-entropy, Apple's Cut
Cross-Entropy and, where this torch has it, ``torch.nn.functional.linear_cross_entropy``.

They run at a :class:`~jaxnll.bench.specs.Case` of the head table on a CUDA device, with the
same span layout (the last fraction of every row is the target span, the rest
``ignore_index``), are checked first against a float32 materialised-logits reference
(``cross_entropy(h.float() @ W.float().T)``, the formula of :mod:`jaxnll.reference`), value
and both gradients, and are timed by the suite's own :func:`~jaxnll.bench.harness.interleave`
and :func:`~jaxnll.bench.harness.summarize` with a CUDA-synchronising timer.  Memory is the
peak allocation above inputs and outputs; "compile" time is the first call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxnll.bench import harness, records
from jaxnll.bench.impls import head_flops, short
from jaxnll.bench.specs import Case, span_mask

IGNORE = -100


def import_torch():
  """``(torch, None)`` or ``(None, reason)``."""
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    return None, f"torch not importable ({short(e)})"
  if not torch.cuda.is_available():
    return None, f"no CUDA device for torch {torch.__version__}"
  return torch, None


def _loss_only(out):
  """Some peer versions return ``(loss, extras...)``."""
  return out[0] if isinstance(out, tuple) else out


def peers(torch) -> tuple[dict[str, Callable], dict[str, str]]:
  """``({name: loss(h [N, D], W [V, D], labels [N]) -> scalar sum}, {name: why skipped})``."""
  import torch.nn.functional as F

  fns, skipped = {}, {}
  fns["torch_naive"] = lambda h, w, y: F.cross_entropy(
    (h @ w.T).float(), y, ignore_index=IGNORE, reduction="sum"
  )
  if hasattr(F, "linear_cross_entropy"):
    fns["torch_linear_cross_entropy"] = lambda h, w, y: F.linear_cross_entropy(
      h, w, y, reduction="sum", ignore_index=IGNORE
    )
  else:
    skipped["torch_linear_cross_entropy"] = f"skipped: torch {torch.__version__} has none"
  try:
    try:
      from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lf

      fns["liger"] = lambda h, w, y: _loss_only(lf(h, w, y, ignore_index=IGNORE, reduction="sum"))
    except ImportError:
      from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

      liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
      fns["liger"] = lambda h, w, y: _loss_only(liger(w, h, y))
  except Exception as e:  # noqa: BLE001
    skipped["liger"] = f"skipped: liger_kernel not importable ({short(e)})"
  try:
    from cut_cross_entropy import linear_cross_entropy

    fns["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="sum")
  except Exception as e:  # noqa: BLE001
    skipped["cce"] = f"skipped: cut_cross_entropy not importable ({short(e)})"
  return fns, skipped


def reference(h, w, y) -> tuple:
  """Value and gradients of the float32 materialised-logits loss."""
  import torch.nn.functional as F

  h32 = h.detach().float().requires_grad_()
  w32 = w.detach().float().requires_grad_()
  loss = F.cross_entropy(h32 @ w32.T, y, ignore_index=IGNORE, reduction="sum")
  loss.backward()
  return loss.detach(), h32.grad, w32.grad


def relative_error(got, want) -> float:
  """:func:`jaxnll.bench.harness.relative_error` for torch tensors, on their device."""
  worst = 0.0
  for g, w in zip(got, want, strict=True):
    scale = max(float(w.float().abs().max()), 1e-30)
    err = float((g.float() - w.float()).abs().max()) / scale
    worst = max(worst, err if math.isfinite(err) else math.inf)
  return worst


class _Head:
  """The inputs on the device, and each peer's passes and measurements on them."""

  def __init__(self, torch, case: Case):
    self.torch = torch
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, d, v = case.tokens, case.hidden, case.vocab
    dtype = getattr(torch, case.dtype)
    self.h = torch.randn(n, d, device=dev, generator=g).to(dtype).requires_grad_()
    bound = (3.0 / d) ** 0.5
    w = (torch.rand(v, d, device=dev, generator=g) * 2 - 1) * bound
    self.w = w.to(dtype).requires_grad_()
    self.ids = torch.randint(0, v, (n,), device=dev, generator=g)

  def labels(self, mask: np.ndarray):
    m = self.torch.as_tensor(mask.reshape(-1)).to(self.ids.device)
    return self.torch.where(m, self.ids, self.torch.full_like(self.ids, IGNORE))

  def timer(self, call: Callable[[], object]) -> float:
    self.torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    self.torch.cuda.synchronize()
    return time.perf_counter() - t0

  def calls(self, fn, y) -> dict[str, Callable[[], object]]:
    def fwd_bwd():
      self.h.grad = self.w.grad = None
      fn(self.h, self.w, y).backward()

    return {"fwd": lambda: fn(self.h.detach(), self.w.detach(), y), "fwd_bwd": fwd_bwd}

  def measure(self, fn, y) -> tuple[float, int, tuple]:
    """``(first-call seconds, peak bytes above inputs and outputs, (loss, dh, dw))``."""
    cuda = self.torch.cuda
    first = self.timer(self.calls(fn, y)["fwd_bwd"])
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    before = cuda.memory_allocated()
    self.h.grad = self.w.grad = None
    loss = fn(self.h, self.w, y)
    loss.backward()
    cuda.synchronize()
    grads = (self.h.grad, self.w.grad)
    temp = cuda.max_memory_allocated() - before - sum(x.numel() * x.element_size() for x in grads)
    return first, temp, (loss.detach(), *grads)


def bench_case(
  torch, case: Case, env: dict, *, fractions: Sequence[float], repeats: int, warmup: int
) -> list[dict]:
  """The peers at ``case``: per span fraction check, warm up, time interleaved with
  ``torch_matmul`` (the roofline), summarize — records of :data:`jaxnll.bench.records.FIELDS`."""
  fns, failed = peers(torch)
  head = _Head(torch, case)
  base = records.case_fields(case, env)
  rows: list[dict] = []

  def record(*a, **k):
    rows.append(records.record(base, *a, **k))

  rtol = harness.tolerance(case.dtype, "gpu")
  for i, fraction in enumerate(fractions):
    mask = span_mask(case.batch, case.length, fraction)
    y, n = head.labels(mask), int(mask.sum())
    want = reference(head.h, head.w, y)
    live = []
    for name, fn in fns.items():
      if name in failed:
        continue
      try:
        first, temp, got = head.measure(fn, y)
        err = relative_error(got, want)
      except Exception as e:  # noqa: BLE001
        failed[name] = f"run: {short(e)}"
        continue
      record(name, "fwd_bwd", "max_rel_err", "value", err, "", fraction, n)
      if not err <= rtol:
        failed[name] = f"check_failed: differs from the f32 reference by {err:.3g} > {rtol:g}"
        continue
      if i == 0:
        record(name, "fwd_bwd", "temp_bytes", "value", temp, "B", note="peak above in+out")
        record(name, "fwd_bwd", "compile_s", "value", first, "s", note="first call (JIT)")
      live.append(name)
    del want
    calls = {name: head.calls(fns[name], y) for name in live}
    calls["torch_matmul"] = {"fwd": lambda: head.h.detach() @ head.w.detach().T}
    for _ in range(warmup):
      for by_pass in calls.values():
        for call in by_pass.values():
          head.timer(call)
    times = harness.interleave(calls, repeats, timer=head.timer)
    harness.summarize(
      times, case, n, record, fraction=fraction, flops=head_flops, roof="torch_matmul"
    )
    head.h.grad = head.w.grad = None
  names = [*fns, *(k for k in failed if k not in fns), "torch_matmul"]
  return rows + records.statuses(base, names, failed, note=f"torch {torch.__version__}")
