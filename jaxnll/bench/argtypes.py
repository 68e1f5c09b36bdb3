"""Command-line value domains: ``argparse`` ``type=`` validators shared by ``jaxnll train``,
``eval`` and ``bench``.  Application code (standard library only), kept in the benchmark
package, the application package that loads no flax: ``jaxnll bench`` parses without the
training extra.  A value outside its domain is refused while parsing, in one line naming the
flag (``argument --steps: must be an integer >= 1, got '0'``).
"""

from __future__ import annotations

import argparse
import math
import os


def _int(text: str, low: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
  if value < low:
    raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1."""
  return _int(text, 1)


def nonnegative_int(text: str) -> int:
  """An integer >= 0."""
  return _int(text, 0)


def positive_float(text: str) -> float:
  """A finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
  return value


def unit_float(text: str) -> float:
  """A number in [0, 1]."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
  return value


def fraction_list(text: str) -> tuple[float, ...]:
  """Comma-separated fractions, each in (0, 1] (``"1,0.5,0.25"``)."""
  parts = [p.strip() for p in text.split(",") if p.strip()]
  values = []
  for p in parts:
    try:
      v = float(p)
    except ValueError:
      v = math.nan
    if not 0.0 < v <= 1.0:
      raise argparse.ArgumentTypeError(
        f"must be comma-separated fractions in (0, 1], got {p!r} in {text!r}"
      )
    values.append(v)
  if not values:
    raise argparse.ArgumentTypeError(f"must list at least one fraction in (0, 1], got {text!r}")
  return tuple(values)


def batch_tokens(text: str) -> tuple[int, int]:
  """``BxT``: rows and tokens per row, both >= 1 (``"2x128"``)."""
  b, sep, t = text.lower().partition("x")
  try:
    shape = int(b), int(t)
  except ValueError:
    shape = (0, 0)
  if not sep or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"must be BxT with B, T >= 1 (e.g. 2x128), got {text!r}")
  return shape


def output_dir(text: str) -> str:
  """A directory to write into: absent (it is created) or a directory, not a file."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
  return text


def output_file(text: str) -> str:
  """A file to write: not a directory, in a directory that exists."""
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
  parent = os.path.dirname(text) or "."
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(f"{text}: no such directory {parent}")
  return text
