"""Tests for jaxnll/data.py: embedded set, tokenizer, JSONL loading and its errors, batches."""

import collections
import json
import random

import numpy as np
import pytest

from jaxnll.train import data
from jaxnll.train.data import BatchSpec, DataError, Example, Message


def test_embedded_set_is_deterministic_and_split():
  train, heldout = data.embedded_examples("train"), data.embedded_examples("heldout")
  assert len(train) == 3150 and len(heldout) == 350
  assert data._generate(per_family=500, seed=20250101) == data.embedded_examples("all")
  families = collections.Counter(ex.family for ex in heldout)
  assert set(families) == set(data.FAMILIES) and min(families.values()) == 50
  assert not {ex.prompt for ex in train} & {ex.prompt for ex in heldout}


def test_embedded_prompts_vary_widely_and_fit_the_rows():
  examples = data.embedded_examples("all")
  prompts = np.asarray([len(data.encode_prompt(ex)) for ex in examples])
  totals = np.asarray([len(data.encode(ex)[0]) for ex in examples])
  assert prompts.min() < 15 and prompts.max() > 100
  assert totals.max() <= data.MAX_LEN
  # Most of every row is context: the span mask decides what is learned.
  spans = np.asarray([data.encode(ex)[1].sum() for ex in examples])
  assert spans.sum() < 0.25 * totals.sum()


def test_embedded_answers_are_right():
  for ex in data.embedded_examples("all")[::7]:
    p, r = ex.prompt, ex.response
    if ex.family == "add":
      a, b = [int(t) for t in p.replace("?", " ").replace(".", " ").split() if t.isdigit()]
      assert int(r) == a + b
    elif ex.family == "reverse":
      assert p.split()[-1][::-1] == r
    elif ex.family == "upper":
      assert p.split(": ", 1)[-1].upper() == r


def test_encode_prompt_response():
  tokens, span = data.encode(Example.pair("hi", "yo"))
  assert data.decode(tokens) == "hiyo"
  assert tokens.tolist() == [data.BOS, data.USER, 104, 105, data.EOS, data.ASSISTANT, 121, 111,
                             data.EOS]  # fmt: skip
  assert span.tolist() == [False] * 6 + [True] * 3
  assert data.encode_prompt(Example.pair("hi", "yo")).tolist() == tokens[:6].tolist()


def test_chat_every_assistant_turn_is_a_target():
  ex = Example(
    (
      Message("system", "s"),
      Message("user", "a"),
      Message("assistant", "bc"),
      Message("user", "d"),
      Message("assistant", "e"),
    )
  )
  tokens, span = data.encode(ex)
  text = [chr(t) if t < 256 else "|" for t in tokens]
  assert "".join(t for t, s in zip(text, span, strict=True) if s) == "bc|e|"
  assert ex.response == "e"
  assert ex.prompt == "system: s | user: a | assistant: bc | user: d"


def test_utf8_round_trip():
  text = "el pájaro pequeño ✓"
  assert data.decode(data.encode_text(text)) == text


def _write(tmp_path, lines):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_load_jsonl_both_formats(tmp_path):
  chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  path = _write(tmp_path, [json.dumps({"prompt": "x", "response": "y"}), "", json.dumps(chat)])
  examples = data.load_jsonl(path)
  assert [(ex.prompt, ex.response) for ex in examples] == [("x", "y"), ("q", "a")]
  assert examples[1].source.endswith("d.jsonl:3")
  out = tmp_path / "round.jsonl"
  data.write_jsonl(examples, out)
  assert [ex.messages for ex in data.load_jsonl(out)] == [ex.messages for ex in examples]


@pytest.mark.parametrize(
  "bad, message",
  [
    ("{not json", "d.jsonl:2: invalid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object"),
    ('{"prompt": "x"}', "d.jsonl:2: record has no 'response'"),
    ('{"prompt": "x", "response": 3}', "d.jsonl:2: 'response' must be a string"),
    ('{"text": "x"}', "d.jsonl:2: expected {'prompt', 'response'} or {'messages'}"),
    ('{"messages": []}', "d.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "d.jsonl:2: messages\\[0\\] has no 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "d.jsonl:2: messages\\[0\\] has role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:2: no assistant message"),
  ],
)
def test_malformed_records_name_the_line(tmp_path, bad, message):
  path = _write(tmp_path, [json.dumps({"prompt": "ok", "response": "ok"}), bad])
  with pytest.raises(DataError, match=message):
    data.load_jsonl(path)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    data.load_jsonl(tmp_path / "nope.jsonl")
  with pytest.raises(DataError, match="no records"):
    data.load_jsonl(_write(tmp_path, ["", "  "]))


def test_long_examples_are_dropped_with_a_warning_or_refused():
  short, long = Example.pair("a", "b", source="f:1"), Example.pair("a" * 50, "b", source="f:2")
  with pytest.warns(UserWarning, match="dropped 1 example.*f:2"):
    assert data.drop_long([short, long], 20) == [short]
  with pytest.raises(DataError, match="f:2: 56 tokens, longer than the row length 20"):
    data.encode_all([long], 20)


def _samples(n, seed=0):
  rng = random.Random(seed)
  examples = [
    Example.pair("p" * rng.randint(1, 30), "r" * rng.randint(1, 8), source=str(i)) for i in range(n)
  ]
  return data.encode_all(examples, 48)


def _unpack(batch):
  """{sample id: (tokens, span)} recovered from a batch."""
  out = {}
  for r in range(batch["tokens"].shape[0]):
    for s, i in enumerate(batch["sample_ids"][r]):
      if i < 0:
        continue
      at = batch["segment_ids"][r] == s + 1
      assert (batch["positions"][r][at] == np.arange(at.sum())).all()
      out[int(i)] = (batch["tokens"][r][at].tolist(), batch["span_mask"][r][at].tolist())
  return out


@pytest.mark.parametrize("pack", [False, True])
def test_an_epoch_holds_every_sample_once_in_fixed_shapes(pack):
  samples = _samples(45)
  spec = BatchSpec(rows=4, length=48, pack=pack, segments=6)
  seen = {}
  for batch in data.epoch_batches(samples, spec, np.random.default_rng(0).permutation(45)):
    assert batch["tokens"].shape == (4, 48)
    assert batch["sample_ids"].shape == (4, spec.max_segments)
    got = _unpack(batch)
    assert not set(got) & set(seen)
    seen.update(got)
  assert sorted(seen) == list(range(45))
  for i, (tokens, span) in seen.items():
    assert tokens == samples[i][0].tolist() and span == samples[i][1].tolist()


def test_packing_fills_rows_better_than_padding():
  samples = _samples(60)
  count = lambda pack: len(
    list(data.epoch_batches(samples, BatchSpec(rows=4, length=48, pack=pack), range(60)))
  )
  assert count(True) < 0.8 * count(False)


def test_train_stream_is_reproducible_from_any_step():
  samples = _samples(20)
  spec = BatchSpec(rows=4, length=48, pack=True, segments=4)
  full = data.train_stream(samples, spec, seed=3)
  steps = [next(full) for _ in range(9)]
  later = data.train_stream(samples, spec, seed=3, start_step=5)
  for a in steps[5:]:
    b = next(later)
    assert (a.epoch, a.last_in_epoch) == (b.epoch, b.last_in_epoch)
    for key in a.batch:
      np.testing.assert_array_equal(a.batch[key], b.batch[key])
  assert steps[-1].epoch >= 1 and any(s.last_in_epoch for s in steps)
  other = next(data.train_stream(samples, spec, seed=4)).batch["sample_ids"]
  assert not np.array_equal(other, steps[0].batch["sample_ids"])


def test_row_divisibility_check():
  data.check_rows(BatchSpec(rows=32), accum=4, devices=8)
  with pytest.raises(ValueError, match="divisible by accum"):
    data.check_rows(BatchSpec(rows=12), accum=2, devices=8)


@pytest.mark.parametrize(
  "record",
  [
    '{"prompt": "a\\ud800b", "response": "c"}',
    '{"prompt": "a", "response": "\\udfff"}',
    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\ud83d"}]}',
  ],
)
def test_a_lone_utf16_surrogate_is_a_data_error_naming_the_line(tmp_path, record):
  path = _write(tmp_path, [json.dumps({"prompt": "ok", "response": "ok"}), record])
  with pytest.raises(DataError, match=r"d\.jsonl:2: .*lone UTF-16 surrogate \(U\+D[8-F]"):
    data.load_jsonl(path)
  # A surrogate pair is one character (an emoji), which is fine.
  path = _write(tmp_path, ['{"prompt": "\\ud83d\\ude00", "response": "ok"}'])
  assert data.load_jsonl(path)[0].prompt == "\U0001f600"
