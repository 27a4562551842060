"""cascade-jax entry point.

    python launch/run.py --stage=demo                       # tiny generate demo on CPU
    python launch/run.py --stage=mopd --set optimizer.lr=3e-6 --print-config
    python launch/run.py --config my.json --set run.out_dir=runs/x

``--stage NAME`` loads ``configs/NAME.json``; ``--config`` loads any JSON config; ``--set a.b=v``
overrides fields (validated; unknown keys are errors naming the key). The resolved config is
written to ``<run.out_dir>/config.json``.

Today only the ``demo`` objective runs end to end: it builds the model (tiny preset or a Hub
checkpoint), exports it as a Hub-layout checkpoint, reloads it, samples responses with the
prefill/decode path and reports tokens/s. The cascade stages (sft, grpo, mopd) get their runner in
a later issue; their configs already load and validate.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python launch/run.py` from a checkout
    sys.path.insert(0, str(ROOT))

from cascade_jax import config as C  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", help="stage name: loads configs/<stage>.json")
    ap.add_argument("--config", help="path of a JSON config (instead of --stage)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set optimizer.lr=2e-6 (repeatable)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap.parse_args(argv)


def resolve_config(args) -> C.Config:
    if args.stage and args.config:
        raise C.ConfigError("pass either --stage or --config, not both")
    if args.stage:
        path = ROOT / "configs" / f"{args.stage}.json"
        if not path.exists():
            names = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
            raise C.ConfigError(f"unknown stage {args.stage!r}; valid stages: {', '.join(names)}")
        cfg = C.load(str(path))
    elif args.config:
        cfg = C.load(args.config)
    else:
        cfg = C.Config()
    return C.apply_overrides(cfg, args.overrides)


def build_model(cfg: C.Config):
    """``(model_cfg, params)`` from ``cfg.model`` (a Hub checkpoint or a preset with random init)."""
    import jax
    import jax.numpy as jnp
    from models import nemotron_h as nh

    dtype = jnp.dtype(cfg.model.dtype)
    if cfg.model.checkpoint:
        mcfg, params = nh.load_checkpoint(cfg.model.checkpoint, dtype=dtype)
        mcfg = nh.with_overrides(mcfg, **cfg.model.overrides)
    else:
        mcfg = nh.preset(cfg.model.preset, **cfg.model.overrides)
        params = jax.jit(nh.init_params, static_argnums=(0, 2))(mcfg, jax.random.key(cfg.run.seed), dtype)
    return mcfg, params


def run_demo(cfg: C.Config, out_dir: pathlib.Path) -> dict:
    import jax
    import jax.numpy as jnp
    from models import nemotron_h as nh
    from cascade_jax.rollout.sampler import sample

    mcfg, params = build_model(cfg)
    total, active = nh.param_counts(mcfg)
    print(f"model: pattern={mcfg.pattern} params={total:,} active/token={active:,}")
    ckpt = out_dir / "checkpoint"
    nh.save_checkpoint(params, mcfg, str(ckpt))
    mcfg, params = nh.load_checkpoint(str(ckpt), dtype=jnp.dtype(cfg.model.dtype))
    print(f"exported and reloaded Hub-layout checkpoint: {ckpt}")

    r = cfg.rollout
    n_prompts = cfg.data.batch_prompts
    rng = jax.random.key(cfg.run.seed)
    prompts = jax.random.randint(rng, (n_prompts, r.max_prompt_len), 3, mcfg.vocab_size)
    prompts = jnp.repeat(prompts, r.n_samples, axis=0)
    lengths = jnp.repeat(jnp.arange(n_prompts) % r.max_prompt_len // 2 + r.max_prompt_len // 2 + 1,
                         r.n_samples)
    kw = dict(rng=jax.random.key(cfg.run.seed + 1), max_new_tokens=r.max_response_len,
              prompt_lengths=lengths, temperature=r.temperature)
    t0 = time.perf_counter()
    batch, responses = jax.block_until_ready(sample(params, prompts, mcfg, **kw))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch, responses = jax.block_until_ready(sample(params, prompts, mcfg, **kw))
    gen_s = time.perf_counter() - t0
    n_tok = int(responses.size)
    for i in range(min(3, responses.shape[0])):
        print(f"  response {i}: {responses[i, :12].tolist()} ...")
    report = {
        "stage": cfg.stage.name, "sequences": int(responses.shape[0]), "new_tokens": n_tok,
        "first_call_s": round(compile_s, 3), "generate_s": round(gen_s, 4),
        "decode_tokens_per_s": round(n_tok / gen_s, 1),
        "mean_rollout_logp": float(jnp.sum(batch.rollout_logp) / jnp.sum(batch.loss_mask)),
        "backend": jax.default_backend(),
    }
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    from models.nemotron_h import ModelConfigError, preset, with_overrides

    try:
        cfg = resolve_config(args)
        if not cfg.model.checkpoint:  # validate the model section before any work
            with_overrides(preset(cfg.model.preset), **cfg.model.overrides)
    except (C.ConfigError, ModelConfigError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(C.to_json(cfg))
        return 0
    out_dir = pathlib.Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(C.to_json(cfg) + "\n")
    if cfg.stage.objective != "demo":
        print(f"stage {cfg.stage.name!r} (objective {cfg.stage.objective!r}): the cascade runner is not "
              f"built yet; the update steps live in cascade_jax.rl. Config validated and written to "
              f"{out_dir / 'config.json'}.", file=sys.stderr)
        return 2
    report = run_demo(cfg, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
