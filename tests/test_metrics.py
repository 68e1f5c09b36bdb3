"""Tests for jaxnll/metrics.py: metric A, metric B, perplexity and the run files."""

import json
import math

import numpy as np
import pytest

from jaxnll.train import metrics


def test_metric_a_is_per_sample_and_metric_b_the_token_mean():
  sums, counts = [2.0, 24.0, 0.0], [2, 8, 0]
  np.testing.assert_array_equal(metrics.per_sample_loss(sums, counts), [1.0, 3.0, 0.0])
  assert metrics.aggregate_loss(sums, counts) == pytest.approx(2.6)
  assert np.mean(metrics.per_sample_loss(sums[:2], counts[:2])) == 2.0  # not metric B
  assert metrics.aggregate_loss([0.0], [0]) == 0.0
  assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_epoch_aggregate_ignores_padding_and_restores_from_records():
  agg = metrics.EpochAggregate()
  agg.add(np.array([[2.0, 5.0], [24.0, 0.0]]), np.array([[2, 9], [8, 0]]), [[0, -1], [1, -1]])
  assert agg.value() == pytest.approx(2.6)
  records = [
    {"epoch": 0, "sample_nll": [100.0], "sample_tokens": [1]},
    {"epoch": 1, "sample_nll": [2.0], "sample_tokens": [2]},
    {"epoch": 1, "sample_nll": [24.0], "sample_tokens": [8]},
  ]
  restored = metrics.EpochAggregate()
  restored.restore(records, epoch=1)
  assert restored.value() == pytest.approx(2.6)
  restored.reset()
  assert restored.value() == 0.0


def _out(loss=1.5):
  return {
    "loss": loss,
    "target_loss": loss,
    "target_count": 10.0,
    "tokens": 40.0,
    "grad_norm": 0.5,
    "finite": True,
    "sample_sums": np.array([[2.0, 13.0], [0.0, 0.0]]),
    "sample_counts": np.array([[2.0, 8.0], [0.0, 0.0]]),
  }


def test_step_record_and_records_file(tmp_path):
  record = metrics.step_record(
    step=3, epoch=0, out=_out(), sample_ids=np.array([[4, 9], [-1, -1]]), seconds=0.5, lr=1e-3
  )
  assert record["sample_ids"] == [4, 9] and record["sample_nll"] == [2.0, 13.0]
  assert record["sample_tokens"] == [2, 8] and record["tokens_per_s"] == 80.0
  assert not record["skipped"] and "full_loss" not in record
  path = str(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3):
    metrics.append_record(path, dict(record, step=step))
  assert [r["step"] for r in metrics.repair_records(path, 2)] == [1, 2]
  assert [r["step"] for r in metrics.read_records(path)] == [1, 2]
  assert json.loads(open(path).readline())["loss"] == 1.5
  assert metrics.read_records(str(tmp_path / "none.jsonl")) == []


def test_plot_writes_a_png(tmp_path):
  base = metrics.step_record(
    step=1, epoch=0, out=_out(), sample_ids=np.array([[0, 1], [-1, -1]]), seconds=1.0, lr=0.0
  )
  records = [dict(base, step=s, target_loss=3.0 / s) for s in range(1, 6)]
  records[2]["epoch_loss"] = 1.2
  records[4]["heldout_loss"] = 1.0
  path = tmp_path / "loss.png"
  metrics.plot_losses(records, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_csv(tmp_path):
  rows = [
    dict(prompt="x" * 100, reference="abc", greedy="abd", nll=3.0, tokens=4),
    dict(prompt="short", reference="r", greedy="r", nll=0.5, tokens=2),
  ]
  lines = metrics.format_table(rows, width=20).splitlines()
  assert lines[0].split(" | ")[:3] == ["prompt              ", "reference", "greedy"]
  assert lines[2].startswith("…" + "x" * 19) and lines[2].endswith("0.7500")
  assert len(lines) == 4
  path = tmp_path / "t.csv"
  metrics.write_csv([{"a": 1, "b": "x,y"}], str(path))
  assert path.read_text().splitlines() == ["a,b", '1,"x,y"']
  with pytest.raises(ValueError):
    metrics.write_csv([], str(path))


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
  """A notebook's inline backend must survive a training run that writes its plots."""
  import matplotlib

  from jaxnll.train.modes import policy, preference

  base = metrics.step_record(
    step=1, epoch=0, out=_out(), sample_ids=np.array([[0, 1], [-1, -1]]), seconds=1.0, lr=0.0
  )
  records = [dict(base, step=s, reward=0.1 * s, kl=0.01, margin=0.2, accuracy=0.5) for s in (1, 2)]
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  before = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    metrics.plot_losses(records, str(tmp_path / "loss.png"))
    preference.plot_margins(records, str(tmp_path))
    policy.plot_reward(str(jsonl), str(tmp_path / "reward.png"))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  for name in ("loss.png", "margins.png", "reward.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
