"""jaxnll: exact, memory-lean sub-sequence negative log-likelihood for JAX / Flax.

The public API, one name per line; ``__all__`` lists exactly these, so a star import brings
these names and no submodule.  The contract: ``docs/contract.rst``.
"""

from jaxnll.checks import checked as checked
from jaxnll.distill import distill_cross_entropy as distill_cross_entropy
from jaxnll.fused import linear_distill_loss as linear_distill_loss
from jaxnll.fused import linear_nll_loss as linear_nll_loss
from jaxnll.fused import linear_segment_nll as linear_segment_nll
from jaxnll.fused import linear_sequence_nll as linear_sequence_nll
from jaxnll.fused import linear_token_nll as linear_token_nll
from jaxnll.nll import batch_loss as batch_loss
from jaxnll.nll import loss_terms as loss_terms
from jaxnll.nll import segment_nll as segment_nll
from jaxnll.nll import selective_sequence_nll as selective_sequence_nll
from jaxnll.nll import sequence_nll as sequence_nll
from jaxnll.nll import token_nll as token_nll
from jaxnll.policy import group_advantages as group_advantages
from jaxnll.policy import k3_kl as k3_kl
from jaxnll.policy import policy_loss_terms as policy_loss_terms
from jaxnll.policy import ppo_clip_loss as ppo_clip_loss
from jaxnll.preference import dpo_loss as dpo_loss
from jaxnll.preference import orpo_loss as orpo_loss
from jaxnll.preference import preference_metrics as preference_metrics
from jaxnll.preference import simpo_loss as simpo_loss
from jaxnll.spans import concat_sample as concat_sample
from jaxnll.spans import from_ignore_index as from_ignore_index
from jaxnll.spans import pack_samples as pack_samples
from jaxnll.spans import shift_targets as shift_targets
from jaxnll.spans import spans_to_mask as spans_to_mask
from jaxnll.spans import stop_gradient_outside as stop_gradient_outside

__version__ = "0.1.0"

__all__ = [
  "checked",
  "distill_cross_entropy",
  "linear_distill_loss",
  "linear_nll_loss",
  "linear_segment_nll",
  "linear_sequence_nll",
  "linear_token_nll",
  "batch_loss",
  "loss_terms",
  "segment_nll",
  "selective_sequence_nll",
  "sequence_nll",
  "token_nll",
  "group_advantages",
  "k3_kl",
  "policy_loss_terms",
  "ppo_clip_loss",
  "dpo_loss",
  "orpo_loss",
  "preference_metrics",
  "simpo_loss",
  "concat_sample",
  "from_ignore_index",
  "pack_samples",
  "shift_targets",
  "spans_to_mask",
  "stop_gradient_outside",
]
