"""Remat per layer kind (``ModelConfig.remat`` as ``{"attention" | "mamba" | "moe" | "mlp":
policy}``): the same forward and gradients as no remat (fp32, tiny model whose pattern repeats,
loop and scan; tolerances relative to each quantity's largest magnitude: forward 1e-6, gradients
1e-5 as in tests/test_sharding_scan.py), a checkpoint around exactly the layers of the chosen
kinds (counted in the traced program, also inside the scanned group body), and bad values
named."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from models import nemotron_h as nh

CFG = nh.preset("tiny", pattern="ME*ME*-", vocab_size=64, n_group=1, topk_group=1)  # (ME*)x2, -
PER_KIND = {"attention": "full", "mamba": "full", "moe": "full", "mlp": "dots"}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _checkpoints(jaxpr) -> int:
    """Number of ``jax.checkpoint`` regions in ``jaxpr`` (nested programs included)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ("checkpoint", "remat2", "remat")
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    n += _checkpoints(j.jaxpr)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    n += _checkpoints(j)
    return n


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
@pytest.mark.integration
def test_per_kind_remat_keeps_forward_and_gradients(scan):
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 2, 0), jnp.int32)
    base = dataclasses.replace(CFG, scan_layers=scan)

    def run(cfg):
        def loss(p):
            h = nh.hidden_states(p, tokens, cfg, segment_ids=seg)
            return jnp.sum(jnp.sin(h)), h
        (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return h, g

    h0, g0 = run(base)
    h1, g1 = run(dataclasses.replace(base, remat=PER_KIND))
    assert rel(h1, h0) < 1e-6
    worst = max(rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("scan", [False, True])
def test_per_kind_remat_wraps_exactly_the_chosen_kinds(scan):
    params = nh.abstract_params(CFG)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    raw = lambda remat: _checkpoints(jax.make_jaxpr(lambda p, t: nh.hidden_states(
        p, t, dataclasses.replace(CFG, remat=remat, scan_layers=scan)))(params, tokens).jaxpr)
    inner = raw("none")  # the kernels' own checkpoints (e.g. the chunked SSD), not the layers'
    count = lambda remat: raw(remat) - inner
    # the scan runs the repeated (ME*) group as one body: one traced layer per kind there
    moe, mamba, attn = (2, 2, 2) if not scan else (1, 1, 1)
    assert count({"moe": "full"}) == moe
    assert count({"moe": "full", "mamba": "full"}) == moe + mamba
    assert count({"attention": "dots", "mlp": "full"}) == attn + 1
    assert count({"moe": "none"}) == 0
    # one policy for all: every layer (loop) or every group body plus the unscanned layer (scan)
    assert count("full") == (len(CFG.pattern) if not scan else 2)


@pytest.mark.parametrize("value, match", [
    ("some", r"remat: must be one of \['none', 'full', 'dots'\]"),
    ({"moe": "full", "ssm": "full"}, r"remat: unknown layer kind\(s\) \['ssm'\]"),
    ({"mamba": "everything"}, r"remat.mamba: must be one of"),
    (3, r"remat: must be one of"),
])
def test_bad_remat_names_the_field(value, match):
    with pytest.raises(nh.ModelConfigError, match=match):
        nh.preset("tiny", remat=value)


def test_per_kind_remat_from_a_run_config():
    """``model.overrides.remat`` in a stage config is the mapping; stored as sorted pairs."""
    from cascade_jax import config as C
    from cascade_jax.runner import build as B
    import configs

    cfg = C.load(str(configs.stage_path("sft")))
    cfg = C.apply_overrides(cfg, ['model.overrides.remat={"moe": "full", "mamba": "full", "attention": "dots"}'])
    m = B.model_config(cfg)
    assert m.remat == (("attention", "dots"), ("mamba", "full"), ("moe", "full"))
    assert hash(m) == hash(dataclasses.replace(m))
    assert nh.remat_for_kind(m.remat, "E") == "full" and nh.remat_for_kind(m.remat, "-") == "none"
