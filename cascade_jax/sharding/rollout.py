"""The rollout engine's layout on a mesh: parameters, decode caches and slot state.

Everything follows the one rules table (:data:`~cascade_jax.sharding.rules.RULES`): the
parameters their ``ParamSpec`` axes through ``rules.weights`` (:func:`.state.param_shardings`),
the decode cache its logical names below through ``rules.activations``::

    k, v   [S, max_len, Hkv, D]   ("cache_batch", "cache_seq", "kv_heads", "head_dim")
    conv   [S, K-1, C]            ("cache_batch", None, None)
    ssm    [S, Hm, P, N]          ("cache_batch", "ssm_heads", None, None)
    rx     [S, max_len, L_moe, K] ("cache_batch", "cache_seq", None, None)   recorded experts

so a ``tensor`` axis splits the K/V heads and the Mamba heads with the weights that produce
them, and the slots are split over the batch axes (``data`` / ``fsdp`` / ``expert``) as the
engine's tokens are. The small per-slot state (positions, seeds, sampling settings) and the
next-token logits ``[S, V]`` are replicated.

An engine mesh lives on the devices of one node: ``context`` (a split sequence) is refused,
every other axis of :data:`~cascade_jax.sharding.rules.MESH_AXES` is allowed.
The command-line form ``"tensor:4,expert:2"`` is read by
:meth:`~cascade_jax.config.MeshConfig.from_text`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from cascade_jax.config import ConfigError, MeshConfig

from .mesh import make_mesh, mesh_shape
from .rules import MESH_AXES, RULES, Rules, ShardingError, logical_to_spec
from .state import replicated

__all__ = ["CACHE_AXES", "engine_mesh", "batch_split", "cache_shardings",
           "slot_shardings", "rows_sharding"]

#: logical names of each decode-cache entry (and of the recorded experts ``rx``)
CACHE_AXES = {"k": ("cache_batch", "cache_seq", "kv_heads", "head_dim"),
              "v": ("cache_batch", "cache_seq", "kv_heads", "head_dim"),
              "conv": ("cache_batch", None, None),
              "ssm": ("cache_batch", "ssm_heads", None, None),
              "rx": ("cache_batch", "cache_seq", None, None)}


def engine_mesh(mesh_cfg, devices: Optional[Sequence] = None, *, field: str = "mesh") -> Mesh:
    """The engine's mesh from a :class:`MeshConfig` (or its ``"axis:size,..."`` text,
    :meth:`MeshConfig.from_text`) over the
    first ``prod(sizes)`` of ``devices`` (default: this process's local devices; a ``Mesh`` is
    only checked). Raises
    :class:`ShardingError` naming ``field`` when it asks for more devices than there are or for
    a ``context`` axis."""
    if isinstance(mesh_cfg, Mesh):
        if mesh_shape(mesh_cfg).get("context", 1) > 1:
            raise ShardingError(f"{field}.context: the rollout engine does not split sequences "
                                f"(context={mesh_shape(mesh_cfg)['context']}); use tensor / expert / data axes")
        return mesh_cfg
    if isinstance(mesh_cfg, str):
        try:
            mesh_cfg = MeshConfig.from_text(mesh_cfg, field=field)
        except ConfigError as e:
            raise ShardingError(str(e)) from None
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    bad = [a for a, s in sizes.items() if s < 1]
    if bad:
        raise ShardingError(f"{field}.{bad[0]}: must be >= 1 on an engine mesh (no -1), got {sizes[bad[0]]}")
    if sizes["context"] > 1:
        raise ShardingError(f"{field}.context: the rollout engine does not split sequences "
                            f"(context={sizes['context']}); use tensor / expert / data axes")
    devices = list(jax.local_devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        detail = ",".join(f"{a}:{s}" for a, s in sizes.items() if s > 1)
        raise ShardingError(f"{field}: {detail} needs {need} devices, only {len(devices)} present")
    return make_mesh(mesh_cfg, devices[:need])


def batch_split(mesh: Mesh, rules: Rules = RULES) -> int:
    """How many ways the engine's slots (and admitted rows) are split: the product of the
    active mesh axes of ``cache_batch``."""
    shape = mesh_shape(mesh)
    return math.prod(shape.get(a, 1) for a in rules.activations["cache_batch"])


def _spec(names, shape, mesh, rules, what):
    return NamedSharding(mesh, logical_to_spec(names, rules.activations, mesh_shape=mesh_shape(mesh),
                                               shape=shape, what=what))


def cache_shardings(cache, mesh: Mesh, rules: Rules = RULES) -> list:
    """Shardings of a decode cache (``models.nemotron_h.init_cache``'s list of per-layer dicts;
    arrays or ``ShapeDtypeStruct``s) from :data:`CACHE_AXES`."""
    return [{k: _spec(CACHE_AXES[k], v.shape, mesh, rules, f"decode cache {k!r}")
             for k, v in layer.items()} for layer in cache]


def slot_shardings(slots: dict, mesh: Mesh, rules: Rules = RULES) -> dict:
    """Shardings of the engine's per-slot state: ``rx`` like the cache, the rest replicated."""
    return {k: (_spec(CACHE_AXES["rx"], v.shape, mesh, rules, "recorded experts 'rx'") if k == "rx"
                else replicated(mesh)) for k, v in slots.items()}


def rows_sharding(rows: int, mesh: Mesh, rules: Rules = RULES, what: str = "prefill_sizes") -> NamedSharding:
    """Admitted prompt rows ``[rows, ...]`` split over the batch axes, as the cache's slots are."""
    return NamedSharding(mesh, logical_to_spec(("cache_batch",), rules.activations,
                                               mesh_shape=mesh_shape(mesh), shape=(rows,), what=what))

