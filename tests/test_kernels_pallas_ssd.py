"""Pallas fused SSD scan (interpret mode on CPU) against the XLA chunked reference.

Ragged edges: T not a multiple of the chunk, several segments per row (one starting exactly on a
chunk boundary, one a single token long), an initial state, padding steps with ``dt = 0``,
grouped B/C (2 heads per group). Checked: y, the final state, and gradients w.r.t. x, dt, A, B,
C and the initial state through a loss on both outputs.
Tolerances: 1e-5 relative to the largest magnitude (fp32), 2e-2 for bf16 inputs.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels import pallas_ssd, xla_ssd
from tests.numerics import rel_err

B, T, H, P, G, N, Q = 2, 45, 4, 8, 2, 16, 16


def _inputs(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, H, P)), dtype)
    dt = rng.uniform(0.01, 0.5, size=(B, T, H)).astype(np.float32)
    dt[1, 40:] = 0.0
    A = -jnp.asarray(rng.uniform(0.5, 2.0, size=(H,)), jnp.float32)
    Bm = jnp.asarray(rng.normal(size=(B, T, G, N)), dtype)
    Cm = jnp.asarray(rng.normal(size=(B, T, G, N)), dtype)
    seg = np.zeros((B, T), np.int32)
    seg[0, 10:] = 1
    seg[0, 11:] = 2  # a one-token segment
    seg[0, 16:] = 3  # starts on a chunk boundary
    seg[1, 33:] = 1
    s0 = jnp.asarray(rng.normal(size=(B, H, P, N)), jnp.float32)
    return x, jnp.asarray(dt), A, Bm, Cm, jnp.asarray(seg), s0




def _run(fn, x, dt, A, Bm, Cm, seg, s0):
    def loss(x, dt, A, Bm, Cm, s0):
        y, f = fn(x, dt, A, Bm, Cm, chunk_size=Q, segment_ids=seg, initial_state=s0)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(f)), (y, f)

    return jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(x, dt, A, Bm, Cm, s0)


@pytest.mark.parametrize("with_segments", [True, False])
def test_ssd_matches_reference(with_segments):
    x, dt, A, Bm, Cm, seg, s0 = _inputs()
    seg = seg if with_segments else None
    grads, (y, f) = _run(pallas_ssd.ssd, x, dt, A, Bm, Cm, seg, s0)
    grads_r, (y_r, f_r) = _run(xla_ssd.ssd, x, dt, A, Bm, Cm, seg, s0)
    assert y.dtype == jnp.float32 and y.shape == (B, T, H, P) and f.shape == (B, H, P, N)
    assert rel_err(y, y_r) < 1e-5 and rel_err(f, f_r) < 1e-5
    for name, g, g_r in zip(["x", "dt", "A", "B", "C", "s0"], grads, grads_r):
        assert rel_err(g, g_r) < 1e-5, name


def test_ssd_bf16_no_initial_state():
    x, dt, A, Bm, Cm, seg, _ = _inputs(jnp.bfloat16, seed=1)
    y, f = jax.jit(lambda *a: pallas_ssd.ssd(*a, chunk_size=Q, segment_ids=seg))(x, dt, A, Bm, Cm)
    y_r, f_r = xla_ssd.ssd(x, dt, A, Bm, Cm, chunk_size=Q, segment_ids=seg)
    assert rel_err(y, y_r) < 2e-2 and rel_err(f, f_r) < 2e-2
