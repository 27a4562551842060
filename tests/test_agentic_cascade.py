"""The agentic stage of the tiny cascade (``swe_agent_rl``, docs/agentic.md §6): the SFT mix's
generated source of canonical SWE episodes, and the stage's own-domain score (its episode
evaluation, not the registry's one-shot prompts) in the cascade state and report."""

import json

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.agentic.swe import swe_sft_rows
from cascade_jax.cascade import driver as Drv
from cascade_jax.cascade import plan as P
from cascade_jax.cascade import registry as R
from cascade_jax.cascade import report as Rep
from cascade_jax.data.chat import render_chat
from cascade_jax.data.rows import DataError
from cascade_jax.data.sft import Example, example_dataset
from cascade_jax.data.sources import open_source
from cascade_jax.runner import build as B


def test_sft_mix_renders_the_canonical_episodes_whole():
    """Every generated element of the tiny SFT mix is the canonical episode of
    ``swe_sft_rows(seed=data.shuffle_seed, **args)`` rendered as the chat template renders it
    (token- and mask-identical, nothing dropped as overlong at ``data.seq_len``), and the mix
    draws it at the source's weight: over the first 2000 elements the share is within 3
    binomial standard errors of 0.1 (sd sqrt(0.1 * 0.9 / 2000) = 0.0067)."""
    cfg = P.load_stage_config("sft", "tiny")
    tok = B.build_tokenizer(cfg)
    src = next(s for s in cfg.data.sources if s.format == "generated")
    rows = swe_sft_rows(seed=cfg.data.shuffle_seed, **src.args)
    want = {}
    for r in rows:
        _, ids, mask = render_chat(tok, r["messages"], tools=r.get("tools"), thinking=False,
                                   add_generation_prompt=False)
        want[tuple(ids)] = np.asarray(mask)
    assert max(len(k) for k in want) <= cfg.data.seq_len
    ds = example_dataset(cfg, tok)
    n, gen = 2000, 0
    for i in range(n):
        ex = ds[i]
        assert isinstance(ex, Example), ex  # no element of either source is skipped
        if ex.where.startswith(src.path):
            gen += 1
            np.testing.assert_array_equal(ex.loss_mask, want[tuple(ex.ids.tolist())])
    assert abs(gen / n - src.weight) <= 3 * np.sqrt(src.weight * (1 - src.weight) / n), gen


def test_generated_source_errors_name_the_bad_field():
    with pytest.raises(C.ConfigError, match="path: a generated source names its function"):
        C.DataSource(format="generated", path="cascade_jax.agentic.swe.swe_sft_rows")
    with pytest.raises(C.ConfigError, match="args: only a generated source"):
        C.DataSource(format="jsonl", path="x.jsonl", args={"n": 1})
    with pytest.raises(DataError, match="cannot import the generated source's function"):
        open_source(C.DataSource(format="generated", path="cascade_jax.agentic.swe:no_such"))
    with pytest.raises(DataError, match="args: .*missing 1 required positional argument: 'n'"):
        open_source(C.DataSource(format="generated", path="cascade_jax.agentic.swe:swe_sft_rows",
                                 args={"copy": 0.5}))


def test_agentic_stage_scores_come_from_its_episode_evaluation(tmp_path):
    """The cascade records an agentic stage's first and last episode evaluation from its
    ``metrics.jsonl``; the report's own-domain row is that gain, not the registry's one-shot
    ``swe`` score."""
    cfg = P.load_stage_config("swe_agent_rl", "tiny")
    run = tmp_path / "swe_agent_rl"
    run.mkdir()
    rows = [{"step": 0, "eval/swe/avg@4": 0.25, "eval/swe/se": 0.04},
            {"step": 3, "loss": 0.1, "reward/swe": 0.3},
            {"step": 16, "eval/swe/avg@4": 0.5, "eval/swe/se": 0.05}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ep = Drv._episode_scores(cfg, run)["episodes"]
    assert ep == {"domain": "swe", "before": 0.25, "before_se": 0.04, "before_step": 0,
                  "after": 0.5, "after_se": 0.05, "after_step": 16}
    assert Drv._episode_scores(P.load_stage_config("swe_rl", "tiny"), run) == {}

    for name, score in (("swe_rl", 0.9), ("swe_agent_rl", 0.1)):
        R.register_checkpoint(tmp_path / R.REGISTRY_FILE, name, str(tmp_path / name), {"swe": score})
    P.update_stage_state(tmp_path, "swe_rl", status="done", domains=["swe"])
    P.update_stage_state(tmp_path, "swe_agent_rl", status="done", domains=["swe"], episodes=ep)
    g = {(x["stage"], x["domain"]): x for x in Rep.own_domain_gains(tmp_path)}
    assert ("swe_agent_rl", "swe") not in g
    row = g[("swe_agent_rl", "swe (episodes)")]
    assert row["start"] == "swe_rl" and row["before"] == 0.25 and row["after"] == 0.5
    np.testing.assert_allclose(row["gain"], 0.25, atol=1e-12)
