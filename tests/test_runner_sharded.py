"""The stage runner on a mesh: ``run_stage`` with ``mesh`` = data 2 x fsdp 2 x tensor 2 on 8
simulated CPU devices (a subprocess, so the device count does not leak into other tests)
against the same stage on one device, tiny model, fp32 compute, 2 optimizer steps:

* the sharded run builds the mesh from the config's ``mesh`` section, creates the parameters
  in their shards, runs the step compiled by ``sharding.compile_train_step`` (the runner's
  ``ShardedStep``) with the state laid out by the rules table (some leaves split over fsdp /
  tensor) and donated (the input state's buffers are deleted after each step);
* its final parameters (the Hub export) equal the single-device run's within 2e-6 absolute
  (lr 2e-3, Adam eps 1e-4 — see ``ADAM_EPS``: the two steps move them by up to ~4e-3;
  summation order differs across devices and the sharded init differs by at most 1 ulp, see
  tests/test_sharding_steps.py), and the logged loss and gradient norm of each step within 1e-4
  of max(1, |single-device value|);
* provenance records the mesh; a batch that does not split over the batch axes is a config
  error naming the field and the axes (before anything is written).

SFT (parameters created in their shards) runs in CI; MOPD (rollouts by the embedded engine on
the sharded compute copy with the same seeds, the student loaded from a checkpoint slice by
slice) is ``slow``. (GRPO shares MOPD's path; from a random tiny model every reward is equal,
so its gradient is zero and the comparison would be vacuous.)
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from tests.multidevice import run_on_cpu_devices

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARAM_TOL = 2e-6
LOSS_TOL = 1e-4
#: Adam's update g / (sqrt(v) + eps) is about sign(g) for |g| >> eps, so a gradient element
#: near zero whose sign the summation order flips moves by 2 lr (seen: 6 of 32768 embedding
#: entries off by 3e-3 with eps 1e-8). With eps = 1e-4 the update is Lipschitz in g (constant
#: lr / eps), so the parameter tolerance bounds the gradient difference, while every element
#: with |g| >> 1e-4 still moves by ~lr.
ADAM_EPS = 1e-4
MESH = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1, "context": 1}


def _config(path: pathlib.Path, objective: str, run_dir: pathlib.Path, mesh: dict,
            **sections) -> pathlib.Path:
    sys.path.insert(0, str(ROOT))
    from tests.runner_support import write_config

    sections.setdefault("optimizer", {"lr": 2e-3, "grad_clip": 1.0, "eps": ADAM_EPS})
    return write_config(path, objective, run_dir, steps=2, mesh=mesh, **sections)


def _run(config_path: pathlib.Path, devices: int) -> dict:
    return run_on_cpu_devices(__file__, config_path, devices=devices, timeout=1200)


def _params(run_dir) -> dict:
    from models import nemotron_h as nh

    _, p = nh.load_checkpoint(pathlib.Path(run_dir) / "hub")
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}


def _losses(run_dir) -> list:
    """``(loss, grad_norm)`` of every logged step."""
    lines = [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(m["loss"], m["grad_norm"]) for m in lines if "loss" in m]


def _compare(tmp_path, objective, **sections):
    single = _run(_config(tmp_path / "one.json", objective, tmp_path / "one", {}, **sections), 1)
    sharded = _run(_config(tmp_path / "mesh.json", objective, tmp_path / "mesh", MESH, **sections), 8)
    assert single["mesh"] is None and single["sharded_calls"] == 0
    assert sharded["mesh"] == MESH, sharded["mesh"]
    assert sharded["sharded_calls"] == 2 and sharded["compiles"] == 1, sharded
    assert sharded["donated"], "the input state of a sharded step was not donated"
    assert sharded["split_leaves"] > 0 and sharded["devices_per_leaf"] == 8, sharded
    assert "(data=2 x fsdp=2 x expert=1 = 4 devices)" in (sharded["bad_batch_error"] or ""), sharded
    a, b = _params(tmp_path / "one"), _params(tmp_path / "mesh")
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < PARAM_TOL, worst
    assert min(single["moved"], sharded["moved"]) > 100 * PARAM_TOL, (single, sharded)  # they moved
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
    assert len(la) == len(lb) == 2
    for x, y in zip(np.ravel(la), np.ravel(lb)):
        assert abs(x - y) <= LOSS_TOL * max(1.0, abs(x)), (la, lb)
    return worst


def test_sft_stage_on_mesh_equals_single_device(tmp_path):
    _compare(tmp_path, "sft", data={"batch_rows": 4, "seq_len": 128})  # one row per batch device


def _tiny_checkpoint(path: pathlib.Path, seed: int) -> str:
    """A randomly initialised tiny model (fp32) with the tiny tokenizer, as a Hub checkpoint."""
    import jax

    from cascade_jax.data.tokenizer import write_tiny_tokenizer
    from models import nemotron_h as nh

    cfg = nh.preset("tiny")
    nh.save_checkpoint(nh.init_params(cfg, jax.random.key(seed), jax.numpy.float32), cfg, str(path))
    write_tiny_tokenizer(path)
    return str(path)


@pytest.mark.slow
def test_mopd_stage_on_mesh_equals_single_device(tmp_path):
    """MOPD (an RL stage: rollouts by the embedded engine on the sharded compute copy, teacher
    log-probs, reverse-KL loss, which moves even a random student) with the student read from a
    checkpoint, each device loading its slices (``sharding.load_params``)."""
    student = _tiny_checkpoint(tmp_path / "student", 0)
    teacher = _tiny_checkpoint(tmp_path / "teacher", 1)
    _compare(tmp_path, "mopd", model={"preset": "tiny", "checkpoint": student, "dtype": "float32"},
             stage={"teachers": {"structured_output": teacher}})


def _child(config_path: str) -> None:
    """Run the stage of ``config_path`` here; print what the parent checks as one JSON line."""
    import jax

    from cascade_jax import config as C
    from cascade_jax.runner import build as B
    from cascade_jax.runner import run_stage

    seen = {"sharded_calls": 0, "donated": True, "split_leaves": 0, "devices_per_leaf": 0}
    call = B.ShardedStep.__call__

    def spy(self, state, batch):
        out = call(self, state, batch)
        seen["sharded_calls"] += 1
        seen["compiles"] = len(self._compiled)
        seen["donated"] &= all(x.is_deleted() for x in jax.tree.leaves(state.params))
        leaves = jax.tree.leaves(out[0].params)
        seen["split_leaves"] = sum(not x.sharding.is_fully_replicated for x in leaves)
        seen["devices_per_leaf"] = min(len(x.sharding.device_set) for x in leaves)
        return out

    B.ShardedStep.__call__ = spy
    cfg = C.load(config_path)
    from models import nemotron_h as nh
    _, init = B.build_model(cfg)  # the starting parameters (one device), to show the steps moved them
    run_stage(cfg, progress=False, log=lambda m: None)
    _, final = nh.load_checkpoint(pathlib.Path(cfg.run.out_dir) / "hub")
    moved = max(float(jax.numpy.max(jax.numpy.abs(a - b)))
                for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(final)))
    prov = json.loads((pathlib.Path(cfg.run.out_dir) / "provenance.json").read_text())
    bad = None
    if jax.device_count() > 1:  # a batch that does not split over the mesh's batch axes
        odd = C.replace_path(cfg, "data.batch_rows", 3)
        if cfg.stage.objective != "sft":  # 3 prompts x 3 samples
            odd = C.replace_path(C.replace_path(cfg, "data.batch_prompts", 3), "rollout.sampling.n_samples", 3)
        try:
            B.build_mesh(odd)
        except B.ConfigError as e:
            bad = str(e)
    print(json.dumps({**seen, "mesh": prov["mesh"], "moved": moved, "bad_batch_error": bad}))


if __name__ == "__main__":
    _child(sys.argv[1])
