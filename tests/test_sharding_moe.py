"""Expert-parallel MoE (``cascade_jax.sharding.moe``, dropless padded all-to-all) against the
unsharded layer on 8 simulated CPU devices (a subprocess): the MoE mixer's output and the
gradients of its input and of every MoE weight, on meshes data x expert (2 x 4) and
expert x tensor (4 x 2), with the router's natural choices and with routing skewed entirely
onto the first expert shard (every token's top-k among experts 0..1, which live on one device:
nothing may be dropped). fp32; tolerance 1e-5 relative to each quantity's largest magnitude.

The ragged (GPU/TPU) exchange cannot compile on CPU: here its ``shard_map`` program, forward
and backward, is lowered to StableHLO on the data x expert mesh (two ``ragged_all_to_all`` each
way), and compiling it is refused by XLA:CPU as unimplemented; its numerics are checked with an
emulated collective in tests/test_sharding_moe_ragged.py. ``a2a="auto"`` is the padded path on
CPU."""

import json
import os
import subprocess
import sys

TOL = 1e-5


def test_expert_parallel_matches_unsharded():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ragged = res.pop("ragged")
    assert ragged["auto_on_cpu"] == "padded"
    assert ragged["lowered_ops"] >= 4, ragged  # 2 forward + their transposes
    assert "ragged-all-to-all" in ragged["compile_error"] and "not supported" in ragged["compile_error"], ragged
    assert set(res) == {f"{m}_{r}" for m in ("data_expert", "expert_tensor") for r in ("natural", "skewed")}
    for name, r in res.items():
        assert r["out"] < TOL and r["grads"] < TOL, (name, r)
        if name.endswith("skewed"):
            assert r["max_shard_load"] == 1.0, r  # every routed copy went to one expert shard


def main():
    import dataclasses
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.sharding import RULES
    from cascade_jax.sharding.moe import expert_parallel_moe, make_expert_parallel
    from models import nemotron_h as nh
    from models.nemotron_h.model import moe_mixer, route
    from models.nemotron_h.partitioning import use_partitioner

    cfg = nh.preset("tiny", pattern="E", n_group=1, topk_group=1)
    p = nh.init_params(cfg, jax.random.key(0), dtype=jnp.float32)["layers"][0]["mixer"]
    u = jax.random.normal(jax.random.key(1), (8, 16, cfg.hidden_size), jnp.float32)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    def loss(p, u):
        out = moe_mixer(p, u, cfg)
        return jnp.sum(jnp.sin(out)), out

    res = {}
    for routing in ("natural", "skewed"):
        q = dict(p)
        if routing == "skewed":  # the selection bias sends every token to experts {0, 1}
            q["e_score_correction_bias"] = jnp.asarray([100.0, 100.0] + [0.0] * (cfg.n_routed_experts - 2))
        (_, ref), g_ref = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(q, u)
        _, idx = route(q, u.reshape(-1, cfg.hidden_size), cfg)
        for name, mc in (("data_expert", MeshConfig(data=2, fsdp=1, expert=4)),
                         ("expert_tensor", MeshConfig(fsdp=1, expert=4, tensor=2))):
            mesh = sharding.make_mesh(mc)
            ep = make_expert_parallel(mesh)
            assert ep is not None

            def sharded(q, u):
                with use_partitioner(sharding.activation_partitioner(mesh), ep):
                    return jax.value_and_grad(loss, (0, 1), has_aux=True)(q, u)

            (_, out), g = jax.jit(sharded)(q, u)
            e_loc = cfg.n_routed_experts // 4
            load = np.bincount(np.asarray(idx).ravel() // e_loc, minlength=4) / idx.size
            res[f"{name}_{routing}"] = {
                "out": rel(out, ref),
                "grads": max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref))),
                "max_shard_load": float(load.max()),
            }
            if name == "data_expert" and routing == "natural":
                rag = functools.partial(expert_parallel_moe, mesh, RULES, a2a="ragged")

                def sharded_ragged(q, u):
                    with use_partitioner(sharding.activation_partitioner(mesh), rag):
                        return jax.value_and_grad(loss, (0, 1), has_aux=True)(q, u)

                lowered = jax.jit(sharded_ragged).lower(q, u)
                try:
                    lowered.compile()
                    err = ""
                except Exception as e:  # noqa: BLE001 - XLA:CPU has no ragged all-to-all
                    err = str(e)[:300]
                res["ragged"] = {"auto_on_cpu": ep.keywords["a2a"],
                                 "lowered_ops": lowered.as_text().count("ragged_all_to_all"),
                                 "compile_error": err}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
