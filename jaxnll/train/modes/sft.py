"""Supervised fine-tuning: the sub-sequence, selective or whole-sequence loss.

``jaxnll train [--loss subsequence|selective|full] [--fused]`` trains
:class:`jaxnll.train.objectives.SFT` on the run's examples; the mode every other falls back
to (no settings of its own: its flags are the common ones of :mod:`jaxnll.train.modes`).
"""

from __future__ import annotations

from jaxnll.train.modes.base import Mode
from jaxnll.train.objectives import LOSS_MODES, Task


class SFTMode(Mode):
  """Plain fine-tuning (``config.train``'s :class:`~jaxnll.train.objectives.SFT`)."""

  def task(self, config, train_examples, out_dir, *, log=print) -> Task:
    del train_examples, out_dir, log
    return Task(config.train.objective())


MODE = SFTMode("sft", losses=LOSS_MODES)
