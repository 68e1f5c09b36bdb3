"""The application around the loss library: a small model, data, training, distillation.

Layers, each importing only those before it:

* :mod:`~jaxnll.train.model` — a decoder-only transformer and an LSTM (Flax NNX);
* :mod:`~jaxnll.train.data` — the embedded instruction set, JSONL, padded and packed batches;
* :mod:`~jaxnll.train.objectives` — what the step differentiates (numerator, denominator,
  per-sample metrics), supervised fine-tuning, and the :class:`~jaxnll.train.objectives.Task`
  around an objective;
* :mod:`~jaxnll.train.step` — the exact, accumulated NNX train step;
* :mod:`~jaxnll.train.generate` — decoding;
* :mod:`~jaxnll.train.run`, :mod:`~jaxnll.train.loop` — run directories (and
  :func:`~jaxnll.train.run.load_run`, a trained run read back) and the run loop, which trains
  whatever task it is given;
* :mod:`~jaxnll.train.modes` — the training modes (fine-tuning, distillation, preference, RL),
  one module each in one table: what ``jaxnll train`` and :func:`jaxnll.train.modes.fit` run;
* :mod:`~jaxnll.train.metrics`, :mod:`~jaxnll.train.runtime` — records and plots; sharded
  state and processes.

The names most code needs are re-exported here.
"""

from jaxnll.train.loop import evaluate as evaluate
from jaxnll.train.loop import evaluate_run as evaluate_run
from jaxnll.train.loop import fit as fit
from jaxnll.train.loop import greedy_responses as greedy_responses
from jaxnll.train.objectives import LOSS_MODES as LOSS_MODES
from jaxnll.train.objectives import SFT as SFT
from jaxnll.train.objectives import Objective as Objective
from jaxnll.train.objectives import segment_counts as segment_counts
from jaxnll.train.run import RunConfig as RunConfig
from jaxnll.train.run import build_trainer as build_trainer
from jaxnll.train.run import load_examples as load_examples
from jaxnll.train.run import load_run as load_run
from jaxnll.train.run import restore_state as restore_state
from jaxnll.train.step import TrainConfig as TrainConfig
from jaxnll.train.step import Trainer as Trainer
from jaxnll.train.step import accumulate_gradients as accumulate_gradients
from jaxnll.train.step import eval_step as eval_step
from jaxnll.train.step import export_train_step as export_train_step
from jaxnll.train.step import make_optimizer as make_optimizer
from jaxnll.train.step import make_schedule as make_schedule
from jaxnll.train.step import micro_batches as micro_batches
from jaxnll.train.step import train_step as train_step
from jaxnll.train.step import train_step_fn as train_step_fn
