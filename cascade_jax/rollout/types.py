"""The rollout protocol: what the trainer asks of any generation backend, and what it gets back.

Three backends implement :class:`RolloutEngine` and look the same to the trainer: the embedded
JAX engine (in process), the client of JAX rollout servers (``launch/serve.py``) and the client of
SGLang servers. Everything here is host-side (numpy / Python); nothing is jitted.

Log-prob semantics follow SGLang's default: the log-prob recorded for a sampled token ``y`` is
``log softmax(z / τ)[y]`` of the temperature-scaled logits ``z``, *not* renormalised over the
top-p / top-k support that ``y`` was actually drawn from. ``τ = 0`` means greedy decoding and
then the log-prob is that of the unscaled logits, ``log softmax(z)[y]``. The settings are the
sampling contract :class:`~cascade_jax.contract.sampling.SamplingParams` (re-exported here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from cascade_jax.contract.batch import FINISH_REASONS
from cascade_jax.contract.sampling import SamplingParams

__all__ = ["FINISH_REASONS", "SamplingParams", "Request", "Sample", "Rollouts", "RolloutEngine",
           "RolloutError", "sample_seed"]


class RolloutError(RuntimeError):
    """A backend could not produce what was asked (server unreachable, bad reply, sync failed)."""


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of a request seeded ``seed``: ``seed`` itself for ``k = 0``,
    else a stable 63-bit hash of ``(seed, k)`` (``numpy.random.SeedSequence``). Every backend
    draws sample ``k``'s ``t``-th token with the key ``fold_in(key(sample_seed(seed, k)), t)``,
    so a request of ``n`` samples and ``n`` one-sample requests (the HTTP client's bodies)
    with seeds ``sample_seed(seed, k)`` give the same samples, because
    ``sample_seed(s, 0) = s``."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to sample ``sampling.n`` responses for. ``domain`` and ``metadata`` are carried
    through untouched (the trainer routes rewards and teachers by them)."""

    prompt_ids: tuple  # token ids (ints)
    sampling: SamplingParams = SamplingParams()
    rid: Optional[str] = None
    domain: Optional[str] = None
    metadata: Any = None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated response.

    prompt_ids      [P] int32
    response_ids    [R] int32 (a stop token, when hit, is the last one)
    logprobs        [R] float32 sampling log-probs (SGLang semantics, see module doc)
    finish_reason   "stop" | "length" | "abort"
    weight_version  version of the weights that produced every token of it
    routed_experts  optional [P + R - 1, n_moe_layers, top_k] int32 expert ids per token and
                    MoE layer (SGLang's ``return_routed_experts`` layout); ``None`` when not asked
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    weight_version: str
    routed_experts: Optional[np.ndarray] = None


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Samples grouped per request: ``groups[i]`` holds the ``n`` samples of ``requests[i]``."""

    requests: tuple  # tuple[Request, ...]
    groups: tuple  # tuple[tuple[Sample, ...], ...]

    def samples(self) -> list:
        """All samples, group by group (the order the packer uses)."""
        return [s for g in self.groups for s in g]


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generation backend (in process or over HTTP)."""

    def generate(self, requests: Sequence[Request]) -> Rollouts:
        """Sample ``r.sampling.n`` responses for every request; blocks until all finished.
        Samples of a request form one group, in request order."""

    def score(self, prompts: Sequence[Sequence[int]],
              responses: Sequence[Sequence[int]]) -> list:
        """Teacher-forced log-probs: for each pair, ``[len(response)]`` float32
        ``log π(response[t] | prompt, response[:t])`` at temperature 1."""

    def update_weights(self, params, version: str) -> None:
        """Replace the weights with ``params`` (the trainer's pytree) labelled ``version``.
        Returns only once every later generation uses them; raises :class:`RolloutError` on
        failure (the previous weights keep serving). Version rule: ``version`` must differ
        from the current one and, when both are decimal integers (trainer steps), be larger;
        otherwise :class:`RolloutError` naming it (``engine.check_version_order``)."""

    def weight_version(self) -> str:
        """The label of the weights now in use."""

    def health(self) -> bool:
        """True when the backend can generate now."""
