"""The language-model head fused with the sub-sequence loss: no ``[B, T, V]`` logits.

One op folder: :mod:`~jaxnll.fused.api` holds the public entries, their argument checks and
the table of implementations behind ``implementation=``; :mod:`~jaxnll.fused.kernel` the
interface they share (the ``Kernel`` and ``Passes`` protocols, planning);
:mod:`~jaxnll.fused.vjp` the custom-VJP rules of the compacted kernels;
:mod:`~jaxnll.fused.compact` the span compaction every implementation shares; one module per
implementation (:mod:`~jaxnll.fused.xla` for ``"xla"`` and ``"reference"``,
:mod:`~jaxnll.fused.chunked`, :mod:`~jaxnll.fused.token_chunked`,
:mod:`~jaxnll.fused.pallas_tpu`) and :mod:`~jaxnll.fused.auto`, which picks one per
platform; :mod:`~jaxnll.fused.distill` the fused distillation divergences on the same
compaction.
"""

from jaxnll.fused.api import DEFAULT_TOKEN_CHUNK as DEFAULT_TOKEN_CHUNK
from jaxnll.fused.api import DEFAULT_VOCAB_CHUNK as DEFAULT_VOCAB_CHUNK
from jaxnll.fused.api import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxnll.fused.api import LAYOUTS as LAYOUTS
from jaxnll.fused.api import check_inputs as check_inputs
from jaxnll.fused.api import linear_nll_loss as linear_nll_loss
from jaxnll.fused.api import linear_segment_nll as linear_segment_nll
from jaxnll.fused.api import linear_sequence_nll as linear_sequence_nll
from jaxnll.fused.api import linear_token_nll as linear_token_nll
from jaxnll.fused.distill import linear_distill_loss as linear_distill_loss
