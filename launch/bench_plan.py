"""Benchmarks of the planner (``launch/plan.py``), one JSON object each.

``--mode=compile`` (default): compile time of the sharded train step with the layer scan vs the
unrolled layer loop::

    python launch/bench_plan.py --preset=nano-30b-a3b --mesh=fsdp:8 --seq-len=8192

Plans the same step twice in one process (``scan_layers`` on, then off = the baseline) and
prints both plans' compile and trace+lower seconds (wall and CPU: on a shared machine wall
time mostly measures the other processes) and the ratios ``loop / scan`` (higher is better), plus the per-device memory of each. The compile uses XLA's
full optimisation (``--fast-compile`` to use the planner's codegen-free setting instead).

``--mode=table``: the planner table (per-device parameter / optimizer / temporary bytes, fits
80 GB / 141 GB, FLOPs per step) at several device counts::

    python launch/bench_plan.py --mode=table --preset=nano-30b-a3b --meshes=fsdp:8,fsdp:16,fsdp:64

One ``launch/plan.py --json`` subprocess per mesh (each simulates its own device count); every
row also carries ``total_bytes_vs_first``, its per-device total over the first mesh's (the
baseline of the same run). ``--remat`` / ``--seq-len`` / ``--objective`` / ``--a2a`` are passed
through.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch.plan import model_config, parse_args, parse_mesh  # noqa: E402

GIB = 2**30
BUDGETS_GB = (80, 141)  # H100 / H200 HBM, as marketed (GB = 1e9 bytes)


def _extra_args(argv):
    """Split off this script's own flags (``--mode``, ``--meshes``, ``--fast-compile``)."""
    mode, meshes, fast, rest = "compile", None, False, []
    for a in argv:
        if a.startswith("--mode="):
            mode = a.split("=", 1)[1]
        elif a.startswith("--meshes="):
            meshes = a.split("=", 1)[1]
        elif a == "--fast-compile":
            fast = True
        else:
            rest.append(a)
    if mode not in ("compile", "table"):
        raise SystemExit(f"error: --mode: expected compile or table, got {mode!r}")
    return mode, meshes, fast, rest


def compile_mode(argv, fast: bool) -> dict:
    args = parse_args(argv)
    sizes = parse_mesh(args.mesh)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ["JAX_NUM_CPU_DEVICES"] = str(math.prod(sizes.values()))
    import jax

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.sharding.plan import plan
    mesh = sharding.make_mesh(MeshConfig(**sizes, a2a=args.a2a))
    out = {"mode": "compile", "preset": args.preset, "mesh": args.mesh, "seq_len": args.seq_len,
           "remat": args.remat or "preset", "fast_compile": fast}
    for name, scan in (("scan", True), ("loop", False)):
        cfg = model_config(args, scan_layers=scan)
        c0 = time.process_time()
        r = plan(cfg, mesh, objective=args.objective, seq_len=args.seq_len, batch=args.batch,
                 device_memory_gib=args.device_memory_gib, fast_compile=fast, a2a=args.a2a)
        out[name] = {k: r[k] for k in ("compile_seconds", "trace_lower_seconds", "compile_cpu_seconds",
                                       "trace_lower_cpu_seconds", "total_bytes", "temp_bytes",
                                       "flops_per_step")}
        out[name]["process_cpu_seconds"] = time.process_time() - c0
        jax.clear_caches()
    out["compile_ratio_loop_over_scan"] = out["loop"]["compile_seconds"] / out["scan"]["compile_seconds"]
    total = lambda r: r["compile_seconds"] + r["trace_lower_seconds"]
    out["total_ratio_loop_over_scan"] = total(out["loop"]) / total(out["scan"])
    out["cpu_ratio_loop_over_scan"] = (out["loop"]["process_cpu_seconds"]
                                       / out["scan"]["process_cpu_seconds"])
    out["compile_cpu_ratio_loop_over_scan"] = (out["loop"]["compile_cpu_seconds"]
                                               / out["scan"]["compile_cpu_seconds"])
    return out


def table_mode(argv, meshes: str) -> dict:
    args = parse_args(["--mesh=data:1", *argv])
    mesh_list = [m for m in (meshes or "fsdp:8,fsdp:16,fsdp:64").split(",") if m]
    # "fsdp:8,fsdp:16" is one mesh per entry; a multi-axis mesh is written with "+":
    # "data:8+fsdp:8"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    rows = []
    for m in mesh_list:
        cmd = [sys.executable, str(ROOT / "launch" / "plan.py"), f"--preset={args.preset}",
               f"--mesh={m.replace('+', ',')}", f"--seq-len={args.seq_len}",
               f"--objective={args.objective}", f"--a2a={args.a2a}", "--json"]
        if args.remat:
            remat = (args.remat if isinstance(args.remat, str)
                     else ",".join(f"{k}:{v}" for k, v in args.remat.items()))
            cmd.append(f"--remat={remat}")
        if args.batch:
            cmd.append(f"--batch={args.batch}")
        cmd += [f"--override={o}" for o in args.override]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: plan of {m}: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {k: r[k] for k in ("devices", "mesh", "batch", "seq_len", "moe_dispatch", "params_bytes",
                                 "optimizer_bytes", "temp_bytes", "argument_bytes", "total_bytes",
                                 "flops_per_step", "flops_per_device", "flops_per_token",
                                 "compile_seconds", "trace_lower_seconds", "compile_cpu_seconds")}
        row["total_gib"] = r["total_bytes"] / GIB
        for gb in BUDGETS_GB:
            row[f"fits_{gb}gb"] = r["total_bytes"] <= gb * 1e9
        row["plan_wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
    for row in rows:
        row["total_bytes_vs_first"] = row["total_bytes"] / rows[0]["total_bytes"]
    return {"mode": "table", "preset": args.preset, "objective": args.objective,
            "remat": args.remat or "preset", "seq_len": args.seq_len,
            "memory_note": "compiled on CPU: per-device memory estimates the GPU/TPU figure",
            "rows": rows}


def main(argv=None):
    mode, meshes, fast, rest = _extra_args(sys.argv[1:] if argv is None else list(argv))
    out = table_mode(rest, meshes) if mode == "table" else compile_mode(rest, fast)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
