"""Sharded checkpoint load and init on 8 simulated CPU devices (a subprocess): a tiny Hub
checkpoint loaded with ``sharding.load_params`` onto an fsdp x tensor (4 x 2) mesh equals the
saved weights exactly, every leaf carrying the sharding its logical axes give; the state made
by ``init_train_state`` has Adam moments sharded like the params and a replicated step."""

import json
import sys

from tests.multidevice import run_on_cpu_devices


def test_load_params_sharded(tmp_path):
    res = run_on_cpu_devices(__file__, tmp_path / "ckpt")
    assert res["equal"] and res["shardings_match"] and res["state_shardings_match"], res
    assert res["split_leaves"] > 0 and res["experts_up_spec"] == [None, "fsdp", "tensor"]


def main(path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig, OptimizerConfig
    from models import nemotron_h as nh

    cfg = nh.preset("tiny")
    params = nh.init_params(cfg, jax.random.key(3), dtype=jnp.bfloat16)
    nh.save_checkpoint(params, cfg, path)
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    loaded_cfg, loaded = sharding.load_params(path, mesh)
    want = sharding.param_shardings(loaded_cfg, mesh)
    equal = all(bool((np.asarray(a.astype(jnp.float32)) == np.asarray(b.astype(jnp.float32))).all())
                for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    match = all(a.sharding.is_equivalent_to(s, a.ndim)
                for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    state = sharding.init_train_state(cfg, OptimizerConfig(), jax.random.key(0), mesh)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    state_match = (all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
                       zip(jax.tree.leaves(state.params), jax.tree.leaves(want)))
                   and len(moments) == 2 * len(jax.tree.leaves(want))
                   and all(m.sharding.is_equivalent_to(s, m.ndim) for m, s in
                           zip(moments, list(jax.tree.leaves(want)) * 2))
                   and state.step.sharding.is_fully_replicated)
    layer = next(i for i, k in enumerate(cfg.pattern) if k == "E")
    spec = loaded["layers"][layer]["mixer"]["experts_up"].sharding.spec
    print(json.dumps({"equal": equal, "shardings_match": match, "state_shardings_match": bool(state_match),
                      "split_leaves": sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(loaded)),
                      "experts_up_spec": list(spec) + [None] * (3 - len(spec))}))


if __name__ == "__main__":
    main(sys.argv[1])
