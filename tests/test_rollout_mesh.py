"""The rollout engine and ``launch/serve.py`` on a mesh (8 simulated CPU devices, a child
process: :mod:`tests.multidevice`), against the unsharded engine on one device.

Mesh ``tensor:2,expert:4`` on the tiny model (4 query / 2 KV heads, 8 Mamba heads in 2 groups,
8 routed experts): attention, Mamba and MLP widths split over ``tensor``, experts and slots over
``expert`` (expert-parallel MoE, padded all-to-all on CPU). fp32 weights.

* Mixed requests (prompt lengths 3..30, greedy and sampled with top-p / top-k, ``n`` = 1 and 2,
  budgets 5..14): every sample's tokens, finish reasons and recorded routed experts are equal
  to the unsharded engine's, and its log-probs within ``LOGP_TOL = 1e-6`` max |Δ log p|
  (tensor-parallel partial sums add in another order; measured 4.8e-7).
* Placement: every parameter leaf carries its ``NamedSharding`` from the rules table, the K/V
  cache is split (slots over ``expert``, KV heads over ``tensor``), so is the Mamba state; the
  cache keeps its shardings through the donated prefill / decode programs.
* Update: a host (numpy) copy of other weights lands on the same shardings (every leaf's
  ``.sharding`` checked), both engines then generate equal samples, which differ from the
  first weights' ones; weights already on the engine's shardings are taken without a copy; after
  ``release_memory`` / ``resume_memory`` weights and cache are back on their shardings and the
  first weights' samples come again.
* Bad meshes are :class:`~cascade_jax.sharding.ShardingError` naming the field: KV heads not
  divided, experts not divided, more devices than present, an unknown axis, a context axis,
  slots / prefill rows not split by the batch axes.
* ``launch/serve.py --mesh tensor:2,expert:4`` in a real subprocess answers ``/generate`` with
  the unsharded engine's tokens and log-probs (``LOGP_TOL``), then loads a disk update onto its
  shards and answers with the new weights' samples (``slow``: two compiles in a child); bad
  ``--mesh`` values end the start with exit code 2 and one ``error:`` line naming ``--mesh``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest

from cascade_jax.rollout import Request, SamplingParams
from cascade_jax.rollout.client import ServerClient
from cascade_jax.rollout.engine import JaxEngine
from cascade_jax.rollout.weight_sync import write_version
from models import nemotron_h as nh
from tests.multidevice import REPO, child_env, run_on_cpu_devices
from tests.serve_support import served

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

LOGP_TOL = 1e-6
MESH = "tensor:2,expert:4"
ENGINE = dict(num_slots=8, max_len=48, prompt_buckets=(32,), prefill_sizes=(8,), steps_per_call=4)
SERVE_FLAGS = ["--num-slots", "8", "--max-len", "48", "--prompt-buckets", "32", "--prefill-sizes", "8",
               "--steps-per-call", "4"]
# (prompt length, max_new_tokens, temperature, top_p, top_k, seed, n)
SPECS = [(3, 6, 0.0, 1.0, -1, None, 1), (11, 9, 1.0, 0.9, -1, 5, 2), (20, 5, 0.7, 1.0, 40, 9, 1),
         (7, 14, 0.0, 1.0, -1, None, 1), (30, 8, 1.0, 1.0, -1, 123, 2)]


def requests():
    rng = np.random.default_rng(0)
    return [Request(prompt_ids=tuple(int(t) for t in rng.integers(3, 500, size=L)),
                    sampling=SamplingParams(max_new_tokens=m, temperature=t, top_p=p, top_k=k, seed=s, n=n))
            for L, m, t, p, k, s, n in SPECS]


def params(seed: int):
    return nh.init_params(nh.preset("tiny"), jax.random.key(seed), dtype=np.float32)


def _compare(a, b) -> dict:
    """Two engines' samples: tokens / finish / experts equal, max |Δ log p|, token count."""
    sa, sb = a.samples(), b.samples()
    return {"tokens_equal": [x.response_ids.tolist() for x in sa] == [y.response_ids.tolist() for y in sb],
            "finish_equal": [x.finish_reason for x in sa] == [y.finish_reason for y in sb],
            "experts_equal": all(x.routed_experts is not None and np.array_equal(x.routed_experts, y.routed_experts)
                                 for x, y in zip(sa, sb)),
            "logp_diff": max(float(np.max(np.abs(x.logprobs - y.logprobs))) for x, y in zip(sa, sb)),
            "n_tokens": sum(len(x.response_ids) for x in sa), "n_samples": len(sa)}


@pytest.fixture(scope="module")
def child():
    return run_on_cpu_devices(__file__, timeout=1200)


def test_mesh_engine_matches_unsharded(child):
    for phase in ("initial", "updated"):
        r = child[phase]
        assert r["n_samples"] == sum(s[-1] for s in SPECS) and r["n_tokens"] > 30, r
        assert r["tokens_equal"] and r["finish_equal"] and r["experts_equal"], (phase, r)
        assert r["logp_diff"] <= LOGP_TOL, (phase, r)
    assert child["update_changed_tokens"] and child["update_changed_logps"], child


def test_mesh_engine_placement_and_update_keep_shardings(child):
    p = child["placement"]
    assert p["params_on_rules_shardings"] and p["n_params"] > 20, p
    assert p["n_split_params"] >= 10, p  # most weights are split over tensor or expert
    assert p["k_spec"] == str(jax.sharding.PartitionSpec("expert", None, "tensor")), p
    assert p["ssm_spec"] == str(jax.sharding.PartitionSpec("expert", "tensor")), p
    assert p["cache_kept_after_generate"] and p["devices"] == 8, p
    # what one device holds: the K/V and SSM states 1/8, the conv states 1/4 (slots only), the
    # weights under half (norms, conv and Mamba vectors replicated; the rest split 2 or 8 ways)
    (cache_dev, cache_all), (par_dev, par_all) = p["cache_bytes"], p["param_bytes"]
    assert cache_all / 8 <= cache_dev < cache_all / 4 and par_all / 8 < par_dev < par_all / 2, p
    u = child["update"]
    assert u["shardings_kept"] and u["cache_kept"], u
    assert u["no_copy_when_on_shardings"], u
    # back on the first weights (already sharded), then released and resumed: the first samples
    r = child["resumed"]
    assert r["shardings_kept"] and r["cache_kept"], r
    assert r["tokens_equal"] and r["experts_equal"] and r["logp_diff"] <= LOGP_TOL, r


def test_parse_mesh_names_the_bad_entry():
    from cascade_jax.config import ConfigError, MeshConfig
    from cascade_jax.sharding import ShardingError
    from cascade_jax.sharding.rollout import engine_mesh

    assert MeshConfig.from_text(" tensor:4, expert:2 ") == MeshConfig(tensor=4, expert=2, fsdp=1)
    for text, msg in (("tensor:4,tensor:2", "--mesh: axis 'tensor' given twice"),
                      ("tensor:x", "--mesh: size of 'tensor' must be an integer, got 'x'"),
                      ("expert:0", "--mesh: size of 'expert' must be >= 1, got 0"),
                      ("tensor=2", "--mesh: bad entry 'tensor=2'"), (",", "--mesh: empty mesh ','")):
        with pytest.raises(ConfigError) as e:
            MeshConfig.from_text(text)
        assert str(e.value).startswith(msg), (text, str(e.value))
        with pytest.raises(ShardingError) as e:  # the engine's mesh from text says the same
            engine_mesh(text, field="--mesh")
        assert str(e.value).startswith(msg), (text, str(e.value))
    with pytest.raises(ShardingError) as e:  # this process has fewer devices than the mesh asks for
        engine_mesh(f"tensor:{jax.device_count() + 1}")
    assert str(e.value) == (f"mesh: tensor:{jax.device_count() + 1} needs {jax.device_count() + 1} devices, "
                            f"only {jax.device_count()} present")


def test_mesh_errors_name_the_field(child):
    e = child["errors"]
    expect = {"kv_heads": "num_key_value_heads=2", "experts": "n_routed_experts=6",
              "too_many": "needs 16 devices, only 8 present", "unknown_axis": "bad entry 'tensr:2'",
              "context": "mesh.context", "slots": "num_slots: 6 slots", "prefill_rows": "prefill_sizes: 2 rows"}
    assert set(e) == set(expect)
    for name, text in expect.items():
        assert e[name]["type"] == "ShardingError" and text in e[name]["message"], (name, e[name])


def test_serve_bad_mesh_is_one_error_line_naming_the_flag(tmp_path):
    ck = write_version(params(0), nh.preset("tiny"), tmp_path, "0")
    for bad, text in (("tensor:4", "--mesh tensor:4: mesh axis 'tensor' (size 4) does not divide "
                                   "num_key_value_heads=2"),
                      ("tensor:16", "--mesh: tensor:16 needs 16 devices, only 8 present")):
        proc = subprocess.run([sys.executable, "-m", "launch.serve", "--checkpoint", str(ck), "--mesh", bad,
                               "--compilation-cache-dir", ""],
                              cwd=REPO, env=child_env(8), capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines and lines[-1].startswith(f"error: {text}"), proc.stderr


@pytest.mark.slow
def test_serve_with_mesh_answers_generate(tmp_path):
    cfg = nh.preset("tiny")
    p0, p1 = params(0), params(1)
    ck0, ck1 = write_version(p0, cfg, tmp_path, "0"), write_version(p1, cfg, tmp_path, "1")
    reqs = requests()
    eng = JaxEngine(cfg, p0, **ENGINE)
    ref0 = eng.generate(reqs)
    eng.update_weights(p1, "1")
    ref1 = eng.generate(reqs)

    flags = ["--mesh", MESH, "--compilation-cache-dir", "", *SERVE_FLAGS]
    with served(ck0, flags, log=tmp_path / "serve.log", env=child_env(8), timeout_s=600) as server:
        client = ServerClient([server.url], timeout_s=600)
        try:
            got0 = client.generate(reqs)
            r = httpx.post(server.url + "/update_weights_from_disk",
                           json={"model_path": str(ck1), "weight_version": "1"}, timeout=600)
            assert r.status_code == 200 and r.json()["success"], r.text
            got1 = client.generate(reqs)
        finally:
            client.close()
    for ref, got in ((ref0, got0), (ref1, got1)):
        sr, sg = ref.samples(), got.samples()
        assert [s.response_ids.tolist() for s in sr] == [s.response_ids.tolist() for s in sg]
        assert max(float(np.max(np.abs(a.logprobs - b.logprobs))) for a, b in zip(sr, sg)) <= LOGP_TOL
    assert {s.weight_version for s in got1.samples()} == {"1"}
    assert [s.response_ids.tolist() for s in got0.samples()] != [s.response_ids.tolist() for s in got1.samples()]


# ----------------------------------------------------------------------------------------------
# child process (8 simulated CPU devices)


def main():
    from cascade_jax.sharding import ShardingError, param_shardings
    from cascade_jax.sharding.rollout import cache_shardings

    assert jax.device_count() == 8, jax.devices()
    cfg = nh.preset("tiny")
    p0, p1 = params(0), params(1)
    reqs = requests()
    kw = dict(ENGINE, return_routed_experts=True)
    one, sh = JaxEngine(cfg, p0, **kw), JaxEngine(cfg, p0, mesh=MESH, **kw)
    out = {}

    expected = jax.tree.leaves(param_shardings(cfg, sh.mesh))
    leaves = jax.tree.leaves(sh.params())
    before = [x.sharding for x in leaves]
    cache_sh = cache_shardings(sh._cache, sh.mesh)
    k_sh = next(layer["k"] for layer in cache_sh if "k" in layer)
    ssm_sh = next(layer["ssm"] for layer in cache_sh if "ssm" in layer)
    r_one, r_sh = one.generate(reqs), sh.generate(reqs)
    out["initial"] = _compare(r_one, r_sh)
    cache_kept = lambda: [x.sharding for x in jax.tree.leaves(sh._cache)] == jax.tree.leaves(cache_sh)
    def per_device(tree):  # (bytes on the first device, bytes of the whole arrays)
        xs = jax.tree.leaves(tree)
        d0 = sh.mesh.devices.flat[0]
        return (sum(s.data.nbytes for x in xs for s in x.addressable_shards if s.device == d0),
                sum(x.nbytes for x in xs))

    out["placement"] = {
        "param_bytes": per_device(sh.params()), "cache_bytes": per_device(sh._cache),
        "params_on_rules_shardings": before == expected, "n_params": len(leaves),
        "n_split_params": sum(not s.is_fully_replicated for s in before),
        "k_spec": str(k_sh.spec), "ssm_spec": str(ssm_sh.spec), "devices": len(k_sh.device_set),
        "cache_kept_after_generate": cache_kept()}

    host = jax.tree.map(np.asarray, p1)  # a host copy: each device receives its slices
    one.update_weights(p1, "1")
    sh.update_weights(host, "1")
    after = [x.sharding for x in jax.tree.leaves(sh.params())]
    r_one1, r_sh1 = one.generate(reqs), sh.generate(reqs)
    out["updated"] = _compare(r_one1, r_sh1)
    out["update_changed_tokens"] = _compare(r_sh, r_sh1)["tokens_equal"] is False
    out["update_changed_logps"] = _compare(r_sh, r_sh1)["logp_diff"] > 1e-3
    placed = jax.device_put(p0, sh.param_shardings())
    sh.update_weights(placed, "2")
    out["update"] = {"shardings_kept": after == before, "cache_kept": cache_kept(),
                     "no_copy_when_on_shardings": all(a is b for a, b in zip(jax.tree.leaves(sh.params()),
                                                                            jax.tree.leaves(placed)))}
    del placed  # released below: the engine's weight buffers are deleted
    sh.release_memory()
    sh.resume_memory()
    out["resumed"] = {"shardings_kept": [x.sharding for x in jax.tree.leaves(sh.params())] == before,
                      "cache_kept": cache_kept(), **_compare(r_sh, sh.generate(reqs))}

    def error(fn):
        try:
            fn()
        except ShardingError as e:
            return {"type": "ShardingError", "message": str(e)}
        except Exception as e:  # reported, and the parent test fails on the type
            return {"type": type(e).__name__, "message": str(e)}
        return {"type": None, "message": ""}

    small = dict(num_slots=8, max_len=32)
    out["errors"] = {
        "kv_heads": error(lambda: JaxEngine(cfg, p0, mesh="tensor:4", **small)),
        "experts": error(lambda: JaxEngine(nh.preset("tiny", n_routed_experts=6), p0, mesh="expert:4", **small)),
        "too_many": error(lambda: JaxEngine(cfg, p0, mesh="tensor:16", **small)),
        "unknown_axis": error(lambda: JaxEngine(cfg, p0, mesh="tensr:2", **small)),
        "context": error(lambda: JaxEngine(cfg, p0, mesh="context:2", **small)),
        "slots": error(lambda: JaxEngine(cfg, p0, mesh="expert:4", num_slots=6, max_len=32)),
        "prefill_rows": error(lambda: JaxEngine(cfg, p0, mesh="expert:4", prefill_sizes=(2, 4), **small)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
