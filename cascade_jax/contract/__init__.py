"""What data, rollout and rl exchange, below all three (they import it; it imports none of
them):

=================  ============================================================================
module             holds
=================  ============================================================================
``sampling``       the sampling contract :class:`SamplingParams` (log-probs at temperature τ)
``batch``          the batch types :class:`RLBatch` / :class:`SFTBatch` and the finish codes
``formats``        text formats both sides parse or write (the tool-call format)
=================  ============================================================================

Domain names and ids are :mod:`cascade_jax.domains` (also below all three).
"""

from .batch import FINISH_ABORT, FINISH_LENGTH, FINISH_REASONS, FINISH_STOP, RLBatch, SFTBatch
from .formats import format_tool_call
from .sampling import SamplingMismatchError, SamplingParams, check_temperature, shared_sampling

__all__ = ["SamplingParams", "SamplingMismatchError", "check_temperature", "shared_sampling",
           "RLBatch", "SFTBatch", "FINISH_REASONS", "FINISH_STOP", "FINISH_LENGTH", "FINISH_ABORT",
           "format_tool_call"]
