"""Kernels behind one switch each: ``impl in {"auto", "pallas", "cudnn", "xla"}``.

Every kernel has an XLA reference with the same signature (``kernels.xla_gmm``, ``kernels.xla_attention``,
``kernels.xla_ssd``) and a Pallas implementation (``kernels.pallas_gmm``, ``kernels.pallas_attention``,
``kernels.pallas_ssd``; on CPU they run with ``interpret=True``). Attention also has ``cudnn``
(``jax.nn.dot_product_attention(implementation="cudnn")``, see :mod:`kernels.cudnn_attention`).
``auto`` picks, per platform, the fastest implementation *validated* there (:data:`AUTO`); it is
always XLA on CPU. The model calls only the three dispatchers below.

One switch, mesh-aware: the platform is that of the mesh the program is traced for (inside
``shard_map`` / under ``jax.set_mesh``, or an abstract mesh with a device for lowering from a
CPU host; else the default backend, :func:`kernels._common.platform`), and :data:`AUTO` also says
which Pallas grouped matmul ``impl="pallas"`` means there (``gmm_pallas``:
:func:`pallas_gmm_variant`), so the two Pallas grouped-matmul modules hold no platform switch of
their own and do not import each other (:mod:`kernels.pallas_gmm_mgpu` uses the Triton-layout
weight gradient of :mod:`kernels.pallas_gmm`, one way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import xla_attention as _attention_xla
from . import xla_flash_attention as _attention_xla_flash
from . import xla_gmm as _gmm_xla
from . import xla_ssd as _ssd_xla
from ._common import platform

__all__ = ["grouped_matmul", "attention", "ssd", "resolve_impl", "pallas_gmm_variant", "AUTO", "IMPLS",
           "XLA_BLOCKWISE_MIN_KEYS", "xla_attention_form"]

IMPLS = ("auto", "pallas", "cudnn", "xla")

# What ``auto`` resolves to per platform. Only implementations validated on the platform belong
# here: the Pallas kernels are verified in interpret mode on CPU but not yet timed or checked on
# an H100/TPU, so ``auto`` keeps XLA for them until a device session flips these entries; cuDNN
# attention is the measured best complete attention on the H100 (performance anchors) and is
# used whenever its mask support covers the call (otherwise attention falls back to XLA).
# ``gmm_pallas``: the grouped-matmul kernel ``impl="pallas"`` runs — "gpu" (the Triton layout of
# kernels.pallas_gmm; interpret mode on CPU), "tpu" (its megablox layout, Mosaic TPU), "mosaic"
# (kernels.pallas_gmm_mgpu, wgmma; 16-bit operands only, else "gpu").
AUTO = {
    "cpu": {"gmm": "xla", "attention": "xla", "ssd": "xla", "gmm_pallas": "gpu"},
    "gpu": {"gmm": "xla", "attention": "cudnn", "ssd": "xla", "gmm_pallas": "mosaic"},
    "tpu": {"gmm": "xla", "attention": "xla", "ssd": "xla", "gmm_pallas": "tpu"},
}
_KERNELS = ("gmm", "attention", "ssd")

#: Key length ``S`` from which ``impl="xla"`` attention runs the blockwise online-softmax form
#: (:mod:`kernels.xla_flash_attention`, O(T·block) memory) instead of the full-score reference
#: (:mod:`kernels.xla_attention`, fp32 scores ``[B, Hq, T, S]``; XLA:CPU cannot even compile it
#: from S = 131072). Shorter calls keep the reference, so the transformers parity tests see it.
XLA_BLOCKWISE_MIN_KEYS = 16384


def xla_attention_form(num_keys: int) -> str:
    """``"full"`` or ``"blockwise"``: the XLA attention ``impl="xla"`` runs for ``num_keys`` keys."""
    return "blockwise" if num_keys >= XLA_BLOCKWISE_MIN_KEYS else "full"


def resolve_impl(kernel: str, impl: str) -> str:
    """Concrete implementation for ``kernel`` ("gmm", "attention", "ssd") on this platform."""
    if impl not in IMPLS:
        raise ValueError(f"{kernel}: impl must be one of {IMPLS}, got {impl!r}")
    if kernel not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {_KERNELS}")
    if impl == "cudnn" and kernel != "attention":
        raise ValueError(f"{kernel}: no cudnn implementation (only attention has one)")
    if impl != "auto":
        return impl
    return AUTO.get(platform(), AUTO["cpu"])[kernel]


def pallas_gmm_variant(dtype=None) -> str:
    """The Pallas grouped matmul for this platform (``AUTO[platform]["gmm_pallas"]``): ``"gpu"``
    | ``"tpu"`` (layouts of :mod:`kernels.pallas_gmm`) | ``"mosaic"`` (:mod:`kernels.pallas_gmm_mgpu`,
    only for bf16/fp16 ``dtype``; other or unknown dtypes get ``"gpu"``)."""
    v = AUTO.get(platform(), AUTO["cpu"])["gmm_pallas"]
    if v == "mosaic" and (dtype is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
        return "gpu"
    return v


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto", epilogue=None):
    """``[M, K] × [E, K, N]`` over expert-sorted rows with ``group_sizes [E]`` -> ``[M, N]``.

    ``epilogue="relu2"`` returns ``relu(out)²`` (fused into the Pallas kernel; applied after the
    matmul, on the fp32 accumulator, in the same dtype handling for XLA)."""
    impl = resolve_impl("gmm", impl)
    if impl == "xla":
        if epilogue is None:
            return _gmm_xla.gmm(lhs, rhs, group_sizes)
        if epilogue != "relu2":
            raise ValueError(f"gmm: unknown epilogue {epilogue!r}")
        h = jax.nn.relu(_gmm_xla.gmm(lhs, rhs, group_sizes))
        return h * h
    variant = pallas_gmm_variant(lhs.dtype)
    if variant == "mosaic":
        from . import pallas_gmm_mgpu
        return pallas_gmm_mgpu.gmm(lhs, rhs, group_sizes, epilogue=epilogue)
    from . import pallas_gmm
    return pallas_gmm.gmm(lhs, rhs, group_sizes, epilogue=epilogue, variant=variant)


def attention(q, k, v, *, impl: str = "auto", **kw):
    """Causal GQA attention; see :func:`kernels.xla_attention.attention` for arguments.

    ``cudnn`` covers only calls :func:`kernels.cudnn_attention.supported` accepts (on a GPU, bf16/fp16,
    self-attention without segment ids / kv_valid / custom positions); other calls fall back to
    ``pallas`` when ``cudnn`` was asked for explicitly and to ``xla`` when ``auto`` chose it. ``xla``
    is the full-score reference below :data:`XLA_BLOCKWISE_MIN_KEYS` keys and the blockwise
    online softmax (:mod:`kernels.xla_flash_attention`) from there on (:func:`xla_attention_form`)."""
    requested = impl
    impl = resolve_impl("attention", impl)
    if impl == "cudnn":
        from . import cudnn_attention
        if cudnn_attention.supported(q, k, v, **kw):
            return cudnn_attention.attention(q, k, v, **kw)
        impl = "xla" if requested == "auto" else "pallas"
    if impl == "xla":
        if xla_attention_form(k.shape[1]) == "blockwise":
            return _attention_xla_flash.attention(q, k, v, **kw)
        return _attention_xla.attention(q, k, v, **kw)
    from . import pallas_attention
    return pallas_attention.attention(q, k, v, **kw)


def ssd(x, dt, A, Bm, Cm, *, chunk_size, segment_ids=None, initial_state=None, impl: str = "auto"):
    """Mamba2 chunked scan; see :func:`kernels.xla_ssd.ssd`. Returns ``(y, final_state)``."""
    impl = resolve_impl("ssd", impl)
    if impl == "xla":
        return _ssd_xla.ssd(x, dt, A, Bm, Cm, chunk_size=chunk_size, segment_ids=segment_ids,
                            initial_state=initial_state)
    from . import pallas_ssd
    return pallas_ssd.ssd(x, dt, A, Bm, Cm, chunk_size=chunk_size, segment_ids=segment_ids,
                          initial_state=initial_state)
