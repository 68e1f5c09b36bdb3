"""The embedded fine-tuning data set, a byte tokenizer, JSONL loading, padded and packed batches.

A sample is a conversation: messages with a role (``system``, ``user``, ``assistant``) and a
text. It is encoded as one token row

    BOS  ROLE text EOS  ROLE text EOS  ...

with one byte per token, and every assistant turn's text and its closing ``EOS`` form a target
span (:func:`encode`). A prompt/response pair is the two-message conversation ``[x, y]``.

The embedded data set (:func:`embedded_examples`) is generated deterministically in code: a
few thousand instruction pairs from several task families (arithmetic, reversing, copying,
upper-casing, a small English→Spanish phrase table, and look-ups in a list of facts), with
prompts from a handful of bytes to about a hundred, and a held-out split that no training
prompt repeats. A model of well under a million parameters learns it on a CPU in minutes.

Batches are NumPy dicts of fixed shape (``B`` rows, ``T`` tokens, ``S`` segments per row):
``tokens``, ``span_mask``, ``segment_ids`` (0 is padding), ``positions`` (restarting at 0 in
every segment), and ``sample_ids`` ``[B, S]`` (the data-set index of segment ``s + 1`` of each
row, -1 where there is none). Padded batches hold one sample per row; packed batches
(:func:`jaxnll.pack_samples`) fill rows with several.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from jaxnll.spans import pack_samples

# ----------------------------------------------------------------------------- tokenizer

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = 256, 257, 258, 259, 260, 261
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
VOCAB_SIZE = 264  # 256 bytes, 6 special tokens, 2 spare (a multiple of 8)


def encode_text(text: str) -> list[int]:
  """UTF-8 bytes of ``text`` as token ids ``0..255``."""
  return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
  """Token ids back to text; special tokens are dropped, broken UTF-8 is replaced.

  Examples:
    >>> decode([BOS] + encode_text("héllo") + [EOS])
    'héllo'
  """
  return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class Message(NamedTuple):
  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class Example:
  """One conversation; every assistant turn is a target.

  Attributes:
    messages: the turns, in order.
    family: the task family (embedded data) or ``"jsonl"``.
    source: where it came from, for error messages and reports (``"file.jsonl:12"``).
  """

  messages: tuple[Message, ...]
  family: str = ""
  source: str = ""

  @classmethod
  def pair(cls, prompt: str, response: str, **kwargs) -> Example:
    return cls((Message("user", prompt), Message("assistant", response)), **kwargs)

  @property
  def prompt(self) -> str:
    """Everything before the last assistant turn, as text (the context ``x``)."""
    before = self.messages[: self._last_assistant()]
    if len(before) == 1 and before[0].role == "user":
      return before[0].content
    return " | ".join(f"{m.role}: {m.content}" for m in before)

  @property
  def response(self) -> str:
    """The last assistant turn (the reference ``y``)."""
    return self.messages[self._last_assistant()].content

  def _last_assistant(self) -> int:
    return max(i for i, m in enumerate(self.messages) if m.role == "assistant")


def encode(example: Example) -> tuple[np.ndarray, np.ndarray]:
  """The token row and target-span mask of a conversation.

  Returns:
    ``(tokens int32 [L], span_mask bool [L])``; the span covers each assistant text and its
    ``EOS`` (the role token before it is context).

  Examples:
    >>> tokens, span = encode(Example.pair("2+2", "4"))
    >>> tokens.tolist()
    [257, 260, 50, 43, 50, 258, 261, 52, 258]
    >>> span.astype(int).tolist()
    [0, 0, 0, 0, 0, 0, 0, 1, 1]
  """
  tokens, span = [BOS], [False]
  for message in example.messages:
    body = encode_text(message.content) + [EOS]
    tokens += [ROLE_TOKENS[message.role]] + body
    span += [False] + [message.role == "assistant"] * len(body)
  return np.asarray(tokens, np.int32), np.asarray(span, np.bool_)


def encode_prompt(example: Example) -> np.ndarray:
  """The tokens a model continues to answer the last assistant turn (ends with its role)."""
  head = Example(example.messages[: example._last_assistant()])
  tokens = encode(head)[0] if head.messages else np.asarray([BOS], np.int32)
  return np.concatenate([tokens, np.asarray([ASSISTANT], np.int32)])


# ----------------------------------------------------------------------------- embedded data

_WORDS = (
  "apple river stone cloud green quiet small bright happy garden window yellow music paper "
  "light storm table ocean silver tiger forest winter summer candle pencil rabbit castle"
).split()

# English -> Spanish: (noun, gender, plural); adjectives follow the noun and agree with it.
_NOUNS = {
  "cat": ("gato", "m", "gatos"),
  "dog": ("perro", "m", "perros"),
  "house": ("casa", "f", "casas"),
  "book": ("libro", "m", "libros"),
  "table": ("mesa", "f", "mesas"),
  "car": ("coche", "m", "coches"),
  "flower": ("flor", "f", "flores"),
  "bird": ("pájaro", "m", "pájaros"),
  "window": ("ventana", "f", "ventanas"),
  "tree": ("árbol", "m", "árboles"),
}
_ADJECTIVES = {  # masculine, feminine
  "red": ("rojo", "roja"),
  "black": ("negro", "negra"),
  "white": ("blanco", "blanca"),
  "small": ("pequeño", "pequeña"),
  "new": ("nuevo", "nueva"),
  "old": ("viejo", "vieja"),
  "pretty": ("bonito", "bonita"),
  "tall": ("alto", "alta"),
}
_NAMES = "ana ben cleo dan eva finn gus hana ivo jon kim leo mia ned ola pia".split()
_PREAMBLES = (
  "",
  "",
  "",
  "Answer briefly. ",
  "You are a careful assistant; reply with the answer only. ",
  "Here is a small task for you. Please read it and then answer. ",
)


def _pick(rng: random.Random, seq):
  # Only Random.random() is guaranteed to give the same stream on every Python version.
  return seq[int(rng.random() * len(seq))]


def _int(rng: random.Random, lo: int, hi: int) -> int:
  """An int in ``[lo, hi]``."""
  return lo + int(rng.random() * (hi - lo + 1))


def _letters(rng: random.Random, lo: int, hi: int) -> str:
  return "".join(_pick(rng, "abcdefghijklmnopqrstuvwxyz") for _ in range(_int(rng, lo, hi)))


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
  return " ".join(_pick(rng, _WORDS) for _ in range(_int(rng, lo, hi)))


def _add(rng):
  a, b = _int(rng, 0, 99), _int(rng, 0, 99)
  form = _pick(rng, ("What is {a} plus {b}?", "{a} + {b} =", "Add {a} and {b}."))
  return form.format(a=a, b=b), str(a + b)


def _subtract(rng):
  a = _int(rng, 0, 99)
  b = _int(rng, 0, a)
  form = _pick(rng, ("What is {a} minus {b}?", "{a} - {b} =", "Subtract {b} from {a}."))
  return form.format(a=a, b=b), str(a - b)


def _reverse(rng):
  word = _letters(rng, 3, 10)
  return _pick(rng, ("Reverse: ", "Spell backwards: ")) + word, word[::-1]


def _copy(rng):
  text = _phrase(rng, 1, 5)
  return _pick(rng, ("Repeat after me: ", "Copy: ", "Say exactly this: ")) + text, text


def _upper(rng):
  text = _phrase(rng, 1, 3)
  return _pick(rng, ("Uppercase: ", "Shout: ")) + text, text.upper()


def _translate(rng):
  noun = _pick(rng, sorted(_NOUNS))
  adjective = _pick(rng, sorted(_ADJECTIVES))
  es_noun, gender, es_plural = _NOUNS[noun]
  es_adj = _ADJECTIVES[adjective][gender == "f"]
  if rng.random() < 0.5:
    english = f"the {adjective} {noun}"
    spanish = f"{'la' if gender == 'f' else 'el'} {es_noun} {es_adj}"
  else:
    english = f"the {adjective} {noun}s"
    spanish = f"{'las' if gender == 'f' else 'los'} {es_plural} {es_adj}s"
  return _pick(rng, ("Translate to Spanish: ", "In Spanish, ")) + english, spanish


def _lookup(rng):
  names = list(_NAMES)
  count = _int(rng, 2, 6)
  chosen = []
  for _ in range(count):
    name = _pick(rng, names)
    names.remove(name)
    chosen.append((name, _int(rng, 1, 9)))
  facts = " ".join(f"{name} has {n}." for name, n in chosen)
  name, n = _pick(rng, chosen)
  return f"{facts} How many does {name} have?", str(n)


FAMILIES = {
  "add": _add,
  "subtract": _subtract,
  "reverse": _reverse,
  "copy": _copy,
  "upper": _upper,
  "translate": _translate,
  "lookup": _lookup,
}
MAX_LEN = 128
"""Row length of the demo; every embedded sample fits."""


def _generate(per_family: int, seed: int) -> list[Example]:
  rng = random.Random(seed)
  seen: set[str] = set()
  examples = []
  for family, make in FAMILIES.items():
    made = tries = 0
    while made < per_family and tries < 50 * per_family:
      tries += 1
      prompt, response = make(rng)
      prompt = _pick(rng, _PREAMBLES) + prompt
      if prompt in seen:  # no prompt twice, so held-out prompts are never trained on
        continue
      example = Example.pair(prompt, response, family=family, source=f"embedded:{family}")
      if len(encode(example)[0]) > MAX_LEN:
        continue
      seen.add(prompt)
      examples.append(example)
      made += 1
  return examples


_EMBEDDED: list[Example] | None = None


def embedded_examples(split: str = "train") -> list[Example]:
  """The embedded instruction data: ``"train"``, ``"heldout"`` (every 10th) or ``"all"``.

  Deterministic: the same list on every machine and Python version.

  Examples:
    >>> len(embedded_examples("all")), len(embedded_examples("heldout"))
    (3500, 350)
    >>> ex = embedded_examples("heldout")[252]
    >>> ex.family, ex.prompt, ex.response
    ('translate', 'In Spanish, the black dog', 'el perro negro')
  """
  global _EMBEDDED
  if _EMBEDDED is None:
    _EMBEDDED = _generate(per_family=500, seed=20250101)
  return split_examples(_EMBEDDED, split)


def split_examples(examples: Sequence[Example], split: str) -> list[Example]:
  """The deterministic split of a list: every 10th example (index 9, 19, ...) is held out."""
  if split == "all":
    return list(examples)
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
  keep = 9 if split == "heldout" else None
  return [ex for i, ex in enumerate(examples) if (i % 10 == 9) == (keep is not None)]


# ----------------------------------------------------------------------------- JSONL


class DataError(ValueError):
  """A malformed data file; the message names the file and line."""


def _text(where: str, what: str, text: str) -> str:
  """``text`` if it encodes as UTF-8; a lone UTF-16 surrogate (``"\\ud800"`` in JSON) does not."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(
      f"{where}: {what} holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X} at character "
      f"{e.start + 1}), not text"
    ) from None
  return text


def _message(where: str, i: int, m) -> Message:
  if not isinstance(m, dict):
    raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
  for key in ("role", "content"):
    if key not in m:
      raise DataError(f"{where}: messages[{i}] has no {key!r}")
  role, content = m["role"], m["content"]
  if role not in ROLE_TOKENS:
    raise DataError(
      f"{where}: messages[{i}] has role {role!r}; expected one of {tuple(ROLE_TOKENS)}"
    )
  if not isinstance(content, str):
    raise DataError(
      f"{where}: messages[{i}] content must be a string, got {type(content).__name__}"
    )
  return Message(role, _text(where, f"messages[{i}] content", content))


def parse_record(record, where: str) -> Example:
  """One JSON record as an :class:`Example`; raises :class:`DataError` naming ``where``."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise DataError(f"{where}: 'messages' must be a non-empty list")
    parsed = tuple(_message(where, i, m) for i, m in enumerate(messages))
    if not any(m.role == "assistant" for m in parsed):
      raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return Example(parsed, family="jsonl", source=where)
  if "prompt" in record and "answer" in record and "response" not in record:
    record = {"prompt": record["prompt"], "response": record["answer"]}  # verifiable answers
  if "prompt" in record or "response" in record:
    for key in ("prompt", "response"):
      if key not in record:
        raise DataError(f"{where}: record has no {key!r}")
      if not isinstance(record[key], str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    prompt, response = (_text(where, repr(k), record[k]) for k in ("prompt", "response"))
    return Example.pair(prompt, response, family="jsonl", source=where)
  raise DataError(
    f"{where}: expected {{'prompt', 'response'}} or {{'messages'}}, got keys {sorted(record)}"
  )


def load_jsonl(path: str | os.PathLike) -> list[Example]:
  """Reads a JSONL file of ``{"prompt", "response"}`` or chat ``{"messages"}`` records.

  In a chat record every assistant turn is a target span. Blank lines are skipped.

  Raises:
    DataError: for a missing or empty file, bytes that are not UTF-8, invalid JSON, or a
      malformed record, naming the line (``data.jsonl:7: ...``).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  examples = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(
          f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      examples.append(parse_record(record, where))
  if not examples:
    raise DataError(f"{path}: no records")
  return examples


def write_jsonl(examples: Sequence[Example], path: str | os.PathLike) -> None:
  """Writes examples as chat records (readable back with :func:`load_jsonl`)."""
  with open(path, "w", encoding="utf-8") as f:
    for ex in examples:
      messages = [{"role": m.role, "content": m.content} for m in ex.messages]
      f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- batches

Sample = tuple[np.ndarray, np.ndarray]


def encode_all(examples: Sequence[Example], length: int) -> list[Sample]:
  """Encodes every example; one longer than ``length`` tokens is an error naming it."""
  samples = []
  for ex in examples:
    tokens, span = encode(ex)
    if len(tokens) > length:
      raise DataError(
        f"{ex.source or 'sample'}: {len(tokens)} tokens, longer than the row length {length}"
      )
    samples.append((tokens, span))
  return samples


def _empty(rows: int, length: int, segments: int) -> dict[str, np.ndarray]:
  return {
    "tokens": np.full((rows, length), PAD, np.int32),
    "span_mask": np.zeros((rows, length), np.bool_),
    "segment_ids": np.zeros((rows, length), np.int32),
    "positions": np.zeros((rows, length), np.int32),
    "sample_ids": np.full((rows, segments), -1, np.int32),
  }


def pad_batch(
  samples: Sequence[Sample], ids: Sequence[int], *, rows: int, length: int, segments: int = 1
) -> dict[str, np.ndarray]:
  """One sample per row, padded to ``[rows, length]``; unused rows are empty.

  Examples:
    >>> b = pad_batch([encode(Example.pair("a", "b"))], [7], rows=2, length=8)
    >>> b["segment_ids"].tolist(), b["sample_ids"].tolist()
    ([[1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0]], [[7], [-1]])
  """
  if len(samples) > rows:
    raise ValueError(f"{len(samples)} samples do not fit in {rows} rows")
  batch = _empty(rows, length, segments)
  for r, ((tokens, span), i) in enumerate(zip(samples, ids, strict=True)):
    n = len(tokens)
    batch["tokens"][r, :n] = tokens
    batch["span_mask"][r, :n] = span
    batch["segment_ids"][r, :n] = 1
    batch["positions"][r, :n] = np.arange(n)
    batch["sample_ids"][r, 0] = i
  return batch


def pack_batch(
  samples: Sequence[Sample], ids: Sequence[int], *, rows: int, length: int, segments: int
) -> dict[str, np.ndarray] | None:
  """Packs samples first-fit into ``[rows, length]``; ``None`` if they need more room."""
  packed = pack_samples(samples, length, pad_id=PAD)
  if len(packed.sample_index) > rows or any(len(m) > segments for m in packed.sample_index):
    return None
  batch = _empty(rows, length, segments)
  r = len(packed.sample_index)
  for key in ("tokens", "span_mask", "segment_ids", "positions"):
    batch[key][:r] = getattr(packed, key)
  for row, members in enumerate(packed.sample_index):
    batch["sample_ids"][row, : len(members)] = [ids[m] for m in members]
  return batch


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Fixed batch shape: ``rows × length`` tokens, up to ``segments`` samples a row."""

  rows: int = 32
  length: int = MAX_LEN
  pack: bool = False
  segments: int = 16

  def __post_init__(self):
    for name in ("rows", "length", "segments"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"batch {name} must be a positive int, got {value!r}")

  @property
  def max_segments(self) -> int:
    return self.segments if self.pack else 1


def _take_packed(samples, order, start, spec: BatchSpec):
  """The largest prefix of ``order[start:]`` that packs into one batch, as (batch, count)."""
  budget, n = spec.rows * spec.length, 0
  while start + n < len(order) and budget >= len(samples[order[start + n]][0]):
    budget -= len(samples[order[start + n]][0])
    n += 1
  while n > 0:
    ids = order[start : start + n]
    batch = pack_batch(
      [samples[i] for i in ids], ids, rows=spec.rows, length=spec.length, segments=spec.segments
    )
    if batch is not None:
      return batch, n
    n -= max(1, n // 50)  # first-fit leaves a little room unused; back off and repack
  raise ValueError("a sample does not fit in an empty batch")


def epoch_batches(samples: Sequence[Sample], spec: BatchSpec, order: Sequence[int]):
  """The batches of one pass over ``samples`` in ``order``; the last may have empty rows."""
  order = [int(i) for i in order]
  start = 0
  while start < len(order):
    if spec.pack:
      batch, n = _take_packed(samples, order, start, spec)
    else:
      n = min(spec.rows, len(order) - start)
      ids = order[start : start + n]
      batch = pad_batch([samples[i] for i in ids], ids, rows=spec.rows, length=spec.length)
    start += n
    yield batch


class Step(NamedTuple):
  epoch: int
  last_in_epoch: bool
  batch: dict[str, np.ndarray]


def train_stream(
  samples: Sequence[Sample], spec: BatchSpec, *, seed: int, start_step: int = 0
) -> Iterator[Step]:
  """Endless shuffled epochs of fixed-shape batches, reproducible from ``(seed, step)``.

  Epoch ``e`` visits the samples in ``numpy.random.default_rng([seed, e]).permutation``
  order; ``start_step`` skips the first batches (for resuming), so the stream from step ``k``
  is the same whether or not the run stopped before it.
  """
  if not samples:
    raise ValueError("no training samples")
  step, epoch = 0, 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(len(samples))
    batches = list(epoch_batches(samples, spec, order))
    for i, batch in enumerate(batches):
      if step >= start_step:
        yield Step(epoch, i == len(batches) - 1, batch)
      step += 1
    epoch += 1


def eval_batches(samples: Sequence[Sample], spec: BatchSpec) -> Iterator[dict[str, np.ndarray]]:
  """Padded batches over ``samples`` in order (sample ids are list indices)."""
  spec = dataclasses.replace(spec, pack=False)
  return epoch_batches(samples, spec, range(len(samples)))


def check_rows(spec: BatchSpec, *, accum: int, devices: int) -> None:
  """Micro-batches must split evenly over ``devices``: ``rows % (accum · devices) == 0``."""
  if spec.rows % (accum * devices):
    raise ValueError(
      f"batch rows ({spec.rows}) must be divisible by accum ({accum}) × devices ({devices})"
    )


def drop_long(examples: Sequence[Example], length: int) -> list[Example]:
  """Drops examples longer than ``length`` tokens with one warning naming a few of them."""
  keep, dropped = [], []
  for ex in examples:
    (keep if len(encode(ex)[0]) <= length else dropped).append(ex)
  if dropped:
    names = ", ".join(ex.source for ex in dropped[:3])
    warnings.warn(
      f"dropped {len(dropped)} example(s) longer than {length} tokens ({names}, ...)",
      stacklevel=2,
    )
  return keep
