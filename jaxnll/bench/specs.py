"""The one table of heads every benchmark runs: real language-model heads, scaled per backend.

A :class:`Spec` names a head (hidden size ``D``, vocabulary ``V``) and its token counts on a CPU
and on an accelerator; :func:`resolve` turns it into the :class:`Case` that is actually run.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
  """A named head: hidden size ``D``, vocabulary ``V`` and token counts per backend."""

  name: str
  model: str
  hidden: int
  vocab: int
  cpu: tuple[int, int]
  """``(B, T)`` on CPU (scaled down)."""
  accel: tuple[int, int] | None = (4, 2048)
  """``(B, T)`` on GPU / TPU; None: a CPU-only head."""
  quick: tuple[int, int] | None = None
  """``(B, T)`` for ``--quick`` on CPU (default: ``cpu``)."""
  teacher_hidden: int | None = None
  """The hidden size of a distillation teacher of this head (the fused distillation rows;
  None: twice ``hidden``)."""


SPECS: dict[str, Spec] = {
  s.name: s
  for s in (
    Spec("gemma2-2b", "Gemma-2 2B", 2304, 256000, cpu=(1, 128), teacher_hidden=3584),  # 9B
    Spec("llama3-8b", "Llama-3 8B", 4096, 128256, cpu=(1, 128), teacher_hidden=8192),  # 70B
    Spec("qwen3-8b", "Qwen3 8B", 4096, 151936, cpu=(1, 128), teacher_hidden=5120),  # 32B
    Spec("mistral-7b", "Mistral 7B", 4096, 32768, cpu=(2, 128)),
    Spec(
      "mistral-7b-d256",
      "Mistral 7B vocabulary, hidden size scaled to 256",
      256,
      32768,
      cpu=(4, 256),
      accel=None,
      quick=(2, 128),
    ),
  )
}
#: ``--quick`` runs this head on CPU, this one on accelerators.
QUICK_SPEC = {"cpu": "mistral-7b-d256", "accel": "llama3-8b"}
FRACTIONS = (1.0, 0.5, 0.25)
QUICK_FRACTIONS = (1.0, 0.25)
#: The vocabularies of the table's heads, smallest first (a memory-against-``V`` curve).
VOCABS = tuple(sorted({s.vocab for s in SPECS.values()}))


def with_vocab(spec: Spec, vocab: int) -> Spec:
  """``spec`` with another vocabulary, named ``NAME@V=vocab`` (itself if ``vocab`` is its own)."""
  if vocab == spec.vocab:
    return spec
  return dataclasses.replace(spec, name=f"{spec.name}@V={vocab}", vocab=vocab)


def distill_case(case: Case) -> Case:
  """``case`` as a fused-distillation case: the same student head and tokens, a teacher of
  :attr:`Spec.teacher_hidden`, named ``NAME+kd`` (its own table in the report)."""
  spec = case.spec
  teacher = spec.teacher_hidden or 2 * spec.hidden
  spec = dataclasses.replace(
    spec,
    name=f"{spec.name}+kd",
    model=f"fused distillation, student {spec.model}, teacher D = {teacher}",
    teacher_hidden=teacher,
  )
  return dataclasses.replace(case, spec=spec)


@dataclasses.dataclass(frozen=True)
class Case:
  """One spec resolved for a backend: the shapes and dtype that are actually run."""

  spec: Spec
  batch: int
  length: int
  dtype: str = "float32"
  token_chunk: int | None = None
  """The fused kernels' ``token_chunk`` (None: the library default)."""

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  @property
  def hidden(self) -> int:
    return self.spec.hidden

  @property
  def vocab(self) -> int:
    return self.spec.vocab


def is_accelerator(backend: str | None = None) -> bool:
  return (backend or jax.default_backend()) != "cpu"


def resolve(
  spec: Spec,
  *,
  backend: str | None = None,
  quick: bool = False,
  dtype: str | None = None,
  tokens: tuple[int, int] | None = None,
) -> Case:
  """The :class:`Case` of ``spec`` on ``backend`` (default: JAX's default backend)."""
  accel = is_accelerator(backend) and spec.accel is not None
  if tokens is None:
    tokens = spec.accel if accel else (spec.quick if quick and spec.quick else spec.cpu)
  b, t = tokens
  if dtype is None:
    dtype = "bfloat16" if accel else "float32"
  # Scaled-down token counts would fit one library-default chunk: no span skipping at all.
  chunk = None if accel else max(8, b * t // 4 // 8 * 8)
  return Case(spec, b, t, dtype, chunk)


def span_mask(batch: int, length: int, fraction: float) -> np.ndarray:
  """Fine-tuning layout: the last ``fraction`` of every row is the target span, the rest
  context."""
  start = length - int(round(fraction * length))
  return np.broadcast_to(np.arange(length) >= start, (batch, length)).copy()


def tokens_arg(s: str) -> tuple[int, int]:
  """``"BxT"`` (a command-line value) as ``(B, T)``."""
  b, t = s.lower().split("x")
  return int(b), int(t)
