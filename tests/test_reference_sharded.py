"""The KL reference's log-probs (``Stage._ref_logp``) run as the train step does: micro-batched
(``optimizer.grad_accum`` strided micro-batches, ``sharding.reference_logprobs``) and, with a
mesh, compiled for it (``sharding.compile_reference_logprobs``). Checked against
``token_logprobs`` on the whole batch on one device (an independent path: no micro-batches, no
mesh), fp32 within 1e-5 relative to the largest magnitude: on one device with grad_accum 2,
and through ``Stage._ref_logp`` on 4 simulated devices (fsdp 2 x context 2, grad_accum 2) in a
child process, the result laid out on the batch's sharding."""

from __future__ import annotations

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

TOL = 1e-5


def _batch(cfg, rows=4, T=16, seed=0):
    from cascade_jax import rl

    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (rows, T)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 8 + [0] * 2], rows, 0), jnp.int32)
    pos = jnp.asarray(np.repeat([list(range(6)) + list(range(8)) + [0, 0]], rows, 0), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (rows, T)) * (np.asarray(seg) > 0), jnp.float32)
    n = jnp.zeros((rows,), jnp.int32)
    return rl.RLBatch(tokens=tokens, positions=pos, segment_ids=seg, loss_mask=mask,
                      rollout_logp=jnp.zeros((rows, T)), rewards=jnp.zeros((rows,)), group_ids=n,
                      finish_reason=n, domain_ids=n)


def _expected(params, batch, cfg):
    from cascade_jax import rl

    view = rl.SFTBatch(tokens=batch.tokens, positions=batch.positions,
                       segment_ids=batch.segment_ids, loss_mask=batch.loss_mask)
    return np.asarray(rl.token_logprobs(params, view, cfg)[0] * batch.loss_mask)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-12))


def _host(cfg, params, mesh, train_step, accum):
    return types.SimpleNamespace(
        _ref_fn=None, ref_params=params, config=types.SimpleNamespace(
            optimizer=types.SimpleNamespace(grad_accum=accum), mesh=types.SimpleNamespace(a2a="auto")),
        parts=types.SimpleNamespace(model_cfg=cfg, mesh=mesh, train_step=train_step))


def test_reference_micro_batched_equals_whole_batch(tiny_cfg, tiny_params):
    from cascade_jax.runner.stage import Stage

    cfg = tiny_cfg(vocab_size=64, pattern="M*E")
    params = tiny_params(cfg)
    batch = _batch(cfg)
    got = Stage._ref_logp(_host(cfg, params, None, None, 2), batch).ref_logp
    want = _expected(params, batch, cfg)
    assert np.abs(want).max() > 0.5
    assert _rel(got, want) < TOL


def _child():
    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.runner.build import ShardedStep
    from cascade_jax.runner.stage import Stage
    from models import nemotron_h as nh

    cfg = nh.preset("tiny", vocab_size=64, pattern="M*E")
    params = nh.init_params(cfg, jax.random.key(0), dtype=jnp.float32)
    batch = _batch(cfg)
    want = _expected(params, batch, cfg)
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, context=2))
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    host = _host(cfg, sharded, mesh, ShardedStep("grpo", mesh, cfg, {}), 2)
    got = Stage._ref_logp(host, batch).ref_logp
    spec = tuple(got.sharding.spec)
    print(json.dumps({"rel": _rel(got, want), "spec": [list(s) if isinstance(s, tuple) else s for s in spec],
                      "max": float(np.abs(want).max())}))


def test_reference_on_a_mesh_equals_one_device():
    from tests.multidevice import run_on_cpu_devices

    out = run_on_cpu_devices(__file__, "child", devices=4)
    assert out["max"] > 0.5
    assert out["rel"] < TOL, out
    assert out["spec"][:2] == ["fsdp", "context"], out  # rows over fsdp, tokens over context


if __name__ == "__main__" and sys.argv[1:] == ["child"]:
    _child()
