"""The one table mapping logical axis names to mesh axes (weights, activations, decode caches).

Mesh axes, outermost (slowest links: across hosts / slices) to innermost (fastest: NVLink /
ICI neighbours)::

    data     pure data parallelism (replicated weights; gradients all-reduced)
    fsdp     data parallelism with weights and optimizer state sharded (ZeRO-3)
    expert   expert parallelism: routed experts split over devices, tokens exchanged
    context  context parallelism: the sequence split over devices
    tensor   tensor parallelism: attention heads, Mamba heads (whole B/C groups), MLP widths

A weight's logical axes come from its ``ParamSpec`` (``models/nemotron_h/params.py``); the
model annotates activations with logical names (``models/nemotron_h/partitioning.py``). To
change a parallelism, edit :data:`RULES` (or pass another :class:`Rules`).

:func:`logical_to_spec` turns logical names into a ``PartitionSpec`` and refuses what cannot
be laid out, naming the mesh axis: an unknown logical name, a mesh axis used by two dims of one
array, or a mesh axis whose size does not divide the dim it shards.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from jax.sharding import PartitionSpec as P

__all__ = ["MESH_AXES", "Rules", "RULES", "ShardingError", "logical_to_spec", "BATCH_AXES"]

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
# Every axis that splits the batch: tokens are spread over data, fsdp and expert devices (the
# expert axis re-groups them by expert inside the MoE with an all-to-all).
BATCH_AXES = ("data", "fsdp", "expert")


class ShardingError(ValueError):
    """An impossible mesh or layout; the message names the mesh axis and the array dim."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """``weights`` / ``activations``: logical name -> tuple of mesh axes (``()`` = replicated)."""

    weights: Mapping[str, tuple]
    activations: Mapping[str, tuple]


RULES = Rules(
    weights={
        "vocab": ("tensor",),
        "embed": ("fsdp", "context"),
        "q_heads": ("tensor",),
        "kv_heads": ("tensor",),
        "mlp": ("tensor",),
        "experts": ("expert",),
        "expert_mlp": ("tensor",),
        "ssm_inner": ("tensor",),
        "ssm_bc": ("tensor",),
        "ssm_heads": ("tensor",),
        "conv_k": (),
        "conv_dim": (),  # [x | B | C] concatenated: small, replicated
        "norm": (),
    },
    activations={
        "batch": BATCH_AXES,
        "seq": ("context",),
        "embed": (),
        "heads": ("tensor",),
        "kv_heads": ("tensor",),
        "head_dim": (),
        "mlp": ("tensor",),
        "ssm_inner": ("tensor",),
        "ssm_heads": ("tensor",),
        "ssm_groups": ("tensor",),  # B/C groups: split with their heads
        "vocab": ("tensor",),
        # decode caches: [B, S, Hkv, D] K/V and [B, Hm, P, N] SSM states
        "cache_batch": BATCH_AXES,
        "cache_seq": (),
    },
)


def logical_to_spec(names: Sequence[Optional[str]], table: Mapping[str, tuple], *,
                    mesh_shape: Optional[Mapping[str, int]] = None,
                    shape: Optional[Sequence[int]] = None, what: str = "array") -> P:
    """``PartitionSpec`` for an array whose dims carry logical ``names`` (``None`` = unsharded).

    With ``mesh_shape`` (axis -> size) axes of size 1 are dropped and, with ``shape``, each dim
    must be divisible by the product of its mesh axes. Raises :class:`ShardingError` naming the
    mesh axis on a collision or a non-dividing size, and naming an unknown logical name."""
    parts, used = [], {}
    for i, name in enumerate(names):
        if name is None:
            parts.append(None)
            continue
        if name not in table:
            raise ShardingError(f"{what}: unknown logical axis {name!r}; the rules table knows "
                                f"{', '.join(sorted(table))}")
        axes = tuple(table[name])
        if mesh_shape is not None:
            unknown = [a for a in axes if a not in mesh_shape]
            if unknown:
                raise ShardingError(f"{what}: logical axis {name!r} maps to mesh axis {unknown[0]!r}, "
                                    f"not in the mesh {tuple(mesh_shape)}")
            axes = tuple(a for a in axes if mesh_shape[a] > 1)
        for a in axes:
            if a in used:
                raise ShardingError(f"{what}: mesh axis {a!r} used twice in one spec (dims {used[a]} "
                                    f"{names[used[a]]!r} and {i} {name!r})")
            used[a] = i
        if shape is not None and mesh_shape is not None and axes:
            size = 1
            for a in axes:
                size *= mesh_shape[a]
            if shape[i] % size:
                detail = " x ".join(f"{a}={mesh_shape[a]}" for a in axes)
                raise ShardingError(f"{what}: mesh axis {axes[-1]!r} ({detail}) does not divide dim {i} "
                                    f"({name!r}, size {shape[i]})")
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)
