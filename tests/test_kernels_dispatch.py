"""The kernel switch: ``resolve_impl`` per platform (the traced-for mesh's), the Pallas grouped-matmul
variant it picks (and that ``pallas_gmm`` does not import ``pallas_gmm_mgpu``), and the dispatchers routing ``pallas`` /
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


def _on(platform_name, kind):
    from jax.sharding import AbstractDevice, AbstractMesh
    dev = AbstractDevice(device_kind=kind, platform=platform_name, num_cores=8)
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev))


H100 = "NVIDIA H100 80GB HBM3"


def test_switch_follows_the_mesh_platform():
    """The one switch reads the platform of the mesh being traced for (here abstract meshes with
    an H100 / a TPU device, as when lowering from a CPU host): ``auto`` and the Pallas grouped
    matmul variant change with it; plain CPU keeps XLA and the Triton layout in interpret mode."""
    assert kernels.pallas_gmm_variant(jnp.bfloat16) == "gpu"
    with _on("gpu", H100):
        assert kernels.resolve_impl("attention", "auto") == "cudnn"
        assert kernels.pallas_gmm_variant(jnp.bfloat16) == "mosaic"
        assert kernels.pallas_gmm_variant(jnp.float32) == "gpu"
        assert kernels.pallas_gmm_variant() == "gpu"
    with _on("tpu", "TPU v5p"):
        assert kernels.resolve_impl("attention", "auto") == "xla"
        assert kernels.pallas_gmm_variant(jnp.bfloat16) == "tpu"
    for p in kernels.AUTO:
        assert kernels.AUTO[p]["gmm_pallas"] in ("gpu", "tpu", "mosaic")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_pallas_gmm_dispatch_lowers_per_variant():
    """``grouped_matmul(impl="pallas")`` on an H100 mesh: bf16 lowers to the Mosaic GPU kernel,
    fp32 to the Triton one (compiled, not interpreted: the mesh is a GPU's)."""
    S = jax.ShapeDtypeStruct
    f = lambda a, w, g: kernels.grouped_matmul(a, w, g, impl="pallas", epilogue="relu2")
    for dtype, marker in ((jnp.bfloat16, "mosaic_gpu"), (jnp.float32, "triton")):
        args = S((256, 128), dtype), S((4, 128, 128), dtype), S((4,), jnp.int32)
        with _on("gpu", H100):
            txt = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert marker in txt, dtype


def test_pallas_gmm_modules_do_not_import_each_other():
    import subprocess
    import sys
    code = ("import sys, kernels.pallas_gmm as p; assert 'kernels.pallas_gmm_mgpu' not in sys.modules; "
            "import kernels.pallas_gmm_mgpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    from kernels import pallas_gmm
    x = jnp.zeros((8, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="variant must be one of.*pallas_gmm_mgpu"):
        pallas_gmm.gmm(x, jnp.zeros((1, 8, 8), jnp.bfloat16), jnp.asarray([8]), variant="mosaic")
