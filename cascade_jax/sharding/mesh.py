"""The device mesh from a :class:`~cascade_jax.config.MeshConfig`.

Axes are :data:`~cascade_jax.sharding.rules.MESH_AXES` (data, fsdp, expert, context, tensor);
their sizes multiply to the device count (one axis may be ``-1`` = the remaining devices). On
several slices / GPU islands (devices report different ``slice_index``) the mesh is hybrid: the
``data`` axis (then ``fsdp``) spans the slow links between slices and the other axes stay inside
a slice, via ``jax.experimental.mesh_utils.create_hybrid_device_mesh``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from cascade_jax.config import A2A_MODES, MeshConfig

from .rules import MESH_AXES, ShardingError

__all__ = ["make_mesh", "resolve_sizes", "mesh_shape", "resolve_a2a"]


def resolve_sizes(mesh_cfg: MeshConfig, num_devices: int) -> dict:
    """``{axis: size}`` with a ``-1`` axis filled in; raises :class:`ShardingError` naming the
    axis when the sizes cannot multiply to ``num_devices``."""
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if free:
        if num_devices % known:
            raise ShardingError(f"mesh.{free[0]}: the other axes ({known} devices) do not divide "
                                f"the {num_devices} devices")
        sizes[free[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        detail = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "all 1"
        raise ShardingError(f"mesh: axis sizes {detail} multiply to {total}, not the "
                            f"{num_devices} devices (set one axis, e.g. mesh.fsdp, to -1)")
    return sizes


def resolve_a2a(a2a: str, platform: str) -> str:
    """The exchange for ``a2a`` in ``A2A_MODES`` on ``platform`` ("cpu" | "gpu" | "tpu", or a
    device's own "cuda" / "rocm"): ``auto`` = ``ragged`` on gpu/tpu, ``padded`` on cpu;
    ``ragged`` on cpu is an error naming ``mesh.a2a``."""
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if a2a not in A2A_MODES:
        raise ValueError(f"mesh.a2a: must be one of {list(A2A_MODES)}, got {a2a!r}")
    if a2a == "auto":
        return "ragged" if platform in ("gpu", "tpu") else "padded"
    if a2a == "ragged" and platform == "cpu":
        raise ValueError("mesh.a2a='ragged': jax.lax.ragged_all_to_all is not implemented on CPU; "
                         "use mesh.a2a='padded' (or 'auto') on CPU meshes")
    return a2a


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    """A ``jax.sharding.Mesh`` over ``devices`` (default: all devices of all processes).
    ``mesh_cfg.a2a`` is checked against the devices' platform (``ragged`` on CPU is a
    :class:`ShardingError` naming ``mesh.a2a``)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(mesh_cfg, len(devices))
    try:
        resolve_a2a(mesh_cfg.a2a, devices[0].platform)
    except ValueError as e:
        raise ShardingError(str(e)) from None
    shape = tuple(sizes[a] for a in MESH_AXES)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        arr = _hybrid(shape, len(slices), devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _hybrid(shape: tuple, n_slices: int, devices) -> np.ndarray:
    """Put the slice count on the outermost data-parallel axes (data, then fsdp)."""
    dcn = [1] * len(shape)
    rest = n_slices
    for i, axis in enumerate(MESH_AXES[:2]):
        take = math.gcd(shape[i], rest)
        dcn[i], rest = take, rest // take
    if rest != 1:
        raise ShardingError(f"mesh: {n_slices} slices must divide the data x fsdp axes "
                            f"(data={shape[0]}, fsdp={shape[1]})")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn), devices)


def mesh_shape(mesh: Mesh) -> dict:
    """``{axis: size}`` of a mesh."""
    return dict(zip(mesh.axis_names, mesh.devices.shape))
