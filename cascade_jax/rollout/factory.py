"""Build the rollout backend a run config asks for (what the stage runner calls).

    engine = make_engine(cfg.rollout, model_cfg=model_cfg, params=params)
    sp = sampling_params(cfg.rollout, stop_token_ids=(im_end,))
    rollouts = engine.generate([Request(prompt_ids=p, sampling=sp, domain=d) for p, d in batch])

``rollout.engine``: ``jax`` → :class:`~cascade_jax.rollout.engine.JaxEngine` in this process
(``max_len = max_prompt_len + max_response_len``); ``jax_server`` / ``sglang`` →
:class:`~cascade_jax.rollout.client.ServerClient` on ``server_url`` / ``server_urls`` (through
``router_url`` when set; the HTTP protocol is the same for both), with the weight syncer of
``rollout.weight_sync`` attached (:func:`make_weight_sync`) so ``engine.update_weights(params,
version)`` works the same for every backend.
"""

from __future__ import annotations

from typing import Optional, Sequence

from models.nemotron_h.invariant import KV_BLOCK

from . import weight_sync as ws
from .client import ServerClient
from .engine import JaxEngine
from .exact import ExactEngine
from .types import SamplingParams

__all__ = ["make_engine", "make_weight_sync", "sampling_params"]


def sampling_params(rollout_cfg, *, stop_token_ids: Sequence[int] = (),
                    seed: Optional[int] = None) -> SamplingParams:
    """The sampling contract of ``rollout_cfg`` (:mod:`cascade_jax.contract.sampling`; the one
    place it is built from a config): ``n = n_samples``, ``max_new_tokens =
    max_response_len``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``."""
    return SamplingParams(
        max_new_tokens=rollout_cfg.max_response_len,
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
        stop_token_ids=tuple(int(t) for t in stop_token_ids), n=rollout_cfg.n_samples, seed=seed)


def make_engine(rollout_cfg, *, model_cfg=None, params=None, weight_version: str = "0",
                sync_dir: Optional[str] = None, launcher=None, **kwargs):
    """The :class:`~cascade_jax.rollout.types.RolloutEngine` of ``rollout_cfg`` (module doc).
    ``model_cfg`` and ``params`` are required for ``jax``; ``kwargs`` go to the constructor
    (e.g. ``prompt_buckets`` for the engine, ``max_aborts`` for the client). For servers,
    ``model_cfg`` enables weight syncs (``sync_dir``: the disk versions' root when
    ``rollout.weight_sync_dir`` is unset; ``launcher``: restarted servers load the last
    pushed version)."""
    if rollout_cfg.engine == "jax":
        if model_cfg is None or params is None:
            raise ValueError("make_engine: rollout.engine 'jax' needs model_cfg and params")
        max_len = rollout_cfg.max_prompt_len + rollout_cfg.max_response_len
        cls = JaxEngine
        if getattr(rollout_cfg, "zero_mismatch", False):  # the engine's zero-mismatch mode
            cls, max_len = ExactEngine, -(-max_len // KV_BLOCK) * KV_BLOCK
        return cls(model_cfg, params, num_slots=rollout_cfg.num_slots, max_len=max_len,
                   steps_per_call=rollout_cfg.steps_per_call, seed=rollout_cfg.seed,
                   prefill_sizes=tuple(getattr(rollout_cfg, "prefill_sizes", ())) or None,
                   prefill_chunk=getattr(rollout_cfg, "prefill_chunk", 0) or None,
                   weight_version=weight_version,
                   return_routed_experts=getattr(rollout_cfg, "routing_replay", False), **kwargs)
    if rollout_cfg.engine in ("jax_server", "sglang"):
        r = rollout_cfg
        urls = ([r.server_url] if r.server_url else []) + [u for u in r.server_urls if u != r.server_url]
        if getattr(r, "routing_replay", False):
            if model_cfg is None:
                raise ValueError("make_engine: rollout.routing_replay with a server needs model_cfg "
                                 "(the layer pattern that decodes routed experts)")
            kwargs.setdefault("routed_experts", model_cfg)
        client = ServerClient(urls, router_url=r.router_url, api_key=r.api_key, max_concurrency=r.max_concurrency,
                              timeout_s=r.request_timeout_s, max_retries=r.max_retries, **kwargs)
        if model_cfg is not None:
            client.syncer = make_weight_sync(r, client, model_cfg, sync_dir=sync_dir, launcher=launcher)
        return client
    raise ValueError(f"rollout.engine: unknown backend {rollout_cfg.engine!r}")


def make_weight_sync(rollout_cfg, client, model_cfg, *, sync_dir: Optional[str] = None, launcher=None):
    """The weight syncer of ``rollout.weight_sync`` for ``client``'s servers
    (:mod:`cascade_jax.rollout.weight_sync`); ``None`` for ``disk`` without a directory."""
    r = rollout_cfg
    common = dict(tol=r.sync_tol, timeout_s=r.sync_timeout_s, launcher=launcher)
    if r.weight_sync == "nccl":
        return ws.NcclWeightSync(client, model_cfg, master_address=r.nccl_master_address,
                                 master_port=r.nccl_master_port or None, backend=r.nccl_backend,
                                 bucket_bytes=r.nccl_bucket_mb << 20, **common)
    root = r.weight_sync_dir or sync_dir
    if root is None:
        return None
    return ws.DiskWeightSync(client, model_cfg, root, keep=r.keep_versions, **common)
