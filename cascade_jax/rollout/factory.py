"""Build the rollout backend a run config asks for (what the stage runner calls).

    engine = make_engine(cfg.rollout, model_cfg=model_cfg, params=params)
    sp = sampling_params(cfg.rollout.sampling, stop_token_ids=(im_end,))
    rollouts = engine.generate([Request(prompt_ids=p, sampling=sp, domain=d) for p, d in batch])

``rollout.engine``: ``jax`` → :class:`~cascade_jax.rollout.engine.JaxEngine` in this process
(``rollout.batching``, ``max_len = max_prompt_len + max_response_len``); ``jax_server`` / ``sglang`` →
:class:`~cascade_jax.rollout.client.ServerClient` on ``rollout.servers`` (``url`` / ``urls``, through
``router_url`` when set; the HTTP protocol is the same for both), with the weight syncer of
``rollout.sync`` attached (:func:`make_weight_sync`) so ``engine.update_weights(params,
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


def sampling_params(sampling_cfg, *, stop_token_ids: Sequence[int] = (),
                    seed: Optional[int] = None) -> SamplingParams:
    """The sampling contract of ``rollout.sampling`` (``sampling_cfg``, a
    :class:`~cascade_jax.config.SamplingSection`; :mod:`cascade_jax.contract.sampling`; the one
    place it is built from a config): ``n = n_samples``, ``max_new_tokens = max_response_len``,
    ``temperature`` (0 = greedy), ``top_p``, ``top_k``."""
    s = sampling_cfg
    return SamplingParams(max_new_tokens=s.max_response_len, temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, stop_token_ids=tuple(int(t) for t in stop_token_ids),
                          n=s.n_samples, seed=seed)


def make_engine(rollout_cfg, *, model_cfg=None, params=None, weight_version: str = "0",
                sync_dir: Optional[str] = None, launcher=None, **kwargs):
    """The :class:`~cascade_jax.rollout.types.RolloutEngine` of ``rollout_cfg`` (a
    :class:`~cascade_jax.config.RolloutConfig`; module doc): the engine reads ``sampling``
    (lengths, seed), ``batching`` and ``fidelity``, the client ``servers`` and its syncer
    ``sync``. ``model_cfg`` and ``params`` are required for ``jax``; ``kwargs`` go to the
    constructor (e.g. ``prompt_buckets`` for the engine, ``max_aborts`` for the client). For
    servers, ``model_cfg`` enables weight syncs (``sync_dir``: the disk versions' root when
    ``rollout.sync.dir`` is unset; ``launcher``: restarted servers load the last pushed
    version)."""
    s, fid = rollout_cfg.sampling, rollout_cfg.fidelity
    if rollout_cfg.engine == "jax":
        if model_cfg is None or params is None:
            raise ValueError("make_engine: rollout.engine 'jax' needs model_cfg and params")
        b = rollout_cfg.batching
        max_len = s.max_prompt_len + s.max_response_len
        cls = JaxEngine
        if fid.zero_mismatch:  # the engine's zero-mismatch mode
            cls, max_len = ExactEngine, -(-max_len // KV_BLOCK) * KV_BLOCK
        return cls(model_cfg, params, num_slots=b.num_slots, max_len=max_len, steps_per_call=b.steps_per_call,
                   seed=s.seed, prefill_sizes=tuple(b.prefill_sizes) or None, prefill_chunk=b.prefill_chunk or None,
                   weight_version=weight_version, return_routed_experts=fid.routing_replay, **kwargs)
    if rollout_cfg.engine in ("jax_server", "sglang"):
        sv = rollout_cfg.servers
        if fid.routing_replay:
            if model_cfg is None:
                raise ValueError("make_engine: rollout.fidelity.routing_replay with a server needs model_cfg "
                                 "(the layer pattern that decodes routed experts)")
            kwargs.setdefault("routed_experts", model_cfg)
        client = ServerClient(sv.all_urls(), router_url=sv.router_url, api_key=sv.api_key,
                              max_concurrency=sv.max_concurrency, timeout_s=sv.request_timeout_s,
                              max_retries=sv.max_retries, **kwargs)
        if model_cfg is not None:
            client.syncer = make_weight_sync(rollout_cfg.sync, client, model_cfg, sync_dir=sync_dir,
                                             launcher=launcher)
        return client
    raise ValueError(f"rollout.engine: unknown backend {rollout_cfg.engine!r}")


def make_weight_sync(sync_cfg, client, model_cfg, *, sync_dir: Optional[str] = None, launcher=None):
    """The weight syncer of ``rollout.sync`` (``sync_cfg``, a
    :class:`~cascade_jax.config.SyncSection`) for ``client``'s servers
    (:mod:`cascade_jax.rollout.weight_sync`); ``None`` for ``disk`` without a directory."""
    c = sync_cfg
    common = dict(tol=c.tol, timeout_s=c.timeout_s, launcher=launcher)
    if c.method == "nccl":
        return ws.NcclWeightSync(client, model_cfg, master_address=c.nccl_master_address,
                                 master_port=c.nccl_master_port or None, backend=c.nccl_backend,
                                 bucket_bytes=c.nccl_bucket_mb << 20, **common)
    root = c.dir or sync_dir
    if root is None:
        return None
    return ws.DiskWeightSync(client, model_cfg, root, keep=c.keep_versions, **common)
