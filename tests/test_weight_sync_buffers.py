"""The server's reused host memory for disk weight updates (``models.nemotron_h.checkpoint.HostBuffers``):
loads into the pool are bit-exact, a new version never lands in memory that the serving (or any
still referenced) version uses, and the slab of the version before last is reused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.rollout.server import main as serve_main
from models import nemotron_h as nh
from models.nemotron_h.checkpoint import HostBuffers


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _shares(a, b) -> bool:
    return any(np.shares_memory(x, y) for x in _leaves(a) for y in _leaves(b))


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_cfg):
    """Two params-layout checkpoints of the tiny model (bf16 leaves, fp32 where the model keeps
    fp32; random values from numpy, different per version)."""
    cfg = dataclasses.replace(tiny_cfg(), hf_source=None)
    root = tmp_path_factory.mktemp("versions")
    out = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        p = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype),
                         nh.abstract_params(cfg, jnp.bfloat16))
        nh.save_checkpoint(p, cfg, root / f"v{seed}", layout="params")
        out.append((root / f"v{seed}", p))
    return out


def test_double_buffering_bit_exact_and_reuse(versions):
    """v0 -> slab A, v1 -> slab B while v0 is held (no shared memory, v0 intact), then v0 again
    once the first v0 is dropped -> slab A (the same address; no third slab); every load equals
    the saved weights bit for bit."""
    (d0, p0), (d1, p1) = versions
    hb = HostBuffers(2)
    _, a = nh.load_checkpoint(d0, host_buffers=hb)
    _bitwise(a, p0)
    addr_a = {x.ctypes.data for x in _leaves(a)}
    _, b = nh.load_checkpoint(d1, host_buffers=hb)
    _bitwise(b, p1)
    _bitwise(a, p0)  # the serving version was not written
    assert not _shares(a, b) and (hb.allocated, hb.reused) == (2, 0)
    if jax.default_backend() == "cpu":  # the arrays live in their slab (adopted by JAX, not copied)
        assert all(any(np.shares_memory(x, s) for s in hb._pool) for x in _leaves(a) + _leaves(b))
    del a
    _, c = nh.load_checkpoint(d0, host_buffers=hb)
    _bitwise(c, p0)
    _bitwise(b, p1)
    assert (hb.allocated, hb.reused) == (2, 1)
    if jax.default_backend() == "cpu":
        assert {x.ctypes.data for x in _leaves(c)} == addr_a  # the version before last's slab


def test_held_slab_is_never_overwritten(versions):
    """A numpy view of an old version held by someone keeps its slab out of reuse: later loads
    go elsewhere and the held bytes stay those of the old version; a reserved (touched) slab is
    the next load's."""
    (d0, p0), (d1, p1) = versions
    hb = HostBuffers(2)
    _, a = nh.load_checkpoint(d0, host_buffers=hb)
    held = np.asarray(jax.tree.leaves(a)[0])
    want = held.copy()
    del a
    hb.reserve(p0)
    assert hb.allocated == 2
    _, b = nh.load_checkpoint(d1, host_buffers=hb)
    assert hb.reused == 1 and not np.shares_memory(held, np.asarray(jax.tree.leaves(b)[0]))
    del b
    for d, p in ((d0, p0), (d1, p1), (d0, p0)):
        _, x = nh.load_checkpoint(d, host_buffers=hb)
        _bitwise(x, p)
        assert not np.shares_memory(held, np.asarray(jax.tree.leaves(x)[0]))
        del x
    np.testing.assert_array_equal(held.view(np.uint16), want.view(np.uint16))
    del held
    _, x = nh.load_checkpoint(d1, host_buffers=hb)
    _bitwise(x, p1)


def test_cast_and_bad_arguments(versions):
    """A cast load (bf16 stored, float32 asked) is exact through the pool too; slabs < 1 and
    a negative ``--update-buffers`` are refused naming the field."""
    (d0, p0), _ = versions
    hb = HostBuffers(1)
    _, x = nh.load_checkpoint(d0, dtype=jnp.float32, host_buffers=hb)
    want = jax.tree.map(lambda y: y.astype(jnp.float32), p0)
    _bitwise(x, want)
    with pytest.raises(ValueError, match="slabs: must be >= 1"):
        HostBuffers(0)
    assert serve_main(["--checkpoint", str(d0), "--update-buffers", "-1", "--compilation-cache-dir", ""]) == 2
