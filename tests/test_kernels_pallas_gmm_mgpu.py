"""Mosaic GPU grouped matmul (wgmma/TMA) on CPU through JAX's Mosaic GPU interpreter (a private API
of the pinned JAX version: if a JAX upgrade moves it, this module fails to import, on purpose —
the checks must be ported, not skipped), plus lowering for an H100.

Checked in the interpreter: forward, the fused relu² epilogue (pre- and post-activation outputs)
and the input-gradient kernel (rhs transposed in shared memory), with empty groups, a group of 3
rows (smaller than the 64-row tile) and rows past ``sum(group_sizes)`` (zeros). The weight
gradient runs on the Triton-layout kernel, tested in ``test_kernels_pallas_gmm.py``.
Tolerance: bf16 operands, fp32 accumulation — exact match to the XLA reference's bf16 output
(1e-6 relative) for the matmuls, 1e-2 relative for relu² (bf16 rounding of the square).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.pallas.mosaic_gpu.interpret import params as interp
from jax.sharding import AbstractDevice, AbstractMesh

from kernels import pallas_gmm_mgpu as mg
from kernels import xla_gmm
from tests.numerics import rel_err

H100 = "NVIDIA H100 80GB HBM3"




def test_mosaic_gmm_in_gpu_interpreter():
    rng = np.random.default_rng(0)
    m, k, n, e = 150, 128, 64, 5
    gs = jnp.asarray([0, 70, 3, 0, 70], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(e, k, n)) / np.sqrt(k), jnp.bfloat16)
    dout = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    dev = AbstractDevice(device_kind=H100, platform="gpu", num_cores=8)
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)), \
                interp.force_gpu_interpret_mode(interp.InterpretGPUParams()):
            out = mg._call(lhs, rhs, gs, (64, 64))[0]
            pre, post = mg._call(lhs, rhs, gs, (64, 64), epilogue="relu2")
            dlhs = mg._call(dout, rhs, gs, (64, 64), transpose_rhs=True)[0]
    except Exception:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
        getattr(ipc, "reset_gpu_interpret_mode_state", lambda: None)()
        raise
    ref = xla_gmm.gmm(lhs, rhs, gs)
    assert rel_err(out, ref) < 1e-6 and rel_err(pre, ref) < 1e-6
    assert np.all(np.asarray(out, np.float32)[143:] == 0)
    assert rel_err(post, jnp.maximum(ref.astype(jnp.float32), 0.0) ** 2) < 1e-2
    assert rel_err(dlhs, xla_gmm.gmm(dout, jnp.swapaxes(rhs, 1, 2), gs)) < 1e-6


def test_aligned_tiles():
    dest, tile_group, rows_p = mg.aligned_tiles(jnp.asarray([0, 70, 3, 0, 70], jnp.int32), 150, 64)
    assert rows_p % 64 == 0
    np.testing.assert_array_equal(np.asarray(tile_group)[:5], [1, 1, 2, 4, 4])
    assert np.all(np.asarray(tile_group)[5:] == -1)
    np.testing.assert_array_equal(np.asarray(dest)[[0, 69, 70, 72, 73]], [0, 69, 128, 130, 192])
    assert np.all(np.asarray(dest)[143:] >= rows_p)  # rows past sum(group_sizes) are dropped


def test_mosaic_gmm_lowers_for_h100():
    S = jax.ShapeDtypeStruct
    lhs, rhs, gs = S((24576, 2688), jnp.bfloat16), S((128, 2688, 1856), jnp.bfloat16), S((128,), jnp.int32)
    f = lambda a, w, g: jnp.sum(mg.gmm(a, w, g, epilogue="relu2").astype(jnp.float32))
    dev = AbstractDevice(device_kind=H100, platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
        txt = jax.jit(jax.grad(f, (0, 1))).trace(lhs, rhs, gs).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in txt
