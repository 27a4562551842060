"""Context parallelism through the whole tiny model (Mamba2 + attention + MoE + MLP) on 8
simulated CPU devices (a subprocess): a data x context (2 x 4) mesh splits each 64-token row
over 4 devices (16 tokens each = one SSD chunk per shard), with packed documents whose
boundaries fall inside and on shard edges. The hidden states and the gradients of every
parameter equal the unsharded model's within 1e-5 relative to each quantity's largest magnitude
(fp32; the SSD state passing and the K/V all-gather reorder sums)."""

import json

import pytest

from tests.multidevice import run_on_cpu_devices

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

TOL = 1e-5


def test_context_parallel_whole_model():
    res = run_on_cpu_devices(__file__)
    assert res["kernels_reached"] == {"attention": True, "ssd": True}
    assert res["hidden"] < TOL and res["grads"] < TOL, res


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.sharding.context import ContextParallel, make_context_parallel
    from models import nemotron_h as nh
    from models.nemotron_h.partitioning import use_partitioner

    cfg = nh.preset("tiny", pattern="M*E-", vocab_size=128, n_group=1, topk_group=1)
    params = jax.jit(lambda k: nh.init_params(cfg, k, jnp.float32))(jax.random.key(0))
    B, T = 2, 64
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    seg = np.ones((B, T), np.int32)
    seg[0, 10:] = 2; seg[0, 32:] = 3  # a document spanning shards 0-1, one starting on shard 2's edge
    seg[1, 40:] = 2
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def loss(p):
        h = nh.hidden_states(p, tokens, cfg, positions=pos, segment_ids=seg)
        return jnp.sum(jnp.sin(h)), h

    (_, h_ref), g_ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, context=4))
    cp = make_context_parallel(mesh)
    reached = {"attention": False, "ssd": False}

    class Recording(ContextParallel):  # records that the model reached both kernels
        def attention(self, *a, **k):
            reached["attention"] = True
            return super().attention(*a, **k)

        def ssd(self, *a, **k):
            reached["ssd"] = True
            return super().ssd(*a, **k)

    cp = Recording(cp.mesh, cp.rules)

    def sharded(p):
        with use_partitioner(sharding.activation_partitioner(mesh), None, cp):
            return jax.value_and_grad(loss, has_aux=True)(p)

    (_, h), g = jax.jit(sharded)(params)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    print(json.dumps({"hidden": rel(h, h_ref),
                      "grads": max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))),
                      "kernels_reached": reached}))


if __name__ == "__main__":
    main()
