"""Benchmark: compile time of the sharded train step with the layer scan vs the unrolled loop.

    python launch/bench_plan.py --preset=nano-30b-a3b --mesh=fsdp:8 --seq-len=8192
    python launch/bench_plan.py --preset=nano-30b-a3b --mesh=fsdp:8 --seq-len=256 \
        --override hidden_size=256 --override vocab_size=4096 ...   # narrow proxy, same 52 layers

Plans the same step twice in one process (``scan_layers`` on, then off = the baseline) and
prints one JSON object with both plans' compile and trace+lower seconds and the ratio
``baseline / scan`` (higher is better), plus the per-device memory of each (the scan stacks the
scanned layers' compute weights, so memory may differ).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch.plan import model_config, parse_args, parse_mesh  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    sizes = parse_mesh(args.mesh)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ["JAX_NUM_CPU_DEVICES"] = str(math.prod(sizes.values()))
    import jax

    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig
    from cascade_jax.sharding.plan import plan
    mesh = sharding.make_mesh(MeshConfig(**sizes))
    out = {"preset": args.preset, "mesh": args.mesh, "seq_len": args.seq_len}
    for name, scan in (("scan", True), ("loop", False)):
        cfg = model_config(args, scan_layers=scan)
        r = plan(cfg, mesh, objective=args.objective, seq_len=args.seq_len, batch=args.batch,
                 device_memory_gib=args.device_memory_gib)
        out[name] = {k: r[k] for k in ("compile_seconds", "trace_lower_seconds", "total_bytes",
                                       "temp_bytes", "flops_per_step")}
        jax.clear_caches()
    out["compile_ratio_loop_over_scan"] = out["loop"]["compile_seconds"] / out["scan"]["compile_seconds"]
    total = lambda r: r["compile_seconds"] + r["trace_lower_seconds"]
    out["total_ratio_loop_over_scan"] = total(out["loop"]) / total(out["scan"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
