"""Benchmarks of the served rollout path; each prints one JSON object with its same-run baseline.

    python launch/bench_serve.py load [--clients 64 --seconds 60]
        One tiny JAX rollout server (``launch/serve.py``), ``--clients`` concurrent HTTP clients
        sending ``/generate`` bodies (one sample each, prompt 4-16 tokens, 8-32 new tokens) for
        ``--seconds``: requests, failures, p50/p99 latency, generated tokens/s. Baseline: the same
        engine settings in process (``JaxEngine.generate`` on the same workload, no HTTP), measured
        after the server stopped; ``ratio_vs_in_process`` = served tokens/s / in-process tokens/s.

    python launch/bench_serve.py disk-sync [--gb 0.5 --repeats 5 --layout auto]
        A NemotronH config of ``--gb`` GB in bf16 behind one server; ``DiskWeightSync.update``
        (atomic versioned export + ``/update_weights_from_disk`` + verification), in the params
        layout (``--layout auto`` with our server; ``hub`` for the SGLang-readable layout).
        Baseline: this machine's sequential write (fsync) + read of the same bytes (the pushed
        weights' own) in the same directory, measured after each sync; ``ratio`` = baseline
        seconds / (export + server load seconds), medians over ``--repeats``; goal >= 0.7. Each
        run also has the server's own read / swap seconds and host-slab reuse (its log).

    python launch/bench_serve.py startup [--serve-flags ...]
        The tiny server's launch -> ``ready`` line -> first ``/generate`` reply, with an empty
        persistent compilation cache and again with the filled one (goal: first answer < 30 s on
        2 cores). Baseline: a fresh interpreter importing jax and running one op.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

LOAD_FLAGS = ["--num-slots", "16", "--max-len", "64", "--prompt-buckets", "16", "--prefill-sizes", "1,4,16",
              "--steps-per-call", "4", "--warmup"]  # timed: compile before serving


def _workload(rng, n):
    """``n`` (prompt, max_new_tokens) pairs: prompts of 4-16 ids, 8-32 new tokens."""
    return [(tuple(int(t) for t in rng.integers(0, 512, rng.integers(4, 17))), int(rng.integers(8, 33)))
            for _ in range(n)]


async def _clients(url: str, n_clients: int, seconds: float, seed: int) -> dict:
    """``n_clients`` coroutines sending one body at a time. Load is generated with aiohttp: with
    64 connections httpx's pool costs the client process more CPU than the server uses here."""
    import aiohttp
    from cascade_jax.rollout import SamplingParams
    from cascade_jax.rollout.sglang_api import encode_generate

    lat, toks, failures, errors = [], [], 0, []
    stop_at = time.perf_counter() + seconds

    async def one(i, http):
        nonlocal failures
        rng = np.random.default_rng(seed + i)
        k = 0
        while time.perf_counter() < stop_at:
            prompt, new = _workload(rng, 1)[0]
            body = encode_generate(prompt, SamplingParams(max_new_tokens=new, seed=int(rng.integers(2 ** 31))),
                                   rid=f"c{i}-{k}")
            k += 1
            t0 = time.perf_counter()
            try:
                async with http.post(url + "/generate", json=body) as r:
                    reply = await r.json() if r.status == 200 else await r.text()
                ok = r.status == 200 and reply["meta_info"]["finish_reason"]["type"] != "abort"
            except Exception as e:  # noqa: BLE001 - counted as a failure
                ok, reply = False, e
            if ok:
                lat.append(time.perf_counter() - t0)
                toks.append(reply["meta_info"]["completion_tokens"])
            else:
                failures += 1
                errors.append(str(reply)[:200])

    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n_clients + 4), timeout=timeout) as http:
        await asyncio.gather(*(one(i, http) for i in range(n_clients)))
    wall = time.perf_counter() - t0
    lat_ms = np.asarray(lat) * 1e3
    return {"requests": len(lat) + failures, "failed": failures, "first_errors": errors[:3],
            "p50_latency_ms": float(np.percentile(lat_ms, 50)) if lat else None,
            "p99_latency_ms": float(np.percentile(lat_ms, 99)) if lat else None,
            "tokens_per_s": float(sum(toks) / wall), "requests_per_s": float(len(lat) / wall), "wall_s": wall}


def bench_load(args) -> dict:
    import jax
    from cascade_jax.rollout import JaxEngine, Request, SamplingParams
    from cascade_jax.rollout.launcher import Launcher, serve_command
    from models import nemotron_h as nh

    cfg = nh.preset("tiny")
    params = nh.init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        nh.save_checkpoint(params, cfg, Path(tmp) / "ckpt")
        launcher = Launcher(serve_command(extra=LOAD_FLAGS), n=1, checkpoint=str(Path(tmp) / "ckpt"),
                            log_dir=tmp, health_timeout_s=600, restart=False)
        launcher.start()
        try:
            served = asyncio.run(_clients(launcher.urls[0], args.clients, args.seconds, args.seed))
        finally:
            launcher.stop()
    # baseline: the same engine settings in this process, on the same request distribution
    eng = JaxEngine(cfg, params, num_slots=16, max_len=64, prompt_buckets=(16,), prefill_sizes=(1, 4, 16),
                    steps_per_call=4)
    eng.warmup()
    rng = np.random.default_rng(args.seed)
    reqs = [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=m, seed=i))
            for i, (p, m) in enumerate(_workload(rng, args.baseline_requests))]
    eng.generate(reqs[:16])  # warm
    t0 = time.perf_counter()
    out = eng.generate(reqs)
    wall = time.perf_counter() - t0
    base_tps = sum(len(s.response_ids) for s in out.samples()) / wall
    return {"bench": "serve_load", "clients": args.clients, "seconds": args.seconds, **served,
            "in_process_tokens_per_s": base_tps,
            "ratio_vs_in_process": served["tokens_per_s"] / base_tps}


def _sequential_write_read(path: Path, arrays, buf: np.ndarray) -> tuple[float, float]:
    """dd-like seconds to write the bytes of ``arrays`` (the pushed weights' own bytes, one after
    another, unbuffered, then fsync) to ``path`` and to read them back in ``buf``-sized chunks."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for a in arrays:
            view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            while view:
                view = view[f.write(view):]
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(memoryview(buf)):
            pass
    t2 = time.perf_counter()
    path.unlink()
    return t1 - t0, t2 - t1


def _server_update_log(log: Path) -> dict:
    """The server's own split of its last disk update (its ``update_weights_from_disk`` log line):
    read and swap seconds, host slabs reused / allocated so far, the collection before the read."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "update_weights_from_disk " in ln]
    m = re.search(r"read ([\d.]+) s, swap ([\d.]+) s \(host slabs reused (\d+), allocated (\d+); "
                  r"gc generation (\d) ([\d.]+) s\)", lines[-1])
    return {"server_read_s": float(m[1]), "server_swap_s": float(m[2]), "slabs_reused": int(m[3]),
            "slabs_allocated": int(m[4]), "server_gc_generation": int(m[5]), "server_gc_s": float(m[6])}


def _sync_config(gb: float):
    """A 3-layer-kind NemotronH config of about ``gb`` GB in bf16 (the routed-expert count
    scales it; at least 4 experts)."""
    import jax
    from models import nemotron_h as nh
    from models.nemotron_h.params import param_specs

    base = dict(vocab_size=32000, hidden_size=2048, moe_intermediate_size=1024, intermediate_size=4096,
                moe_shared_expert_intermediate_size=2048, mamba_num_heads=32, mamba_head_dim=64,
                num_attention_heads=16, num_key_value_heads=4, head_dim=128)

    def nbytes(e):
        specs = param_specs(nh.preset("tiny", **base, n_routed_experts=e))
        return 2 * sum(int(np.prod(s.shape)) for s in jax.tree.leaves(specs, is_leaf=lambda x: hasattr(x, "fp32")))
    per_expert = (nbytes(8) - nbytes(4)) / 4
    experts = max(4, 2 * round((gb * 1e9 - nbytes(4)) / per_expert / 2) + 4)
    return nh.preset("tiny", **base, n_routed_experts=experts)


def bench_disk_sync(args) -> dict:
    """``--repeats`` syncs, each followed by the ``dd``-like baseline of the same byte count in
    the same directory (interleaved, so both see the same disk and CPU load); medians."""
    import jax
    import jax.numpy as jnp
    from cascade_jax.rollout.client import ServerClient
    from cascade_jax.rollout.launcher import Launcher, serve_command
    from cascade_jax.rollout.weight_sync import DiskWeightSync, write_version
    from models import nemotron_h as nh

    cfg = _sync_config(args.gb)
    params = jax.block_until_ready(nh.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-sync-", dir="."))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    chunk = np.zeros(64 << 20, np.uint8)  # the baseline's read buffer (touched, reused like dd's)
    try:
        ck0 = write_version(params, cfg, root / "initial", "0")
        launcher = Launcher(serve_command(extra=["--num-slots", "1", "--max-len", "32", "--prompt-buckets", "16",
                                                 "--prefill-sizes", "1", "--log-level", "info"]),
                            n=1, checkpoint=str(ck0), weight_version="0", log_dir=str(root), health_timeout_s=900,
                            restart=False)
        launcher.start()
        client = ServerClient(launcher.urls, timeout_s=900)
        try:
            sync = DiskWeightSync(client, cfg, root / "versions", keep=1, tol=2e-2, timeout_s=900,
                                  layout=args.layout)
            for k in range(1, args.repeats + 1):
                new = jax.block_until_ready(jax.tree.map(lambda x: (x * (1 + 0.01 * k)).astype(x.dtype), params))
                sync.update(new, str(k))
                t = sync.timings
                w, r = _sequential_write_read(root / "baseline.bin", [np.asarray(x) for x in jax.tree.leaves(new)],
                                              chunk)
                server = _server_update_log(launcher.log_path(launcher.ports[0]))
                runs.append({"export_s": t["write_s"], "server_load_s": t["load_s"], **server, "baseline_write_s": w,
                             "baseline_read_s": r, "ratio": (w + r) / (t["write_s"] + t["load_s"]),
                             "update_total_s_incl_pause_flush_verify": t["total_s"]})
        finally:
            client.close()
            launcher.stop()
    finally:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    gb = nbytes / 1e9
    med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    sync_s = med["export_s"] + med["server_load_s"]
    return {"bench": "disk_weight_sync", "layout": sync.layout, "checkpoint_gb": gb, "repeats": args.repeats,
            **{f"median_{k}": v for k, v in med.items()}, "sync_gb_per_s": gb / sync_s,
            "baseline_gb_per_s": gb / (med["baseline_write_s"] + med["baseline_read_s"]),
            "probe_max_abs_dlogp": sync.last_error, "goal_ratio": 0.7, "runs": runs,
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}


def _timed_python(code: str) -> float:
    """Wall seconds of a fresh ``python -c code`` (this interpreter, this repository first)."""
    import subprocess
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": _REPO})
    return time.perf_counter() - t0


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``): on a busy machine,
    a floor for what the same work takes on idle cores."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_answer(ckpt: str, cache_dir: str, extra: list) -> dict:
    """Launch ``launch/serve.py`` on ``ckpt`` and time launch -> ready line -> first ``/generate``
    reply (8 greedy tokens) -> a second one."""
    import subprocess
    import httpx
    from cascade_jax.rollout.launcher import free_port

    port = free_port()
    cmd = [sys.executable, os.path.join(_REPO, "launch", "serve.py"), "--checkpoint", ckpt, "--port", str(port),
           "--compilation-cache-dir", cache_dir, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": _REPO})
    try:
        ready_line = ""
        for line in proc.stdout:
            if line.startswith("ready:"):
                ready_line = line.strip()
                break
        t_ready = time.perf_counter() - t0
        body = {"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
        url = f"http://127.0.0.1:{port}/generate"
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        t_first = time.perf_counter() - t0
        cpu_first = _cpu_seconds(proc.pid)
        t1 = time.perf_counter()
        httpx.post(url, json=body, timeout=600).raise_for_status()
        return {"ready_s": t_ready, "first_generate_s": t_first, "server_cpu_s_to_first_generate": cpu_first,
                "second_generate_latency_s": time.perf_counter() - t1, "ready_line": ready_line}
    finally:
        proc.terminate()
        proc.wait(60)


def bench_startup(args) -> dict:
    """Time to the tiny server's first answer, with an empty and then a filled persistent
    compilation cache; baseline: a bare ``import jax`` + one op in a fresh interpreter."""
    import jax
    from models import nemotron_h as nh

    cfg = nh.preset("tiny")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        ck = os.path.join(tmp, "ckpt")
        nh.save_checkpoint(nh.init_params(cfg, jax.random.key(0)), cfg, ck)
        cache = os.path.join(tmp, "xla-cache")
        load0 = os.getloadavg()
        cold = _first_answer(ck, cache, args.serve_flags)
        warm = _first_answer(ck, cache, args.serve_flags)
    base = _timed_python("import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()")
    imports = _timed_python("import cascade_jax.rollout.server, uvicorn, fastapi")
    return {"bench": "serve_startup", "serve_flags": args.serve_flags, "cold_cache": cold, "warm_cache": warm,
            "baseline_import_jax_s": base, "import_server_modules_s": imports,
            "ratio_cold_first_answer_vs_import_jax": cold["first_generate_s"] / base,
            "ratio_warm_first_answer_vs_import_jax": warm["first_generate_s"] / base, "goal_first_answer_s": 30,
            "load_average_before": load0, "load_average_after": os.getloadavg(), "cpus": os.cpu_count()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    a = sub.add_parser("load")
    a.add_argument("--clients", type=int, default=64)
    a.add_argument("--seconds", type=float, default=60.0)
    a.add_argument("--baseline-requests", type=int, default=256)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("disk-sync")
    b.add_argument("--gb", type=float, default=0.5)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--layout", choices=["auto", "hub", "params"], default="auto",
                   help="auto: the params layout with launch/serve.py servers (what a trainer uses)")
    b.add_argument("--dir", default=None, help="where to write (default: a temporary directory here)")
    c = sub.add_parser("startup")
    c.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[],
                   help="extra launch/serve.py flags (default: none, the server's defaults)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = {"load": bench_load, "disk-sync": bench_disk_sync, "startup": bench_startup}[args.which](args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
