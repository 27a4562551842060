"""The compiled (non-interpret) kernel paths lower, from a CPU host, for the accelerators at
Nemotron shapes: GPU through the Pallas Triton backend (an abstract H100 device) — grouped
matmul, attention and SSD, forward and backward — and Mosaic TPU for the megablox-style grouped
matmul. Lowering checks block shapes, index maps and the kernel bodies' lowering rules; it does
not compile to PTX/TPU code nor run anything (that needs the device)."""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from kernels import pallas_attention, pallas_gmm, pallas_ssd

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _ctx(platform):
    if platform == "cuda":
        dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
        return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev))
    return contextlib.nullcontext()


def _lower(platform, f, *args):
    with _ctx(platform):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _sum(f):
    return lambda *a: sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(f(*a)))


@pytest.mark.parametrize("platform,variant", [("cuda", "gpu"), ("tpu", "tpu")])
def test_gmm_lowers(platform, variant):
    lhs, rhs, gs = S((24576, 2688), BF), S((128, 2688, 1856), BF), S((128,), jnp.int32)
    f = lambda a, w, g: pallas_gmm.gmm(a, w, g, variant=variant, epilogue="relu2", interpret=False)
    txt = _lower(platform, jax.grad(_sum(f), (0, 1)), lhs, rhs, gs)
    assert ("triton" in txt) if platform == "cuda" else ("tpu_custom_call" in txt)


def test_attention_and_ssd_lower_for_gpu():
    q, k = S((1, 4096, 32, 128), BF), S((1, 4096, 2, 128), BF)
    f = lambda q, k, v: pallas_attention.attention(q, k, v, interpret=False)
    assert "triton" in _lower("cuda", jax.grad(_sum(f), (0, 1, 2)), q, k, k)
    x, dt, A, B = S((1, 1024, 64, 64), BF), S((1, 1024, 64), jnp.float32), S((64,), jnp.float32), S((1, 1024, 8, 128), BF)
    g = lambda *a: pallas_ssd.ssd(*a, chunk_size=128, interpret=False)
    assert "triton" in _lower("cuda", jax.grad(_sum(g), range(5)), x, dt, A, B, B)
