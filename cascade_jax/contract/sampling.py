"""The sampling contract: one frozen :class:`SamplingParams` for every party of an RL step.

The rollout engines draw with it, :class:`~cascade_jax.rl.batch.RLBatch` records it (its
``sampling`` field, static), and the train step, the MOPD teachers and the KL reference compute
their log-probs at its temperature. A batch sampled at another temperature than the step's is
refused (:func:`check_temperature`).

Log-probs at temperature ``τ`` (SGLang's default semantics)::

    τ > 0:  log p(y) = log softmax(z / τ)[y]     (z the next-token logits; *not* renormalised
                                                   over the top-p / top-k support)
    τ = 0:  greedy decoding, y = argmax z;  log p(y) = log softmax(z)[y]

so :attr:`SamplingParams.logprob_temperature` (``τ``, or 1 for ``τ = 0``) is the one temperature
every log-prob of a batch is computed at. In a run config ``rollout.sampling.temperature`` carries ``τ``
(``0`` = greedy; there is no separate greedy switch) and
:func:`cascade_jax.rollout.factory.sampling_params` builds the contract from it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["SamplingParams", "SamplingMismatchError", "check_temperature", "shared_sampling"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (a subset of SGLang 0.5.23's ``sampling_params``).

    max_new_tokens   response length limit (finish reason ``length`` when reached)
    temperature      τ >= 0; 0 = greedy (module doc: the log-prob semantics)
    top_p            nucleus mass in (0, 1]
    top_k            -1 = off, else keep the k largest logits
    stop_token_ids   a sampled id in this set ends the response (it is kept, finish ``stop``)
    n                samples per request (one group)
    seed             per-request seed: sample ``i`` of the request draws from a key derived
                     from ``(sample_seed(seed, i), step)`` only, so it never depends on slot or
                     batch, and ``n`` samples equal ``n`` one-sample requests seeded
                     ``sample_seed(seed, i)`` (``cascade_jax.rollout.types.sample_seed``)
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple = ()
    n: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k: must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        """``τ = 0``: argmax decoding."""
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs are computed at: ``τ``, or 1 when greedy (module doc)."""
        return float(self.temperature) if self.temperature > 0 else 1.0

    def unseeded(self) -> "SamplingParams":
        """These settings without the per-request ``seed``: what a batch records (the seeds of
        its requests differ; everything else is the run's contract)."""
        return dataclasses.replace(self, seed=None)


class SamplingMismatchError(ValueError):
    """A batch was sampled at another temperature than the step that consumes it."""


def check_temperature(recorded: Optional[SamplingParams], expected: Optional[SamplingParams], *,
                      what: str) -> None:
    """Refuse a batch whose recorded contract has another temperature than the consumer's
    (``what`` names the consumer). Nothing to compare when either is ``None``."""
    if recorded is None or expected is None:
        return
    if recorded.temperature != expected.temperature:
        raise SamplingMismatchError(
            f"{what}: the batch was sampled at temperature {recorded.temperature} but the step "
            f"computes log-probs at temperature {expected.temperature}; build both from the same "
            f"rollout.sampling.temperature (cascade_jax.rollout.factory.sampling_params)")


def shared_sampling(samplings, *, what: str) -> SamplingParams:
    """The contract of a batch of requests: the first one's settings without its seed; every
    request must share its temperature (else :class:`SamplingMismatchError` naming the first
    that differs; ``what`` names the caller). ``ValueError`` for no requests."""
    samplings = list(samplings)
    if not samplings:
        raise ValueError(f"{what}: no requests to take the sampling contract from")
    first = samplings[0]
    for i, sp in enumerate(samplings):
        if sp.temperature != first.temperature:
            raise SamplingMismatchError(
                f"{what}: requests[{i}] was sampled at temperature {sp.temperature}, requests[0] at "
                f"{first.temperature}; one batch has one sampling temperature")
    return first.unseeded()
