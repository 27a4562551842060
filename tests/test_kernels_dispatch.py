"""The kernel switch: ``resolve_impl`` per platform, and the dispatchers routing ``pallas`` /
``cudnn`` / ``xla`` with identical results on CPU (Pallas in interpret mode; ``cudnn`` falls back
to Pallas off-GPU or for masks cuDNN cannot express). Tolerance 1e-5 relative (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import cudnn_attention
from tests.numerics import rel_err




def test_resolve_impl():
    assert kernels.resolve_impl("gmm", "auto") == "xla"  # CPU
    assert kernels.resolve_impl("attention", "cudnn") == "cudnn"
    assert kernels.AUTO["gpu"]["attention"] == "cudnn"
    with pytest.raises(ValueError):
        kernels.resolve_impl("gmm", "cudnn")
    with pytest.raises(ValueError):
        kernels.resolve_impl("gmm", "fast")
    with pytest.raises(ValueError):
        kernels.resolve_impl("conv", "auto")


def test_dispatchers_agree():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
    gs = jnp.asarray([7, 0, 11], jnp.int32)
    for ep in (None, "relu2"):
        a = kernels.grouped_matmul(lhs, rhs, gs, impl="pallas", epilogue=ep)
        b = kernels.grouped_matmul(lhs, rhs, gs, impl="xla", epilogue=ep)
        assert rel_err(a, b) < 1e-5
    q = jnp.asarray(rng.normal(size=(1, 20, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 20, 2, 16)), jnp.float32)
    ref = kernels.attention(q, k, k, impl="xla")
    for impl in ("pallas", "cudnn", "auto"):
        assert rel_err(kernels.attention(q, k, k, impl=impl), ref) < 1e-5
    x = jnp.asarray(rng.normal(size=(1, 20, 4, 8)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.1, 0.5, size=(1, 20, 4)), jnp.float32)
    A = -jnp.ones((4,), jnp.float32)
    bm = jnp.asarray(rng.normal(size=(1, 20, 2, 8)), jnp.float32)
    ya, fa = kernels.ssd(x, dt, A, bm, bm, chunk_size=8, impl="pallas")
    yb, fb = kernels.ssd(x, dt, A, bm, bm, chunk_size=8, impl="xla")
    assert rel_err(ya, yb) < 1e-5 and rel_err(fa, fb) < 1e-5


def test_cudnn_support_rules():
    q = jax.ShapeDtypeStruct((1, 64, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert cudnn_attention.why_unsupported(q, k, k, require_gpu=False) is None
    pos = jnp.zeros((1, 64), jnp.int32)
    assert "segment" in cudnn_attention.why_unsupported(q, k, k, q_segment_ids=pos, kv_segment_ids=pos,
                                                        require_gpu=False)
    assert "positions" in cudnn_attention.why_unsupported(q, k, k, q_positions=pos, require_gpu=False)
    assert "dtype" in cudnn_attention.why_unsupported(jax.ShapeDtypeStruct((1, 64, 32, 128), jnp.float32), k, k,
                                                      require_gpu=False)
    assert "GPU" in cudnn_attention.why_unsupported(q, k, k)  # CPU
