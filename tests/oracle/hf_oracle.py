"""The transformers oracle: builds, saves and runs ``NemotronHForCausalLM`` in fp32 on CPU.

Runs ONLY under the oracle interpreter (Python 3.11 with CPU torch + transformers; see
``requirements-oracle.txt``), never inside the project's own environment; tests call it by
subprocess through ``tests/oracle_util.py``. Subcommands::

    build  --config CFG.json --seed S --out DIR          random-weight fp32 model -> save_pretrained(DIR)
    logits --model DIR --tokens TOKENS.npy --out OUT.npy [--hidden-out HID.npz]
           (HID.npz: ``layer_i`` = output of block i, the residual stream before ``norm_f``)
    batch  --jobs JOBS.json                              several of the above in one process

``JOBS.json`` is a list of ``{"op": "build" | "logits", ...}`` objects with the same keys as the
flags (``config`` may be a dict instead of a path). Batching saves the ~3 s torch import per call.

The model always runs the pure-PyTorch paths (no Mamba/causal-conv kernels exist on CPU) with eager
attention and eager experts in fp32. Note transformers 5 clamps dt at ``time_step_min`` in the
full-sequence path; the JAX side reproduces that with ``ModelConfig.dt_floor``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch


def _decode_floats(v):
    if isinstance(v, dict):
        if set(v) == {"__float__"}:
            return float(v["__float__"])
        return {k: _decode_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_floats(x) for x in v]
    return v


def _hf_config(d: dict):
    from transformers import NemotronHConfig

    d = _decode_floats(dict(d))
    for k in ("torch_dtype", "dtype", "architectures", "transformers_version"):
        d.pop(k, None)
    cfg = NemotronHConfig(**d)
    cfg.dtype = "float32"
    return cfg


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    """Non-trivial values for every weight and buffer, so that a mix-up of any two shows up."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=g, dtype=torch.float32)

    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name]
        shape = tuple(t.shape)
        if name.endswith("A_log"):  # A = -exp(A_log) in -[0.5, 8]
            v = torch.log(0.5 + 7.5 * rand(shape))
        elif name.endswith(".D"):
            v = randn(shape)
        elif name.endswith("dt_bias"):  # dt from ~3e-4 (clamped at time_step_min) to ~0.3
            v = -8.0 + 7.0 * rand(shape)
        elif name.endswith("e_score_correction_bias"):
            v = 0.1 * randn(shape)
        elif name.endswith("conv1d.weight"):
            v = 0.5 * randn(shape)
        elif name.endswith("conv1d.bias"):
            v = 0.2 * randn(shape)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            v = 1.0 + 0.2 * randn(shape)
        elif name.endswith("embeddings.weight"):
            v = randn(shape)
        elif name.endswith("gate.weight"):  # router: spread-out sigmoid scores
            v = randn(shape) / math.sqrt(shape[-1])
        elif t.ndim >= 2:  # [.., out, in] linear weights (incl. stacked experts)
            scale = 0.5 if any(s in name for s in ("out_proj", "o_proj", "down_proj")) else 1.0
            v = scale * randn(shape) / math.sqrt(shape[-1])
        else:
            raise RuntimeError(f"hf_oracle: no randomization rule for {name} {shape}")
        t.copy_(v.to(t.dtype))


def build(config, seed: int, out: str) -> None:
    from transformers import NemotronHForCausalLM

    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(_hf_config(config)).to(torch.float32)
    _randomize(model, seed)
    model.save_pretrained(out)


def _load(model_dir: str):
    from transformers import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def logits(model: str, tokens: str, out: str, hidden_out: str | None = None) -> None:
    m = _load(model)
    ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    blocks = {}
    hooks = []
    if hidden_out is not None:  # every block's output (the residual stream after layer i, pre norm_f)
        for i, layer in enumerate(m.model.layers):
            hooks.append(layer.register_forward_hook(
                lambda mod, args, output, i=i: blocks.__setitem__(f"layer_{i}", output.float().numpy())))
    res = m(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    np.save(out, res.logits.float().numpy())
    if hidden_out is not None:
        np.savez(hidden_out, **blocks)


def run_job(job: dict) -> None:
    job = dict(job)
    op = job.pop("op")
    if op == "build":
        build(job["config"], int(job.get("seed", 0)), job["out"])
    elif op == "logits":
        logits(job["model"], job["tokens"], job["out"], job.get("hidden_out"))
    else:
        raise SystemExit(f"hf_oracle: unknown op {op!r}")


def main(argv=None) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--config", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--tokens", required=True)
    lg.add_argument("--out", required=True)
    lg.add_argument("--hidden-out")
    bt = sub.add_parser("batch")
    bt.add_argument("--jobs", required=True)
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.config, a.seed, a.out)
    elif a.cmd == "logits":
        logits(a.model, a.tokens, a.out, a.hidden_out)
    else:
        with open(a.jobs) as f:
            for job in json.load(f):
                run_job(job)


if __name__ == "__main__":
    sys.exit(main())
