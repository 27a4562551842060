"""Helpers over the RL and SFT batches. The batch types (:class:`RLBatch`, :class:`SFTBatch`,
their layouts and the ``FINISH_*`` codes) live in :mod:`cascade_jax.contract.batch`, below data,
rollout and rl, and are re-exported here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.contract.batch import (FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, RLBatch,
                                        SFTBatch)

__all__ = ["RLBatch", "SFTBatch", "FINISH_STOP", "FINISH_LENGTH", "FINISH_ABORT",
           "sequence_index", "num_sequences", "response_lengths", "pack_routed_experts"]


def sequence_index(batch: RLBatch) -> jax.Array:
    """``[B, T]`` int32 sequence id of every token (row index in the padded layout)."""
    if batch.seq_index is not None:
        return batch.seq_index
    B, T = batch.tokens.shape
    return jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))


def num_sequences(batch: RLBatch) -> int:
    """``N``, the length of the per-sequence arrays (static)."""
    return batch.rewards.shape[0]


def response_lengths(batch: RLBatch) -> jax.Array:
    """``[N]`` float32 number of ``loss_mask`` tokens per sequence."""
    idx = sequence_index(batch)
    return jax.ops.segment_sum(batch.loss_mask.astype(jnp.float32).ravel(), idx.ravel(),
                               num_segments=num_sequences(batch))


def pack_routed_experts(per_sequence, T: int, *, num_experts: int, offsets=None) -> np.ndarray:
    """Padded-layout ``routed_experts [N, T, L_moe, K]`` int32 for :class:`RLBatch` from each
    sequence's engine output ``[n_i, L_moe, K]`` (SGLang's ``return_routed_experts`` layout,
    ``n_i = P_i + R_i − 1``: every token fed to the model, i.e. all but the last), placed at
    columns ``offsets[i] + [0, n_i)`` (default 0) of row ``i``; -1 elsewhere (routed freely).
    Raises ``ValueError`` naming the sequence for a wrong shape, overflow or an id outside
    ``[0, num_experts)``."""
    arrs = [np.asarray(a) for a in per_sequence]
    if not arrs:
        raise ValueError("routed_experts: no sequences")
    L, K = arrs[0].shape[1:] if arrs[0].ndim == 3 else (None, None)
    out = np.full((len(arrs), T, L or 0, K or 0), -1, np.int32)
    for i, a in enumerate(arrs):
        off = 0 if offsets is None else int(offsets[i])
        if a.ndim != 3 or a.shape[1:] != (L, K):
            raise ValueError(f"routed_experts[{i}]: expected shape [n, {L}, {K}], got {a.shape}")
        if off + a.shape[0] > T:
            raise ValueError(f"routed_experts[{i}]: {a.shape[0]} tokens at offset {off} exceed T={T}")
        if a.size and (a.min() < 0 or a.max() >= num_experts):
            raise ValueError(f"routed_experts[{i}]: expert id outside [0, {num_experts})")
        out[i, off:off + a.shape[0]] = a
    return out
