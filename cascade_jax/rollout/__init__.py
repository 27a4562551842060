"""Generation for RL: the one home of sampling, rollout engines, servers' clients, weight sync and
teacher scoring. The protocol every backend implements is in :mod:`cascade_jax.rollout.types`."""

from .client import ServerClient
from .engine import JaxEngine, RequestHandle
from .sampler import sample_tokens, support_mask
from .types import (FINISH_REASONS, Request, RolloutEngine, RolloutError, Rollouts, Sample,
                    SamplingParams)

__all__ = ["FINISH_REASONS", "Request", "RolloutEngine", "RolloutError", "Rollouts", "Sample",
           "SamplingParams", "JaxEngine", "RequestHandle", "ServerClient", "sample_tokens",
           "support_mask"]
