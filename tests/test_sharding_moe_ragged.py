"""The ragged (GPU/TPU) exchange of the expert-parallel MoE, checked on CPU where
``jax.lax.ragged_all_to_all`` cannot run (XLA:CPU has no kernel for it):

* :func:`ragged_plan`'s offsets and sizes, fed to a numpy emulation of the collective written
  from its documented semantics (``output_offsets`` index the *receiver's* buffer), deliver
  every device's copies to the right shard in sender order, label each received row with its
  local expert, and the reverse exchange returns every row to its sender's slot — for random,
  fully skewed (all copies to one shard) and one-device-silent routing; exact integer checks;
* the whole ragged body (dispatch → plan → exchange → experts → reverse exchange → combine),
  run on 4 emulated devices (``vmap`` with an axis name; a jnp emulation of the collective that
  is itself checked against the numpy one) equals the unsharded layer, output and gradients,
  fp32, 1e-5 relative, including routing skewed entirely onto one shard (dropless);
* ``a2a`` resolution: auto = padded on CPU / ragged on gpu and tpu, ragged asked for on a CPU
  mesh is an error naming the field.
Lowering of the real ``shard_map`` program to StableHLO on 8 simulated devices is checked in
tests/test_sharding_moe.py. Not run on a GPU/TPU here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.sharding import moe
from cascade_jax.sharding.moe import ragged_plan, resolve_a2a

EP, E_LOC, N, K = 4, 3, 5, 2
M = N * K


def np_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """Documented semantics, one slice per destination: device ``src`` sends
    ``operand[input_offsets[i] : +send_sizes[i]]`` to device ``i``, which writes it at
    ``output_offsets[i]`` *of the sender's array* in its own result; ``recv_sizes[j]`` on the
    receiver must equal the sender's ``send_sizes``."""
    ep = len(operands)
    res = [np.array(o, copy=True) for o in outputs]
    for src in range(ep):
        for dst in range(ep):
            size = int(send_sizes[src][dst])
            assert int(recv_sizes[dst][src]) == size  # the collective's precondition
            lo, at = int(input_offsets[src][dst]), int(output_offsets[src][dst])
            assert at + size <= len(res[dst])
            res[dst][at:at + size] = operands[src][lo:lo + size]
    return res


def _routing(kind, rng):
    e = EP * E_LOC
    if kind == "random":
        return [rng.integers(0, e, (N, K)) for _ in range(EP)]
    if kind == "skewed":  # every copy of every device to shard 2
        return [rng.integers(2 * E_LOC, 3 * E_LOC, (N, K)) for _ in range(EP)]
    # device 1 sends nothing to shards 0/3, shard 3 receives nothing at all
    return [rng.integers(0, 3 * E_LOC, (N, K)) if d != 1 else rng.integers(E_LOC, 3 * E_LOC, (N, K))
            for d in range(EP)]


@pytest.mark.parametrize("kind", ["random", "skewed", "uneven"])
def test_ragged_plan_against_numpy_emulation(kind):
    rng = np.random.default_rng({"random": 0, "skewed": 1, "uneven": 2}[kind])
    ids = _routing(kind, rng)
    # each device's copies sorted by expert; a row carries (expert, device, position) to track it
    rows, counts = [], []
    for d, idx in enumerate(ids):
        flat = idx.ravel()
        order = np.argsort(flat, kind="stable")
        rows.append(np.stack([flat[order], np.full(M, d), order], 1))
        counts.append(np.bincount(flat, minlength=EP * E_LOC))
    all_counts = jnp.asarray(np.stack(counts), jnp.int32)
    plans = [jax.tree.map(np.asarray, ragged_plan(all_counts, jnp.int32(d), EP * M)) for d in range(EP)]
    get = lambda f: [getattr(p, f) for p in plans]
    recv = np_ragged_all_to_all(rows, [np.full((EP * M, 3), -1)] * EP, get("input_offsets"),
                                get("send_sizes"), get("output_offsets"), get("recv_sizes"))
    for d in range(EP):
        want = np.concatenate([r[r[:, 0] // E_LOC == d] for r in rows])
        n = len(want)
        np.testing.assert_array_equal(recv[d][:n], want)
        assert np.all(recv[d][n:] == -1)
        np.testing.assert_array_equal(plans[d].recv_local_expert[:n], want[:, 0] - d * E_LOC)
        assert np.all(plans[d].recv_local_expert[n:] == E_LOC)
        np.testing.assert_array_equal(plans[d].recv_group_sizes,
                                      np.bincount(want[:, 0] - d * E_LOC, minlength=E_LOC))
        np.testing.assert_array_equal(plans[d].recv_offsets[1:], np.cumsum(plans[d].recv_sizes)[:-1])
    back = np_ragged_all_to_all(recv, [np.full((M, 3), -1)] * EP, get("recv_offsets"), get("recv_sizes"),
                                get("back_output_offsets"), get("send_sizes"))
    for d in range(EP):
        np.testing.assert_array_equal(back[d], rows[d])
    if kind == "skewed":
        assert all(p.send_sizes.tolist() == [0, 0, M, 0] for p in plans)
        assert plans[2].recv_sizes.sum() == EP * M  # the whole worst-case buffer is used


# ----------------------------------------------------------------------------------------------
# The whole ragged body on emulated devices


def _jnp_collectives(axis):
    """``(all_gather, axis_index, ragged_all_to_all)`` inside ``vmap(axis_name=axis)``; the ragged
    exchange emulated from the same documented semantics with gathers (differentiable)."""
    gather = lambda c: jax.lax.all_gather(c, axis)
    index = lambda: jax.lax.axis_index(axis)

    def ragged(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        ops, io, ss, oo = gather(operand), gather(input_offsets), gather(send_sizes), gather(output_offsets)
        me, r = index(), jnp.arange(output.shape[0])
        res = output
        for s in range(ops.shape[0]):
            lo, size, start = oo[s, me], ss[s, me], io[s, me]
            inside = (r >= lo) & (r < lo + size)
            res = jnp.where(inside[:, None], ops[s][jnp.clip(start + r - lo, 0, operand.shape[0] - 1)], res)
        return res

    return gather, index, ragged


def _dense_ffn(rows, group_sizes, up, down):
    """Reference expert FFN: each row times its own expert's weights (rows past the groups: 0)."""
    ends = jnp.cumsum(group_sizes)
    r = jnp.arange(rows.shape[0])
    e = jnp.minimum(jnp.searchsorted(ends, r, side="right"), up.shape[0] - 1)
    h = jax.nn.relu(jnp.einsum("rh,rhi->ri", rows, up[e])) ** 2
    return jnp.where((r < ends[-1])[:, None], jnp.einsum("ri,rih->rh", h, down[e]), 0.0)


def test_jnp_emulation_equals_numpy_emulation():
    rng = np.random.default_rng(3)
    ids = _routing("random", rng)
    counts = jnp.asarray(np.stack([np.bincount(i.ravel(), minlength=EP * E_LOC) for i in ids]), jnp.int32)
    ops = rng.normal(size=(EP, M, 2)).astype(np.float32)
    _, _, ragged = _jnp_collectives("d")

    def dev(op, me):
        p = ragged_plan(counts, me, EP * M)
        return ragged(op, jnp.full((EP * M, 2), -1.0), p.input_offsets, p.send_sizes, p.output_offsets,
                      p.recv_sizes), p

    got, p = jax.vmap(dev, axis_name="d")(jnp.asarray(ops), jnp.arange(EP))
    p = jax.tree.map(np.asarray, p)
    want = np_ragged_all_to_all(list(ops), [np.full((EP * M, 2), -1.0, np.float32)] * EP, p.input_offsets,
                                p.send_sizes, p.output_offsets, p.recv_sizes)
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_ragged_body_equals_unsharded(kind):
    rng = np.random.default_rng(10 + (kind == "skewed"))
    hid, inter, e = 8, 6, EP * E_LOC
    idx = jnp.asarray(np.stack(_routing(kind, rng)), jnp.int32)  # [EP, N, K]
    w = jnp.asarray(rng.uniform(0.1, 1.0, (EP, N, K)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(EP, N, hid)), jnp.float32)
    up = jnp.asarray(rng.normal(size=(e, hid, inter)) / 3, jnp.float32)
    down = jnp.asarray(rng.normal(size=(e, inter, hid)) / 3, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(EP, N, hid)), jnp.float32)

    def unsharded(x, up, down):
        from kernels import moe_dispatch
        xf, i2, w2 = x.reshape(-1, hid), idx.reshape(-1, K), w.reshape(-1, K)
        order, gs = moe_dispatch.sort_by_expert(i2, e)
        ys = _dense_ffn(moe_dispatch.permute(xf, order, K), gs, up, down)
        return jnp.sum(moe_dispatch.unpermute(ys, order, w2).reshape(EP, N, hid) * cot)

    def sharded(x, up, down):
        body = lambda x, w, i, u, d: moe._ragged_local(
            x, w, i, u, d, ep=EP, ep_name="d", e_loc=E_LOC, tp_axes=(), expert_ffn=_dense_ffn,
            collectives=_jnp_collectives("d"))
        out = jax.vmap(body, axis_name="d")(x, w, idx, up.reshape(EP, E_LOC, hid, inter),
                                              down.reshape(EP, E_LOC, inter, hid))
        return jnp.sum(out * cot)

    ref, g_ref = jax.value_and_grad(unsharded, (0, 1, 2))(x, up, down)
    got, g = jax.jit(jax.value_and_grad(sharded, (0, 1, 2)))(x, up, down)
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    assert rel(got, ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-5
    assert np.abs(np.asarray(g_ref[1])).max() > 0


def test_a2a_resolution():
    assert resolve_a2a("auto", "cpu") == "padded"
    assert resolve_a2a("auto", "gpu") == "ragged" and resolve_a2a("auto", "tpu") == "ragged"
    assert resolve_a2a("padded", "gpu") == "padded" and resolve_a2a("ragged", "tpu") == "ragged"
    with pytest.raises(ValueError, match="a2a='ragged'.*CPU"):
        resolve_a2a("ragged", "cpu")
    with pytest.raises(ValueError, match="mesh.a2a: must be one of"):
        resolve_a2a("fast", "gpu")
    assert resolve_a2a("auto", "cuda") == "ragged"  # a GPU device's own platform name


def test_mesh_config_a2a():
    """``mesh.a2a`` in the run config: a bad value, or ragged on CPU devices, names the field."""
    from cascade_jax import config as C
    from cascade_jax.sharding import ShardingError, make_mesh

    assert C.MeshConfig().a2a == "auto"
    with pytest.raises(C.ConfigError, match=r"mesh\.a2a: must be one of \['auto', 'ragged', 'padded'\], got 'fast'"):
        C.MeshConfig(a2a="fast")
    with pytest.raises(C.ConfigError, match=r"mesh\.a2a"):
        C.apply_overrides(C.Config(), ["mesh.a2a=fast"])
    assert C.apply_overrides(C.Config(), ["mesh.a2a=padded"]).mesh.a2a == "padded"
    cpu = jax.devices("cpu")[:1]
    assert make_mesh(C.MeshConfig(fsdp=1, a2a="padded"), cpu).size == 1
    with pytest.raises(ShardingError, match=r"mesh\.a2a='ragged'.*not implemented on CPU"):
        make_mesh(C.MeshConfig(fsdp=1, a2a="ragged"), cpu)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))
    with pytest.raises(ValueError, match="a2a='ragged'"):
        moe.make_expert_parallel(mesh, a2a="ragged")
    from cascade_jax.sharding import compile_train_step
    from models import nemotron_h as nh
    with pytest.raises(ValueError, match="a2a='ragged'"):  # the train step passes it through
        compile_train_step("sft", mesh=mesh, state=None, batch=None, model_cfg=nh.preset("tiny"), a2a="ragged")
