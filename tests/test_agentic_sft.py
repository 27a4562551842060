"""The tiny SFT with the agentic SWE scaffold in its mix (``configs/tiny/sft_agentic.json``,
docs/agentic.md §6): a ``generated`` data source of the canonical SWE episodes of the agentic
stage's own task family, mixed with the tiny domains; and the agentic stage's warm start from a
cascade checkpoint (``configs/tiny/swe_agent_sft.json``): the same episodes alone."""

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.agentic.swe import swe_sft_rows
from cascade_jax.data.chat import render_chat
from cascade_jax.data.rows import DataError
from cascade_jax.data.sft import Example, example_dataset
from cascade_jax.data.sources import open_source
from cascade_jax.runner import build as B
from tests.runner_support import ROOT


def _tiny(name: str) -> C.Config:
    return C.load(ROOT / "configs" / "tiny" / f"{name}.json")


def _episode_source_args(source: C.DataSource) -> dict:
    """The ``swe_sft_rows`` source's ``args`` without ``n`` and ``copy``, which must be 512 rows
    with half of them writing the fix (what is left must be the agentic stage's task family)."""
    assert source.path == "cascade_jax.agentic.swe:swe_sft_rows", source
    args = dict(source.args)
    assert {k: args.pop(k) for k in ("n", "copy")} == {"n": 512, "copy": 0.5}
    return args


def test_sft_mix_holds_the_agentic_stages_task_family():
    """The generated source is ``swe_sft_rows`` of the agentic SWE stage's own
    ``agentic.task_args`` (``configs/tiny/swe_agent.json``), half the rows writing the fix;
    everything else is the tiny SFT config's."""
    sft, mix, agent = _tiny("sft"), _tiny("sft_agentic"), _tiny("swe_agent")
    gen = [s for s in mix.data.sources if s.format == "generated"]
    assert len(gen) == 1 and _episode_source_args(gen[0]) == agent.agentic.task_args
    assert [s for s in mix.data.sources if s.format != "generated"] == \
        [C.DataSource(format="tiny", weight=1 - gen[0].weight)]
    assert (mix.optimizer, mix.stage.steps, mix.eval) == (sft.optimizer, sft.stage.steps, sft.eval)


def test_agentic_warm_start_is_the_stages_episodes_alone():
    """``tiny/swe_agent_sft`` SFTs on ``swe_sft_rows`` of the agentic SWE stage's own
    ``agentic.task_args`` and nothing else (docs/agentic.md §6: from the cascade's ``swe_rl``
    export it starts the stage at 0.62 and erases the other domains), in rows that hold a whole
    episode."""
    warm, agent = _tiny("swe_agent_sft"), _tiny("swe_agent")
    (src,) = warm.data.sources
    assert (src.format, src.domain) == ("generated", "swe")
    assert _episode_source_args(src) == agent.agentic.task_args
    assert warm.stage.objective == "sft" and warm.data.seq_len == _tiny("sft_agentic").data.seq_len


def test_sft_mix_renders_the_canonical_episodes_whole():
    """Every generated element of the agentic SFT mix is the canonical episode of
    ``swe_sft_rows(seed=data.shuffle_seed, **args)`` rendered as the chat template renders it
    (token- and mask-identical, nothing dropped as overlong at ``data.seq_len``), and the mix
    draws it at the source's weight: over the first 2000 elements the share is within 3
    binomial standard errors of 0.1 (sd sqrt(0.1 * 0.9 / 2000) = 0.0067)."""
    cfg = _tiny("sft_agentic")
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
