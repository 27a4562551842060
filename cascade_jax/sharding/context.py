"""Context parallelism: the sequence split over the mesh axes of the logical ``seq`` rule.

The model hands its two sequence-mixing kernels to :class:`ContextParallel` (see
``models/nemotron_h/partitioning.py``); each runs inside ``shard_map`` with tokens split in
order over the context axis (and rows over the batch axes, heads / groups over ``tensor``):

* attention: ``kernels.pallas_attention.attention_context_parallel`` — every shard's queries
  attend the K/V all-gathered over the context axis, causality from global positions (``None``
  positions become the global ``arange`` before the split);
* Mamba2 SSD: ``kernels.pallas_ssd.ssd_context_parallel`` — local scans, then the states
  entering each shard passed along the shards (segment resets respected).

Both call back the model's own kernel switch (``kernels.attention`` / ``kernels.ssd``) for the
local work, so the implementation choice stays in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kernels.pallas_attention import attention_context_parallel
from kernels.pallas_ssd import ssd_context_parallel

from .mesh import mesh_shape
from .rules import RULES, Rules, logical_to_spec

__all__ = ["ContextParallel", "make_context_parallel"]


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    mesh: Mesh
    rules: Rules = RULES

    @property
    def axis(self):
        shape = mesh_shape(self.mesh)
        axes = tuple(a for a in self.rules.activations["seq"] if shape.get(a, 1) > 1)
        return axes[0] if len(axes) == 1 else axes

    def _spec(self, names, shape):
        return logical_to_spec(names, self.rules.activations, mesh_shape=mesh_shape(self.mesh),
                               shape=shape, what=f"context-parallel {names}")

    def attention(self, q, k, v, positions, segment_ids, attention_fn: Callable):
        """``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]`` -> ``[B,T,Hq,D]``."""
        b, t = q.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        tok = self._spec(("batch", "seq"), positions.shape)
        qs = self._spec(("batch", "seq", "heads", "head_dim"), q.shape)
        ks = self._spec(("batch", "seq", "kv_heads", "head_dim"), k.shape)
        axis = self.axis

        def local(q, k, v, pos, seg):
            return attention_context_parallel(q, k, v, axis_name=axis, q_positions=pos,
                                              kv_positions=pos, q_segment_ids=seg,
                                              kv_segment_ids=seg, attention_fn=attention_fn)

        seg_spec = None if segment_ids is None else tok
        return jax.shard_map(local, mesh=self.mesh, in_specs=(qs, ks, ks, tok, seg_spec),
                             out_specs=qs, check_vma=False)(q, k, v, positions, segment_ids)

    def ssd(self, x, dt, A, Bm, Cm, chunk_size: int, segment_ids, ssd_fn: Callable,
            initial_state: Optional[jax.Array] = None):
        """``x [B,T,Hm,P]``, ``dt [B,T,Hm]``, ``A [Hm]``, ``Bm, Cm [B,T,G,N]`` ->
        ``(y [B,T,Hm,P], final state [B,Hm,P,N])``."""
        b, _, h, p = x.shape
        xs = self._spec(("batch", "seq", "ssm_heads", None), x.shape)
        dts = self._spec(("batch", "seq", "ssm_heads"), dt.shape)
        a_s = self._spec(("ssm_heads",), A.shape)
        bcs = self._spec(("batch", "seq", "ssm_groups", None), Bm.shape)
        tok = self._spec(("batch", "seq"), x.shape[:2])
        st = self._spec(("batch", "ssm_heads", None, None), (b, h, p, Bm.shape[-1]))
        axis = self.axis

        def local(x, dt, A, Bm, Cm, seg):
            return ssd_context_parallel(x, dt, A, Bm, Cm, axis_name=axis, chunk_size=chunk_size,
                                        segment_ids=seg, initial_state=None, ssd_fn=ssd_fn)

        if initial_state is not None:
            raise NotImplementedError("context-parallel SSD with an initial state")
        seg_spec = None if segment_ids is None else tok
        return jax.shard_map(local, mesh=self.mesh, in_specs=(xs, dts, a_s, bcs, bcs, seg_spec),
                             out_specs=(xs, st), check_vma=False)(x, dt, A, Bm, Cm, segment_ids)


def make_context_parallel(mesh: Mesh, rules: Rules = RULES) -> Optional[ContextParallel]:
    """The model's context-parallel kernels for ``mesh`` (None when the sequence is not split)."""
    shape = mesh_shape(mesh)
    if not any(shape.get(a, 1) > 1 for a in rules.activations["seq"]):
        return None
    return ContextParallel(mesh, rules)
