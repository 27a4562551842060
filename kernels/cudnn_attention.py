"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

Covers the subset of :func:`kernels.xla_attention.attention` cuDNN can express: plain causal
self-attention ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]`` (GQA by shape, ``Hq % Hkv == 0``),
bf16/fp16, ``D % 8 == 0`` and ``D <= 256``, default positions (``arange``), no segment ids and no
``kv_valid``. Causality is by index (``s <= t``), which equals the reference's position rule only
for default positions — hence calls passing positions are not "supported" (callers fall back).
cuDNN's SPMD partitioner refuses sequence sharding; context parallelism goes through
:func:`kernels.pallas_attention.attention_context_parallel` with ``attention_fn`` set to this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["supported", "attention", "why_unsupported"]


def why_unsupported(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None,
                    kv_segment_ids=None, kv_valid=None, scale=None, require_gpu=True):
    """``None`` if cuDNN can run this call, else the reason (a string)."""
    if require_gpu and jax.default_backend() not in ("cuda", "gpu"):
        return "cuDNN attention needs a CUDA GPU"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cuDNN needs bf16/fp16)"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"head_dim {d} (needs a multiple of 8, <= 256)"
    if q.shape[1] != k.shape[1]:
        return "query and key lengths differ (decode/cross attention)"
    if q.shape[2] % k.shape[2]:
        return "query heads not a multiple of kv heads"
    if q_positions is not None or kv_positions is not None:
        return "explicit positions (cuDNN causality is by index)"
    if q_segment_ids is not None or kv_segment_ids is not None:
        return "segment ids (packed sequences)"
    if kv_valid is not None:
        return "kv_valid mask"
    return None


def supported(q, k, v, **kw) -> bool:
    return why_unsupported(q, k, v, **kw) is None


def attention(q, k, v, *, scale=None, **unused):
    """Index-causal GQA attention via cuDNN; ``[B, T, Hq, D]`` in and out."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
