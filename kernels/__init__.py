"""Kernels behind one switch each: ``impl in {"auto", "pallas", "cudnn", "xla"}``.

Every kernel has an XLA reference with the same signature (``kernels.xla_gmm``, ``kernels.xla_attention``,
``kernels.xla_ssd``); ``auto`` picks the fastest correct implementation measured for the platform and
is always XLA on CPU. The model calls only the three dispatchers below.
"""

from __future__ import annotations

import jax

from . import xla_attention as _attention_xla
from . import xla_gmm as _gmm_xla
from . import xla_ssd as _ssd_xla

__all__ = ["grouped_matmul", "attention", "ssd", "resolve_impl"]

IMPLS = ("auto", "pallas", "cudnn", "xla")


def resolve_impl(kernel: str, impl: str) -> str:
    """Concrete implementation for ``kernel`` ("gmm", "attention", "ssd") on this platform."""
    if impl not in IMPLS:
        raise ValueError(f"{kernel}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "xla" if jax.default_backend() == "cpu" else "xla"


def _unavailable(kernel, impl):
    raise NotImplementedError(f"{kernel}: implementation {impl!r} is not available; use 'xla' or 'auto'")


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto"):
    """``[M, K] × [E, K, N]`` over expert-sorted rows with ``group_sizes [E]`` -> ``[M, N]``."""
    impl = resolve_impl("gmm", impl)
    if impl == "xla":
        return _gmm_xla.gmm(lhs, rhs, group_sizes)
    return _unavailable("gmm", impl)


def attention(q, k, v, *, impl: str = "auto", **kw):
    """Causal GQA attention; see :func:`kernels.xla_attention.attention` for arguments."""
    impl = resolve_impl("attention", impl)
    if impl == "xla":
        return _attention_xla.attention(q, k, v, **kw)
    return _unavailable("attention", impl)


def ssd(x, dt, A, Bm, Cm, *, chunk_size, segment_ids=None, initial_state=None, impl: str = "auto"):
    """Mamba2 chunked scan; see :func:`kernels.xla_ssd.ssd`. Returns ``(y, final_state)``."""
    impl = resolve_impl("ssd", impl)
    if impl == "xla":
        return _ssd_xla.ssd(x, dt, A, Bm, Cm, chunk_size=chunk_size, segment_ids=segment_ids,
                            initial_state=initial_state)
    return _unavailable("ssd", impl)
