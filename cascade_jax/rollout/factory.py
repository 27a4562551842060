"""Build the rollout backend a run config asks for (what the stage runner calls).

    engine = make_engine(cfg.rollout, model_cfg=model_cfg, params=params)
    sp = sampling_params(cfg.rollout, stop_token_ids=(im_end,))
    rollouts = engine.generate([Request(prompt_ids=p, sampling=sp, domain=d) for p, d in batch])

``rollout.engine``: ``jax`` → :class:`~cascade_jax.rollout.engine.JaxEngine` in this process
(``max_len = max_prompt_len + max_response_len``); ``jax_server`` / ``sglang`` →
:class:`~cascade_jax.rollout.client.ServerClient` on ``server_url`` (the HTTP protocol is the
same for both).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .types import SamplingParams

__all__ = ["make_engine", "sampling_params"]


def sampling_params(rollout_cfg, *, stop_token_ids: Sequence[int] = (),
                    seed: Optional[int] = None) -> SamplingParams:
    """The per-request :class:`SamplingParams` of ``rollout_cfg`` (``n = n_samples``,
    ``max_new_tokens = max_response_len``, ``temperature`` 0 when ``greedy``)."""
    return SamplingParams(
        max_new_tokens=rollout_cfg.max_response_len,
        temperature=0.0 if rollout_cfg.greedy else rollout_cfg.temperature,
        top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
        stop_token_ids=tuple(int(t) for t in stop_token_ids), n=rollout_cfg.n_samples, seed=seed)


def make_engine(rollout_cfg, *, model_cfg=None, params=None, weight_version: str = "0",
                **kwargs):
    """The :class:`~cascade_jax.rollout.types.RolloutEngine` of ``rollout_cfg`` (module doc).
    ``model_cfg`` and ``params`` are required for ``jax``; ``kwargs`` go to the constructor
    (e.g. ``prompt_buckets`` for the engine, ``api_key`` for the client)."""
    if rollout_cfg.engine == "jax":
        if model_cfg is None or params is None:
            raise ValueError("make_engine: rollout.engine 'jax' needs model_cfg and params")
        from .engine import JaxEngine
        return JaxEngine(model_cfg, params, num_slots=rollout_cfg.num_slots,
                         max_len=rollout_cfg.max_prompt_len + rollout_cfg.max_response_len,
                         steps_per_call=rollout_cfg.steps_per_call, seed=rollout_cfg.seed,
                         weight_version=weight_version, **kwargs)
    if rollout_cfg.engine in ("jax_server", "sglang"):
        from .client import ServerClient
        return ServerClient([rollout_cfg.server_url], **kwargs)
    raise ValueError(f"rollout.engine: unknown backend {rollout_cfg.engine!r}")
