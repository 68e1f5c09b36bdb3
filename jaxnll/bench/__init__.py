"""Benchmark suite: jaxnll's losses against their peers at real language-model heads.

``jaxnll bench`` (or ``python -m jaxnll.bench``) measures, for each head of the table
(:mod:`~jaxnll.bench.specs`) and each implementation of the same loss
(:mod:`~jaxnll.bench.impls`) — the summed negative log-likelihood of the target span of
``hidden @ weight`` — compile time, temp memory, time and useful FLOP/s of the forward and of
the forward + backward, each implementation checked against :mod:`jaxnll.reference` before
it is timed (:mod:`~jaxnll.bench.harness`).  The scripts in ``bench/`` run the same harness on
other problems (losses from logits, distillation, the vocabulary-parallel head).

The backend picks the size: on CPU the token count is scaled down (and the fused kernels'
token chunk with it, to a quarter of the tokens, so that span skipping has the same
granularity as at full size) and the dtype is float32; on GPU / TPU every head runs at
``4 × 2048`` tokens in bfloat16 with the library's default chunks.  ``--quick`` runs one small
case: on CPU the Mistral-7B vocabulary with the hidden size scaled to 256.

Results are appended, one number per record (long format, :mod:`~jaxnll.bench.records`), to
``OUT/bench.csv`` and ``OUT/bench.jsonl`` with the device, jax version, git commit and date;
:func:`report` turns them into ``OUT/bench.md`` and one PNG per head and device.

Modules: ``specs`` (the head table), ``impls`` (what is compared), ``harness`` (measuring),
``records`` (the record schema and files), ``report`` (table and plots), ``cli`` (the entry).
"""

from jaxnll.bench.cli import add_arguments as add_arguments
from jaxnll.bench.cli import case_of as case_of
from jaxnll.bench.cli import failures as failures
from jaxnll.bench.cli import finish as finish
from jaxnll.bench.cli import fractions_arg as fractions_arg
from jaxnll.bench.cli import main as main
from jaxnll.bench.cli import run as run
from jaxnll.bench.cli import script_parser as script_parser
from jaxnll.bench.harness import PASSES as PASSES
from jaxnll.bench.harness import Progress as Progress
from jaxnll.bench.harness import bench_case as bench_case
from jaxnll.bench.harness import check as check
from jaxnll.bench.harness import check_case as check_case
from jaxnll.bench.harness import compile_fn as compile_fn
from jaxnll.bench.harness import fwd_bwd as fwd_bwd
from jaxnll.bench.harness import interleave as interleave
from jaxnll.bench.harness import memory_case as memory_case
from jaxnll.bench.harness import percentiles as percentiles
from jaxnll.bench.harness import relative_error as relative_error
from jaxnll.bench.harness import summarize as summarize
from jaxnll.bench.harness import tolerance as tolerance
from jaxnll.bench.harness import within_budget as within_budget
from jaxnll.bench.impls import DISTILL as DISTILL
from jaxnll.bench.impls import HEAD as HEAD
from jaxnll.bench.impls import LOGITS as LOGITS
from jaxnll.bench.impls import SUITE as SUITE
from jaxnll.bench.impls import Impl as Impl
from jaxnll.bench.impls import Op as Op
from jaxnll.bench.impls import distill_implementations as distill_implementations
from jaxnll.bench.impls import implementations as implementations
from jaxnll.bench.impls import logits_implementations as logits_implementations
from jaxnll.bench.impls import make_inputs as make_inputs
from jaxnll.bench.impls import naive_loss as naive_loss
from jaxnll.bench.impls import optax_loss as optax_loss
from jaxnll.bench.impls import parallel_args as parallel_args
from jaxnll.bench.impls import parallel_implementations as parallel_implementations
from jaxnll.bench.impls import reference_loss as reference_loss
from jaxnll.bench.impls import tokamax_loss as tokamax_loss
from jaxnll.bench.impls import tokamax_unavailable as tokamax_unavailable
from jaxnll.bench.records import FIELDS as FIELDS
from jaxnll.bench.records import Record as Record
from jaxnll.bench.records import case_fields as case_fields
from jaxnll.bench.records import describe_device as describe_device
from jaxnll.bench.records import environment as environment
from jaxnll.bench.records import load as load
from jaxnll.bench.records import record as record
from jaxnll.bench.records import save as save
from jaxnll.bench.records import statuses as statuses
from jaxnll.bench.report import latest as latest
from jaxnll.bench.report import markdown as markdown
from jaxnll.bench.report import plot as plot
from jaxnll.bench.report import plot_curves as plot_curves
from jaxnll.bench.report import report as report
from jaxnll.bench.report import summary as summary
from jaxnll.bench.specs import FRACTIONS as FRACTIONS
from jaxnll.bench.specs import QUICK_FRACTIONS as QUICK_FRACTIONS
from jaxnll.bench.specs import QUICK_SPEC as QUICK_SPEC
from jaxnll.bench.specs import SPECS as SPECS
from jaxnll.bench.specs import VOCABS as VOCABS
from jaxnll.bench.specs import Case as Case
from jaxnll.bench.specs import Spec as Spec
from jaxnll.bench.specs import is_accelerator as is_accelerator
from jaxnll.bench.specs import resolve as resolve
from jaxnll.bench.specs import span_mask as span_mask
from jaxnll.bench.specs import tokens_arg as tokens_arg
from jaxnll.bench.specs import with_vocab as with_vocab
