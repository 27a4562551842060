"""What data, rollout and rl exchange, below all three (they import it; it imports none of
them): the sampling contract (:mod:`.sampling`)."""

from .sampling import SamplingMismatchError, SamplingParams, check_temperature, shared_sampling

__all__ = ["SamplingParams", "SamplingMismatchError", "check_temperature", "shared_sampling"]
