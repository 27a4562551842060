"""The MoE's sharded dispatch (``cascade_jax.sharding.moe``) against the unsharded layer on 8
simulated CPU devices (a child process), fp32, with the router's natural choices and with
routing skewed entirely onto experts 0..1 (one device's experts on an expert mesh: nothing may
be dropped). Errors are relative to each quantity's largest magnitude.

* Expert-parallel (dropless padded all-to-all), meshes data x expert (2 x 4) and expert x
  tensor (4 x 2): the MoE mixer's output and the gradients of its input and of every MoE weight
  within ``EP_TOL`` = 1e-5.
* Token-local (no expert axis: each device sorts and multiplies its own tokens against the
  all-gathered experts), meshes fsdp x tensor (4 x 2), data x fsdp (2 x 4) and data x context
  (2 x 4, each row's 16 tokens split over 4 devices): the mixer's
  output and gradients within ``LOCAL_TOL`` = 1e-6 (measured <= 4.9e-7); the expert sort of
  the traced layer runs on each device's ``n·k / devices`` token copies (without the hook: on
  all ``n·k``, the global dispatch every device repeats); the tiny model's
  loss and every gradient leaf (layers M, E, *, -; the step's partitioner and dispatch
  installed) within ``MODEL_TOL`` = 2e-6 of one device (measured <= 7.6e-7).
* ``mesh.a2a``: the runner's mesh build (``runner.build.build_mesh``) refuses
  ``mesh.a2a='ragged'`` on this CPU mesh with a config error naming ``mesh.a2a``.

The ragged (GPU/TPU) exchange cannot compile on CPU: here its ``shard_map`` program, forward
and backward, is lowered to StableHLO on the data x expert mesh (two ``ragged_all_to_all`` each
way), and compiling it is refused by XLA:CPU as unimplemented; its numerics are checked with an
emulated collective in tests/test_sharding_moe_ragged.py. ``a2a="auto"`` is the padded path on
CPU."""

import json

import pytest

from tests.multidevice import run_on_cpu_devices

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

EP_TOL = 1e-5
LOCAL_TOL = 1e-6
MODEL_TOL = 2e-6
EP_MESHES = ("data_expert", "expert_tensor")
LOCAL_MESHES = ("fsdp_tensor", "data_fsdp", "data_context")


def test_sharded_moe_matches_unsharded():
    res = run_on_cpu_devices(__file__)
    ragged = res.pop("ragged")
    assert ragged["auto_on_cpu"] == "padded"
    assert ragged["lowered_ops"] >= 4, ragged  # 2 forward + their transposes
    assert "ragged-all-to-all" in ragged["compile_error"] and "not supported" in ragged["compile_error"], ragged
    runner = res.pop("runner_ragged_error")
    assert runner.startswith("mesh.a2a='ragged'") and "not implemented on CPU" in runner, runner
    model = res.pop("model")
    assert set(model) == {"fsdp_tensor", "data_fsdp"}
    for name, r in model.items():
        assert r["hook"] == "token_local_moe", (name, r)
        assert r["loss"] < MODEL_TOL and r["grads"] < MODEL_TOL, (name, r)
    n_copies = res.pop("n_copies")  # tokens x top-k of the layer's input
    for name, devs in (("fsdp_tensor", 4), ("data_fsdp", 8), ("data_context", 8)):  # token splits
        rows = res.pop(f"sorted_rows_{name}")
        assert rows == {"hook": n_copies // devs, "global": n_copies}, (name, rows)
    assert set(res) == {f"{m}_{r}" for m in EP_MESHES + LOCAL_MESHES for r in ("natural", "skewed")}
    for name, r in res.items():
        tol = EP_TOL if name.startswith(EP_MESHES) else LOCAL_TOL
        assert r["hook"] == ("expert_parallel_moe" if name.startswith(EP_MESHES) else "token_local_moe"), (name, r)
        assert r["out"] < tol and r["grads"] < tol, (name, r)
        if name.endswith("skewed"):
            assert r["max_shard_load"] == 1.0, r  # every routed copy went to experts 0..1


def main():
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    import cascade_jax.rl as rl
    from cascade_jax import config as C
    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.runner import build as B
    from cascade_jax.sharding import RULES
    from cascade_jax.sharding.moe import expert_parallel_moe, make_moe_dispatch
    from models import nemotron_h as nh
    from models.nemotron_h.model import moe_mixer, route
    from models.nemotron_h.partitioning import use_partitioner

    assert jax.device_count() == 8, jax.devices()
    cfg = nh.preset("tiny", pattern="E", n_group=1, topk_group=1)
    p = nh.init_params(cfg, jax.random.key(0), dtype=jnp.float32)["layers"][0]["mixer"]
    u = jax.random.normal(jax.random.key(1), (8, 16, cfg.hidden_size), jnp.float32)
    meshes = {"data_expert": MeshConfig(data=2, fsdp=1, expert=4),
              "expert_tensor": MeshConfig(fsdp=1, expert=4, tensor=2),
              "fsdp_tensor": MeshConfig(fsdp=4, tensor=2),
              "data_fsdp": MeshConfig(data=2, fsdp=4),
              "data_context": MeshConfig(data=2, fsdp=1, context=4)}

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    def max_rel(tree, ref):
        return max(rel(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))

    def loss(p, u):
        out = moe_mixer(p, u, cfg)
        return jnp.sum(jnp.sin(out)), out

    def with_hook(fn, mesh, hook):
        def run(*args):
            with use_partitioner(sharding.activation_partitioner(mesh), hook):
                return fn(*args)
        return run

    def sorted_rows(jaxpr) -> int:
        """Longest operand of any ``sort`` (the expert sort) in ``jaxpr``, inside ``shard_map``
        bodies too (there: one device's block)."""
        best = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sort":
                best = max(best, eqn.invars[0].aval.size)
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        best = max(best, sorted_rows(getattr(sub, "jaxpr", sub)))
        return best

    layer_grad = jax.value_and_grad(loss, (0, 1), has_aux=True)
    res = {}
    for routing in ("natural", "skewed"):
        q = dict(p)
        if routing == "skewed":  # the selection bias sends every token to experts {0, 1}
            q["e_score_correction_bias"] = jnp.asarray([100.0, 100.0] + [0.0] * (cfg.n_routed_experts - 2))
        (_, ref), g_ref = jax.jit(layer_grad)(q, u)
        _, idx = route(q, u.reshape(-1, cfg.hidden_size), cfg)
        res["n_copies"] = int(idx.size)
        for name, mc in meshes.items():
            mesh = sharding.make_mesh(mc)
            hook = make_moe_dispatch(mesh)
            sharded = jax.jit(with_hook(layer_grad, mesh, hook))
            (_, out), g = sharded(q, u)
            e_loc = cfg.n_routed_experts // 4
            load = np.bincount(np.asarray(idx).ravel() // e_loc, minlength=4) / idx.size
            res[f"{name}_{routing}"] = {"out": rel(out, ref), "grads": max_rel(g, g_ref),
                                        "max_shard_load": float(load.max()),
                                        "hook": hook.func.__name__}
            if name in LOCAL_MESHES and routing == "natural":  # rows each device sorts by expert
                res[f"sorted_rows_{name}"] = {
                    "hook": sorted_rows(jax.make_jaxpr(with_hook(layer_grad, mesh, hook))(q, u)),
                    "global": sorted_rows(jax.make_jaxpr(with_hook(layer_grad, mesh, None))(q, u))}
            if name == "data_expert" and routing == "natural":
                rag = functools.partial(expert_parallel_moe, mesh, RULES, a2a="ragged")
                lowered = jax.jit(with_hook(layer_grad, mesh, rag)).lower(q, u)
                try:
                    lowered.compile()
                    err = ""
                except Exception as e:  # noqa: BLE001 - XLA:CPU has no ragged all-to-all
                    err = str(e)[:300]
                res["ragged"] = {"auto_on_cpu": hook.keywords["a2a"],
                                 "lowered_ops": lowered.as_text().count("ragged_all_to_all"),
                                 "compile_error": err}

    # the tiny model's loss and gradients (every layer kind) with the step's hooks installed
    mcfg = nh.preset("tiny", pattern="ME*-", vocab_size=128, n_group=1, topk_group=1)
    specs = nh.param_specs(mcfg)
    rng = np.random.default_rng(0)
    bsz, t = 8, 16
    batch = rl.SFTBatch(jnp.asarray(rng.integers(3, mcfg.vocab_size, (bsz, t)), jnp.int32),
                        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (bsz, t)),
                        jnp.ones((bsz, t), jnp.int32), jnp.ones((bsz, t), jnp.float32))
    params = jax.jit(lambda k: nh.init_params(mcfg, k, jnp.float32))(jax.random.key(0))

    def model_loss(master, b):
        lp, _ = rl.token_logprobs(rl.compute_params(master, specs, jnp.float32), b, mcfg)
        return -jnp.sum(lp * b.loss_mask) / jnp.sum(b.loss_mask)

    ref_l, ref_g = jax.jit(jax.value_and_grad(model_loss))(params, batch)
    res["model"] = {}
    for name in ("fsdp_tensor", "data_fsdp"):
        mesh = sharding.make_mesh(meshes[name])
        hook = make_moe_dispatch(mesh)
        f = jax.jit(with_hook(jax.value_and_grad(model_loss), mesh, hook),
                    in_shardings=(sharding.param_shardings(mcfg, mesh), sharding.batch_shardings(batch, mesh)))
        l, g = f(jax.device_put(params, sharding.param_shardings(mcfg, mesh)), sharding.shard_batch(batch, mesh))
        res["model"][name] = {"loss": rel(l, ref_l), "grads": max_rel(g, ref_g), "hook": hook.func.__name__}

    # mesh.a2a through the runner's mesh build: ragged is refused on CPU before anything runs
    try:
        B.build_mesh(C.apply_overrides(C.Config(), ["mesh.fsdp=4", "mesh.expert=2", "mesh.a2a=ragged"]))
        res["runner_ragged_error"] = ""
    except B.ConfigError as e:
        res["runner_ragged_error"] = str(e)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
