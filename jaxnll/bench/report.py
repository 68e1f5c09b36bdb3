"""The records as a markdown table and plots.

:func:`report` turns ``OUT/bench.jsonl`` into ``OUT/bench.md`` (one table per head and device,
each implementation's latest run) and one PNG per head and device (:func:`plot`);
:func:`plot_curves` draws any benchmark's records as time against the span fraction and memory
against the vocabulary.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from jaxnll.bench.records import load

ORDER = (
  "naive",
  "optax",
  "tokamax",
  "jaxnll_logits",
  "jaxnll_fused_xla",
  "jaxnll_fused",
  "jaxnll_fused_scalar",
  "torch_naive",
  "torch_linear_cross_entropy",
  "liger",
  "cce",
  "matmul",
  "torch_matmul",
)
ROOFS = ("matmul", "torch_matmul")
FOOTNOTE = (
  "Time: median over interleaved repetitions after warm-up (p20–p80 in brackets); "
  "× optax: median of the per-repetition ratio (†: ratio of medians from a separate "
  "process). Temp memory: XLA's `memory_analysis()` of the compiled forward + backward "
  "(torch peers: peak allocation above inputs and outputs). % of matmul: useful FLOP/s "
  "(6·targets·D·V forward + backward, 2·targets·D·V forward) over the rate of a plain "
  "[tokens, D] @ [D, V] matmul timed in the same run (it writes the [tokens, V] logits, "
  "which the fused kernels never do, so at a small D they can exceed it). Every "
  "implementation was checked against `jaxnll.reference` before timing; tokamax takes no "
  "mask and computes every position."
)


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "x"


def _group_key(r: dict) -> tuple:
  return (r["device"], r["spec"], r["dtype"], int(r["tokens"]))


def latest(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  """Per ``(device, spec, dtype, tokens)``: the records of each implementation's latest run."""
  groups: dict[tuple, dict[str, dict[str, list[dict]]]] = {}
  for r in rows:
    by_run = groups.setdefault(_group_key(r), {}).setdefault(r["impl"], {})
    by_run.setdefault(r["run_id"], []).append(r)
  out = {}
  for key, by_impl in groups.items():
    out[key] = [
      r for runs in by_impl.values() for r in max(runs.values(), key=lambda rs: rs[0]["date"])
    ]
  return dict(sorted(out.items()))


def _index(rows: Sequence[dict]) -> dict[tuple, float]:
  idx = {}
  for r in rows:
    f = r["span_fraction"]
    f = None if f == "" else float(f)
    idx[(r["impl"], r["pass"], r["metric"], r["stat"], f)] = r["value"]
  return idx


def _impls_in(rows: Sequence[dict]) -> list[str]:
  names = {r["impl"] for r in rows}
  return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def _fractions(rows: Sequence[dict], reverse: bool = False) -> list[float]:
  return sorted(
    {float(r["span_fraction"]) for r in rows if r["span_fraction"] != ""}, reverse=reverse
  )


def _fmt(x, digits=3) -> str:
  if x is None or x == "" or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return f"{x:.{digits}g}"


def _ms(seconds: float) -> str:
  """Milliseconds with 3-4 significant digits, never in exponent notation."""
  x = seconds * 1e3
  for bound, digits in ((100, 0), (10, 1), (1, 2)):
    if x >= bound:
      return f"{x:.{digits}f}"
  return f"{x:.3g}"


def _not_ok(rows: Sequence[dict], name: str) -> str | None:
  """The note line of an implementation whose status is not ``ok``."""
  status = next((r for r in rows if r["impl"] == name and r["metric"] == "status"), None)
  if status is not None and status["stat"] != "ok":
    return f"- `{name}`: {status['stat']} — {status['note']}"
  return None


def _first(idx: dict, name: str, metric: str, stat: str, f: float | None):
  """The fwd+bwd number, else the forward one."""
  got = idx.get((name, "fwd_bwd", metric, stat, f))
  return got if got is not None else idx.get((name, "fwd", metric, stat, f))


def _memory_table(rows: Sequence[dict], idx: dict) -> list[str]:
  """Compile-only groups: temp memory and compile time, no timing."""
  lines = [
    "Compile only (`--memory-only`): nothing was run or timed. Buffers are those of this "
    "device's compiler; XLA:CPU computes 16-bit matmuls in float32, so on a CPU the logits "
    "paths hold float32 `[tokens, V]` copies that a GPU would not make.",
    "",
    "| implementation | temp MiB fwd | temp MiB fwd+bwd | × optax | compile s fwd+bwd |",
    "|---|---:|---:|---:|---:|",
  ]
  base = idx.get(("optax", "fwd_bwd", "temp_bytes", "value", None))
  notes = []
  for name in _impls_in(rows):
    if (note := _not_ok(rows, name)) is not None:
      notes.append(note)
      continue
    fwd = idx.get((name, "fwd", "temp_bytes", "value", None))
    both = idx.get((name, "fwd_bwd", "temp_bytes", "value", None))
    if both is None:
      continue
    ratio = _fmt(both / base) if base else "–"
    comp = _fmt(idx.get((name, "fwd_bwd", "compile_s", "value", None)))
    lines.append(f"| {name} | {fwd / 2**20:.5g} | {both / 2**20:.5g} | {ratio} | {comp} |")
  return lines + ([""] + notes if notes else [])


def _time_cells(idx: dict, name: str, f: float, paired: bool) -> list[str]:
  """Time (p20–p80) and × optax of fwd+bwd, then of fwd."""
  cells = []
  for p in ("fwd_bwd", "fwd"):
    med = idx.get((name, p, "time_s", "median", f))
    if med is None:
      cells += ["–", "–"]
      continue
    lo, hi = idx.get((name, p, "time_s", "p20", f)), idx.get((name, p, "time_s", "p80", f))
    cells.append(f"{_ms(med)} ({_ms(lo)}–{_ms(hi)})")
    if name == "optax":
      cells.append("1")
    elif paired:
      cells.append(_fmt(idx.get((name, p, "ratio_vs_optax", "median", f))))
    else:  # another process: ratio of medians, not of interleaved pairs
      o = idx.get(("optax", p, "time_s", "median", f))
      cells.append(f"{_fmt(med / o)}†" if o else "–")
  return cells


def _timing_table(rows: Sequence[dict], idx: dict) -> list[str]:
  lines = [
    "| implementation | span | fwd+bwd ms (p20–p80) | × optax | fwd ms (p20–p80) | × optax "
    "| temp MiB fwd+bwd | × optax | % of matmul fwd+bwd | compile s fwd+bwd |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  notes = []
  optax_mem = idx.get(("optax", "fwd_bwd", "temp_bytes", "value", None))
  peer_runs = {r["run_id"] for r in rows if r["impl"] == "optax"}
  for name in _impls_in(rows):
    if (note := _not_ok(rows, name)) is not None:
      notes.append(note)
      continue
    paired = any(r["run_id"] in peer_runs for r in rows if r["impl"] == name)
    mem = idx.get((name, "fwd_bwd", "temp_bytes", "value", None))
    mem_cells = ["–", "–"]
    if mem is not None and mem >= 0:
      mem_cells = [f"{mem / 2**20:.4g}", _fmt(mem / optax_mem) if optax_mem else "–"]
    comp = _fmt(_first(idx, name, "compile_s", "value", None))
    for f in _fractions(rows, reverse=True):
      cells = _time_cells(idx, name, f, paired)
      if all(c == "–" for c in cells):
        continue
      frac = _first(idx, name, "matmul_fraction", "median", f)
      pct = _fmt(None if frac is None else 100 * frac, 3)
      lines.append(f"| {name} | {f:g} | " + " | ".join([*cells, *mem_cells, pct, comp]) + " |")
  return lines + [""] + notes + ([""] if notes else [])


def markdown(groups: dict[tuple, list[dict]]) -> str:
  """The results as markdown: one table per head and device."""
  lines = []
  for (device, spec, dtype, _), rows in groups.items():
    r0 = rows[0]
    chunk = f", fused token chunk {r0['token_chunk']}" if r0["token_chunk"] != "" else ""
    lines += [
      f"### {spec}: {r0['model']}",
      "",
      f"{r0['batch']} × {r0['length']} tokens, D = {r0['hidden']}, V = {r0['vocab']}, {dtype}"
      f"{chunk}. Device: {device}.",
      "",
    ]
    runs = {}
    for r in rows:
      runs.setdefault(r["run_id"], r)
    for r in sorted(runs.values(), key=lambda r: r["date"]):
      impls = sorted({x["impl"] for x in rows if x["run_id"] == r["run_id"]})
      lines.append(
        f"- run `{r['run_id']}` ({', '.join(impls)}): {r['date']}, jax {r['jax_version']}, "
        f"jaxnll {r['jaxnll_version']} at `{r['git_commit']}`"
      )
    idx = _index(rows)
    if any(r["metric"] == "time_s" for r in rows):
      lines += ["", *_timing_table(rows, idx)]
    else:
      lines += ["", *_memory_table(rows, idx), ""]
  return "\n".join(lines + [FOOTNOTE, ""])


# ----------------------------------------------------------------------------- plots


def _figure(**kwargs):
  """A figure outside pyplot: writing a file never switches the caller's backend."""
  from matplotlib.figure import Figure

  return Figure(**kwargs)


def _ratio_points(idx: dict, name: str, fractions: Sequence[float]) -> list[tuple]:
  """``(fraction, median, below, above)`` of the fwd+bwd time × optax (a ratio of medians
  where the run was not paired with optax's)."""
  pts = []
  for f in fractions:
    med, lo, hi = (
      idx.get((name, "fwd_bwd", "ratio_vs_optax", s, f)) for s in ("median", "p20", "p80")
    )
    if name == "optax":
      med = lo = hi = 1.0
    elif med is None:
      t = idx.get((name, "fwd_bwd", "time_s", "median", f))
      o = idx.get(("optax", "fwd_bwd", "time_s", "median", f))
      if t is None or not o:
        continue
      med = lo = hi = t / o
    pts.append(
      (f, med, med - (lo if lo is not None else med), (hi if hi is not None else med) - med)
    )
  return pts


def _style(k: int) -> dict:
  """Marker and line style of the ``k``-th curve: curves that coincide stay visible."""
  return dict(marker="osv^xD"[k % 6], linestyle=("-", "--", ":", "-.")[k % 4])


def _plot_ratios(ax, idx: dict, names: Sequence[str], fractions: Sequence[float]) -> None:
  for k, name in enumerate(names):
    if name not in ROOFS and (pts := _ratio_points(idx, name, fractions)):
      f, m, el, eh = zip(*pts, strict=True)
      ax.errorbar(f, m, yerr=[el, eh], capsize=3, label=name, **_style(k))
  ax.set_xlabel("span fraction (target tokens / tokens)")
  ax.set_ylabel("fwd+bwd time / optax (median, p20–p80)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)


def _plot_memory_bars(ax, idx: dict, names: Sequence[str]) -> None:
  mem = [(n, idx.get((n, "fwd_bwd", "temp_bytes", "value", None))) for n in names if n not in ROOFS]
  mem = [(n, b) for n, b in mem if b is not None and b > 0]
  if mem:
    base = dict(mem).get("optax")
    ax.barh([n for n, _ in mem][::-1], [b / 2**20 for _, b in mem][::-1], color="tab:blue")
    for n, b in mem:
      label = f" {b / 2**20:.3g} MiB" + (f" ({b / base:.2g}× optax)" if base else "")
      ax.text(b / 2**20, n, label, va="center", fontsize=7)
    top = max(b for _, b in mem) / 2**20
    if top / (min(b for _, b in mem) / 2**20) > 20:
      ax.set_xscale("log")
      ax.set_xlim(right=top * 30)
    else:
      ax.set_xlim(0, top * 1.6)
  ax.set_xlabel("temp memory, fwd+bwd (MiB)")
  ax.grid(alpha=0.3, axis="x", which="both")


def _plot_matmul_fraction(ax, idx: dict, names: Sequence[str], fractions: Sequence[float]) -> None:
  for name in names:
    if name in ROOFS:
      continue
    got = ((f, idx.get((name, "fwd_bwd", "matmul_fraction", "median", f))) for f in fractions)
    if pts := [(f, 100 * v) for f, v in got if v is not None]:
      ax.plot(*zip(*pts, strict=True), marker="o", label=name)
  ax.axhline(100, color="k", lw=0.8, ls="--", label="plain matmul")
  ax.set_xlabel("span fraction")
  ax.set_ylabel("useful FLOP/s, % of matmul (fwd+bwd)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot(key: tuple, rows: Sequence[dict], path: str) -> None:
  """Three panels: fwd+bwd time × optax vs span fraction, temp memory, % of matmul."""
  device, spec, dtype, _ = key
  idx = _index(rows)
  timed = {r["impl"] for r in rows if r["metric"] == "time_s"}
  names = [n for n in _impls_in(rows) if n in timed]
  fractions = _fractions(rows)
  fig = _figure(figsize=(15, 4.4))
  ax_t, ax_m, ax_f = fig.subplots(1, 3)
  _plot_ratios(ax_t, idx, names, fractions)
  _plot_memory_bars(ax_m, idx, names)
  _plot_matmul_fraction(ax_f, idx, names, fractions)
  r0 = rows[0]
  fig.suptitle(
    f"{spec} ({r0['model']}): {r0['batch']}×{r0['length']} tokens, D={r0['hidden']}, "
    f"V={r0['vocab']}, {dtype} — {device}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_curves(rows: Sequence[dict], path: str) -> None:
  """Two panels: fwd+bwd time × optax against the span fraction (the timed records), and
  fwd+bwd temp memory against the vocabulary (the compile-only ones)."""
  fig = _figure(figsize=(11, 4.2))
  ax_t, ax_m = fig.subplots(1, 2)
  timed = [r for r in rows if r["span_fraction"] != ""]
  if timed:
    names = [
      n for n in _impls_in(timed) if any(r["impl"] == n for r in timed if r["metric"] == "time_s")
    ]
    _plot_ratios(ax_t, _index(timed), names, _fractions(timed))
    r = timed[0]
    ax_t.set_title(
      f"time, {r['batch']}x{r['length']} tokens, D={r['hidden']}, V={r['vocab']}, {r['dtype']}",
      fontsize=9,
    )
  mem = [
    r
    for r in rows
    if r["metric"] == "temp_bytes" and r["pass"] == "fwd_bwd" and r["note"] == "compile only"
  ]
  for k, name in enumerate(_impls_in(mem)):
    pts = sorted((int(r["vocab"]), r["value"] / 2**30) for r in mem if r["impl"] == name)
    ax_m.plot(*zip(*pts, strict=True), label=name, **_style(k))
  ax_m.set_xlabel("vocabulary V")
  ax_m.set_ylabel("temp memory, fwd+bwd (GiB)")
  ax_m.set_yscale("log")
  if mem:
    r = mem[0]
    ax_m.set_title(
      f"memory, {r['batch']}x{r['length']} tokens, D={r['hidden']}, {r['dtype']}", fontsize=9
    )
    ax_m.legend(fontsize=8)
  ax_m.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def summary(rows: Sequence[dict]) -> str:
  """One line per measured number worth reading in a terminal: fwd+bwd temp memory and, per
  span fraction, fwd+bwd time, each × optax where optax was measured; the implementations
  that did not pass."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["spec"], r["shards"]), []).append(r)
  lines = []
  for (spec, shards), group in groups.items():
    at = spec if str(shards) in ("", "1") else f"{spec} ×{shards}"
    idx = _index(group)
    optax = idx.get(("optax", "fwd_bwd", "temp_bytes", "value", None))
    for name in _impls_in(group):
      mem = idx.get((name, "fwd_bwd", "temp_bytes", "value", None))
      if mem is not None:
        ratio = f" ({mem / optax:.3g} × optax)" if optax else ""
        lines.append(f"{at:24s} {name:20s} temp fwd+bwd {mem / 2**20:10.4g} MiB{ratio}")
      for f in _fractions(group, reverse=True):
        t = idx.get((name, "fwd_bwd", "time_s", "median", f))
        if t is not None:
          x = idx.get((name, "fwd_bwd", "ratio_vs_optax", "median", f))
          ratio = f" ({x:.3g} × optax)" if x is not None else ""
          lines.append(f"{at:24s} {name:20s} span {f:<5g} fwd+bwd {_ms(t):>8s} ms{ratio}")
      if (note := _not_ok(group, name)) is not None:
        lines.append(f"{at:24s} {note[2:]}")
  return "\n".join(lines)


def report(out: str) -> tuple[str, list[str]]:
  """Writes ``out/bench.md`` and one PNG per head and device from ``out/bench.jsonl``."""
  groups = latest(load(out))
  pngs = []
  for key, rows in groups.items():
    if not any(r["metric"] == "time_s" for r in rows):
      continue  # nothing ran (every implementation skipped or failed): the table says why
    path = os.path.join(out, f"bench_{_slug(key[1])}_{_slug(key[0])}_{key[2]}.png")
    plot(key, rows, path)
    pngs.append(path)
  text = "## Benchmark results\n\n" + markdown(groups)
  text += "\nPlots: " + ", ".join(f"`{os.path.basename(p)}`" for p in pngs) + "\n"
  md = os.path.join(out, "bench.md")
  with open(md, "w") as f:
    f.write(text)
  return md, pngs
