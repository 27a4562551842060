"""The kernel benchmark runs on CPU with ``--smoke`` shapes and emits well-formed JSON rows
(timed rows have positive times; unavailable implementations are skipped with a reason)."""

import json

import pytest

from kernels import benchmark


def _check(doc, kernels):
    json.dumps(doc)
    assert doc["smoke"] and doc["interpret"] and doc["device"].startswith("cpu")
    assert {r["kernel"] for r in doc["rows"]} == set(kernels)
    for r in doc["rows"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["tflops"] > 0
        else:
            assert r["reason"]
    impls = {(r["kernel"], r["impl"]) for r in doc["rows"]}
    for k in kernels:
        assert {(k, "pallas"), (k, "xla"), (k, "dense")} <= impls


def test_benchmark_smoke_attention_ssd():
    doc = benchmark.main(["--smoke", "--iters", "1", "--only", "attention,ssd"])
    _check(doc, ["attention", "ssd"])
    assert any(r["impl"] == "cudnn" and r["status"] == "skipped" for r in doc["rows"])


@pytest.mark.slow
def test_benchmark_smoke_all():
    _check(benchmark.main(["--smoke", "--iters", "1"]), ["gmm", "attention", "ssd"])
