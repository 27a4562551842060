"""Multi-host: two processes x 4 CPU devices joined by ``jax.distributed`` over loopback
(``cascade_jax.sharding.initialize_distributed`` with an explicit coordinator), an 8-device
data x fsdp (2 x 4) mesh spanning both, each process loading only its own half of the batch
(``global_batch``), 3 sharded GRPO steps; against one process on one device running the plain
step. Parameters within 1e-5 absolute (lr 1e-3), loss within 1e-5 relative. Processes are
killed in teardown even on failure."""

import json
import os
import sys

import pytest

from cascade_jax.rollout.launcher import free_port
from tests.multidevice import child_env, run_on_cpu_devices
from tests.runner_support import Child

PARAM_TOL = 1e-5
LOSS_TOL = 1e-5


@pytest.mark.slow
def test_two_processes_match_single_device():
    port = free_port()
    procs = []
    try:  # both drained as they write (one blocked on a full pipe would stall the other's collectives)
        for i in range(2):
            procs.append(Child([sys.executable, os.path.abspath(__file__), "worker", str(i), str(port)],
                               child_env(4)))
        codes = [p.wait(900) for p in procs]
    finally:
        for p in procs:
            p.stop()
    for p, code in zip(procs, codes):
        assert code == 0, p.text(4000)
    r = run_on_cpu_devices(__file__, "reference", devices=1)
    w0, w1 = (json.loads([l for l in p.out if l.strip()][-1]) for p in procs)
    assert w0["process_count"] == 2 and w0["devices"] == 8 and w0["local_devices"] == 4
    assert w0["primary"] and not w1["primary"]
    for w in (w0, w1):  # both processes hold the same (all-gathered) result
        assert abs(w["loss"] - r["loss"]) <= LOSS_TOL * max(1.0, abs(r["loss"]))
        assert max(abs(a - b) for a, b in zip(w["params"], r["params"])) < PARAM_TOL


def _setup():
    import jax.numpy as jnp
    import numpy as np

    import cascade_jax.rl as rl
    from cascade_jax.config import OptimizerConfig
    from models import nemotron_h as nh

    cfg = nh.preset("tiny", pattern="ME*-", vocab_size=128, n_group=1, topk_group=1)
    B, T = 8, 16
    rng = np.random.default_rng(0)
    mask = (np.arange(T)[None] >= 4).astype(np.float32) * np.ones((B, 1), np.float32)
    batch = rl.RLBatch(
        tokens=rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32),
        positions=np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
        segment_ids=np.ones((B, T), np.int32), loss_mask=mask,
        rollout_logp=(-rng.uniform(1, 6, (B, T)) * mask).astype(np.float32),
        rewards=rng.integers(0, 2, B).astype(np.float32), group_ids=(np.arange(B) // 4).astype(np.int32),
        finish_reason=np.zeros((B,), np.int32), domain_ids=np.zeros((B,), np.int32))
    opt = OptimizerConfig(lr=1e-3)
    static = dict(model_cfg=cfg, settings=rl.GRPOSettings(), compute_dtype=jnp.float32)
    return cfg, batch, opt, static


def _summary(params, loss):
    import jax
    import numpy as np
    flat = np.concatenate([np.asarray(x, np.float64).ravel()[:64] for x in jax.tree.leaves(params)])
    return {"loss": float(loss), "params": flat.tolist()}


def reference():
    import jax
    import jax.numpy as jnp

    import cascade_jax.rl as rl
    from models import nemotron_h as nh

    cfg, batch, opt, static = _setup()
    init = jax.jit(lambda k: nh.init_params(cfg, k, jnp.float32))
    state = rl.TrainState.from_config(init(jax.random.key(0)), opt, nh.param_specs(cfg))
    step = rl.make_train_step("grpo", **static)
    batch = jax.tree.map(jnp.asarray, batch)
    for _ in range(3):
        state, m = step(state, batch)
    print(json.dumps(_summary(state.params, m["loss"])))


def worker(pid: int, port: int):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig

    assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    cfg, batch, opt, static = _setup()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    state = sharding.init_train_state(cfg, opt, jax.random.key(0), mesh)
    half = batch.tokens.shape[0] // 2
    local = jax.tree.map(lambda x: x[pid * half:(pid + 1) * half] if x.ndim == 2 else x, batch)
    gbatch = sharding.global_batch(local, mesh)
    static = dict(static)
    model_cfg = static.pop("model_cfg")
    step = sharding.compile_train_step("grpo", mesh=mesh, state=state, batch=gbatch,
                                       model_cfg=model_cfg, **static)
    for _ in range(3):
        state, m = step(state, gbatch)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    out = _summary(params, np.asarray(m["loss"]))
    out.update(process_count=jax.process_count(), devices=jax.device_count(),
               local_devices=jax.local_device_count(), primary=sharding.is_primary())
    print(json.dumps(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        reference()
