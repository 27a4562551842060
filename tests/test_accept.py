"""The acceptance harness runs end to end on CPU (``launch/accept.py --smoke`` as a subprocess):
every section is present and ok, every kernel passes its correctness check, every speed row of
ours carries its baselines with a ratio where the baseline ran, the zero-mismatch sampler is bit
for bit, and the markdown table is written. Also the pure helpers (peak table, slice choice)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from launch import accept
from tests.runner_support import cache_dir

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict:
    """A CPU child that caches every compiled program (``--cache-dir``: the session's cache, so
    the fault runs below reuse the smoke run's programs)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accept")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "accept.py"), "--smoke", "--out-dir", str(out),
                           "--budget", "900", "--cache-dir", str(cache_dir(tmp_path_factory))],
                          env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "accept.json").read_text()), (out / "accept.md").read_text()


def test_every_section_ran(smoke):
    doc, md = smoke
    assert doc["smoke"] and doc["restarts"] == []
    for name in accept.SECTIONS:
        sec = doc["sections"][name]
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["seconds"] > 0
        assert name in md
    # one line per compass goal; no verdict from interpreted kernels on CPU
    assert len(doc["goals"]) == len(accept.GOALS) + 1 and all(g["met"] is None for g in doc["goals"])
    assert "| goal | best this run | met |" in md and "| figure | value | baseline |" in md


def test_correctness_passed(smoke):
    c = smoke[0]["sections"]["correctness"]
    kinds = {r["case"].split()[0] + " " + r["case"].split()[1] for r in c["cases"]}
    assert {"gmm gpu", "gmm tpu", "gmm mosaic"} <= kinds  # both GPU variants and the TPU layout
    assert any("segment ids" in r["case"] for r in c["cases"] if r["case"].startswith("attention"))
    assert any("initial state" in r["case"] for r in c["cases"] if r["case"].startswith("ssd"))
    assert c["all_passed"] and c["passed"] == c["total"] == len(c["cases"])
    for r in c["cases"]:
        assert len(r["checks"]) >= 3 and all(x["err"] <= accept.TOL for x in r["checks"]), r


def test_speed_rows_have_baselines_and_ratios(smoke):
    doc = smoke[0]
    for kernel in ("gmm", "attention", "ssd"):
        rows = doc["sections"][f"speed_{kernel}"]["rows"]
        assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
        for r in rows:
            assert r["status"] == "ok" and r["tflops"] > 0, r
            assert set(r["baselines"]) == set(accept.BASELINES[kernel]), r
            ran = {b: v for b, v in r["baselines"].items() if v.get("ratio") is not None}
            assert ran, r  # at least one baseline measured in the same run
            for v in ran.values():
                assert v["ratio"] == pytest.approx(r["tflops"] / v["tflops"])
            for b, v in r["baselines"].items():
                if v.get("ratio") is None:
                    assert v["status"] == "skipped" and v["reason"], (b, v)  # e.g. cuDNN or tokamax on CPU
    assert all(r["baselines"]["ragged_dot"]["ratio"] for r in doc["sections"]["speed_gmm"]["rows"])


def test_train_engine_and_mismatch(smoke):
    s = smoke[0]["sections"]
    t = s["train"]
    assert t["finite"] and t["tokens_per_s"] > 0 and t["flops_traced"] > 0
    assert set(t["slice"]) >= {"M", "E", "*"}
    assert t["planner"]["status"] == "ok" and t["planner_total_bytes"] > 0
    rows = s["engine"]["rows"]
    assert rows and all(r["status"] == "ok" and r["decode_tokens_per_s"] > 0 and r["prefill_ratio"] > 0 for r in rows)
    m = s["mismatch"]
    assert m["tokens"] > 0 and m["exact"]["bitwise_equal"] and m["exact"]["max_abs"] == 0.0
    assert m["engine_default"]["tokens"] == m["tokens"]


def test_peak_table_and_slice_choice():
    assert accept.device_peak("NVIDIA H100 80GB HBM3")[:2] == (989.4e12, 3.35e12)
    assert accept.device_peak("NVIDIA H200")[1] == 4.8e12
    assert accept.device_peak("TPU v5 lite")[0] == 197e12 and accept.device_peak("TPU v6 lite")[0] == 918e12
    assert accept.device_peak("TPU v5p")[0] == 459e12
    assert accept.device_peak("cpu") == (None, None, None)
    assert accept.pick_slice("nano-30b-a3b", 80 * 2**30, False) == "M*E"      # 2.1B params: one MoE layer
    assert accept.pick_slice("nano-30b-a3b", 110 * 2**30, False) == "MEM*E"   # 3.4B params: two MoE layers
    assert accept.pick_slice("nano-30b-a3b", 141 * 2**30, False) == "MEM*EME"  # 4.7B params: three
    assert accept.pick_slice("nano-30b-a3b", None, False) == "M*E"


def test_bad_arguments_name_the_field(capsys):
    with pytest.raises(SystemExit, match="--only: unknown section"):
        accept.main(["--smoke", "--only", "platform,nope"])
    with pytest.raises(SystemExit, match="--slice"):
        accept.main(["--smoke", "--slice", "MM"])


def test_a_crashed_or_failing_section_is_recorded_and_the_run_goes_on(tmp_path, tmp_path_factory):
    env = _env()
    cmd = [sys.executable, str(ROOT / "launch" / "accept.py"), "--smoke", "--only", "platform,speed_ssd",
           "--budget", "600", "--cache-dir", str(cache_dir(tmp_path_factory))]
    crash = subprocess.run(cmd + ["--out-dir", str(tmp_path / "a")], env={**env, "CASCADE_ACCEPT_FAULT": "crash:platform"},
                           capture_output=True, text=True, timeout=900)
    raised = subprocess.run(cmd + ["--out-dir", str(tmp_path / "b")], env={**env, "CASCADE_ACCEPT_FAULT": "raise:platform"},
                            capture_output=True, text=True, timeout=900)
    assert crash.returncode == 0 and raised.returncode == 0, (crash.stderr[-2000:], raised.stderr[-2000:])
    a = json.loads((tmp_path / "a" / "accept.json").read_text())
    b = json.loads((tmp_path / "b" / "accept.json").read_text())
    assert a["sections"]["platform"]["status"] == "crashed" and "exit 3" in a["sections"]["platform"]["error"]
    assert a["restarts"] == ["platform"] and a["sections"]["speed_ssd"]["status"] == "ok"
    assert b["sections"]["platform"] == {**b["sections"]["platform"], "status": "error",
                                         "error": "RuntimeError: injected fault in platform"}
    assert b["restarts"] == [] and b["sections"]["speed_ssd"]["status"] == "ok"
