"""Plan a sharded train step before renting the pod: memory per device and FLOPs per step.

    python launch/plan.py --preset=nano-30b-a3b --mesh=fsdp:8,expert:8 --seq-len=8192 --json
    python launch/plan.py --preset=nano-30b-a3b --mesh=fsdp:16 --device-memory-gib=141
    python launch/plan.py --preset=nano-30b-a3b --mesh=fsdp:8,expert:8 --a2a=padded

Compiles the GRPO (``--objective``) step ahead of time against a simulated mesh of CPU devices
(``--mesh`` sizes multiply to the device count; unnamed axes are 1) with abstract inputs — no
weights are allocated — and prints per-device bytes for parameters (fp32 master), optimizer
state and temporaries, FLOPs per step, the MoE dispatch (token-local on data / fsdp / context,
expert-parallel with an ``expert`` axis, its exchange from ``--a2a`` = the config's
``mesh.a2a``), and whether it fits ``--device-memory-gib``. CPU-compiled
memory is an estimate of the GPU/TPU figure (same partitioning, different fusion). See
``cascade_jax/sharding/plan.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cascade_jax.config import ConfigError, MeshConfig  # noqa: E402  jax-free


def parse_mesh(text: str) -> dict:
    """``"fsdp:8,expert:8"`` -> ``{"fsdp": 8, "expert": 8, other axes: 1}`` (parsed without jax:
    the simulated device count is set before jax starts)."""
    try:
        mesh_cfg = MeshConfig.from_text(text, field="--mesh")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return {f.name: getattr(mesh_cfg, f.name) for f in dataclasses.fields(mesh_cfg) if f.name != "a2a"}


def _positive(kind):
    """argparse type: a number of ``kind`` > 0 (argparse names the flag in its error)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _remat(text: str):
    """argparse type for ``--remat``: one policy name, or ``kind:policy,...`` -> a mapping
    (validated by the model config, whose error names the bad kind or policy)."""
    if ":" not in text:
        return text
    pairs = [p.partition(":") for p in text.split(",") if p.strip()]
    if any(not sep for _, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected a policy or kind:policy,..., got {text!r}")
    return {k.strip(): v.strip() for k, _, v in pairs}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano-30b-a3b", help="model preset (tiny, nano-30b-a3b)")
    ap.add_argument("--mesh", required=True, help="axis:size,... over data, fsdp, expert, context, tensor")
    ap.add_argument("--seq-len", type=_positive(int), default=8192)
    ap.add_argument("--batch", type=_positive(int), default=None,
                    help="sequences per step (default: one per data x fsdp x expert device)")
    ap.add_argument("--objective", default="grpo", choices=("grpo", "mopd", "sft"))
    ap.add_argument("--grad-accum", type=_positive(int), default=1)
    ap.add_argument("--remat", default=None, type=_remat,
                    help="none | full | dots, or per layer kind: e.g. moe:dots,attention:full "
                         "(the model's remat mapping; unnamed kinds: none)")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layer loop (compile-time baseline)")
    ap.add_argument("--full-compile", action="store_true",
                    help="optimise the generated machine code too (slower; same memory figures)")
    ap.add_argument("--a2a", default="auto", choices=("auto", "ragged", "padded"),
                    help="the expert-parallel token exchange (the config's mesh.a2a); CPU plans "
                         "compile the padded one (auto), whose buffers bound the ragged one's")
    ap.add_argument("--device-memory-gib", type=_positive(float), default=80.0)
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                    help="ModelConfig field override (JSON value), e.g. --override hidden_size=256")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap.parse_args(argv)


def model_config(args, **extra):
    """The preset with ``--override`` / ``--remat`` / ``--no-scan`` applied (and ``extra``)."""
    from models import nemotron_h as nh

    overrides = {}
    for o in args.override:
        k, _, v = o.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.remat:
        overrides["remat"] = args.remat
    overrides.setdefault("scan_layers", not args.no_scan)
    overrides.update(extra)
    try:
        return nh.preset(args.preset, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = parse_mesh(args.mesh)
    n_dev = math.prod(sizes.values())
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":  # a simulated mesh: must be set before jax starts
        os.environ["JAX_NUM_CPU_DEVICES"] = str(n_dev)
    import jax

    from cascade_jax import sharding
    from cascade_jax.sharding.plan import PlanError, plan

    model_cfg = model_config(args)
    if len(jax.devices()) < n_dev:
        raise SystemExit(f"error: --mesh needs {n_dev} devices, {len(jax.devices())} available")
    try:
        mesh = sharding.make_mesh(MeshConfig(**sizes, a2a=args.a2a), jax.devices()[:n_dev])
        res = plan(model_cfg, mesh, objective=args.objective, seq_len=args.seq_len, batch=args.batch,
                   device_memory_gib=args.device_memory_gib, grad_accum=args.grad_accum,
                   fast_compile=not args.full_compile, a2a=args.a2a)
    except PlanError as e:
        raise SystemExit(f"error: {e}") from None
    except sharding.ShardingError as e:
        hint = (" (plans compile on CPU: the padded exchange's buffers bound the ragged one's)"
                if "mesh.a2a='ragged'" in str(e) else "")
        raise SystemExit(f"error: {e}{hint}") from None
    res["preset"] = args.preset
    if args.json:
        print(json.dumps(res))
    else:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        print(f"{args.preset} {args.objective} on {res['mesh']} ({n_dev} devices), batch {res['batch']} x {res['seq_len']}, "
              f"MoE dispatch {res['moe_dispatch']}")
        for k in ("params_bytes", "optimizer_bytes", "argument_bytes", "temp_bytes", "total_bytes"):
            print(f"  {k:<18}{gib(res[k])} per device")
        print(f"  fits {args.device_memory_gib:g} GiB: {res['fits']}")
        print(f"  FLOPs/step {res['flops_per_step']:.3e}  per token {res['flops_per_token'] / 1e9:.2f} GFLOP")
        print(f"  compile {res['compile_seconds']:.1f} s (trace+lower {res['trace_lower_seconds']:.1f} s); {res['memory_note']}")
    return res


if __name__ == "__main__":
    main()
