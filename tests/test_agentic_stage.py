"""The agentic GRPO stage (``agentic.env``) through the runner's Stage (random tiny model, fp32).

* the stage's rollout batch is ``batch_prompts × n_samples`` episodes of the environment: its
  rows are the prompt, each turn's sampled tokens (loss mask 1, nothing else), the stop token
  closing a cut turn and the template's continuation through the tool results (rebuilt here from
  the turns' parsed messages); the rollout log-probs equal a teacher-forced forward of the row
  (atol 1e-5); group ids are the task index; the step's GRPO update on it is finite and moves
  the weights; the held-out evaluation reports the mean and its standard error;
* config: ``agentic.env`` needs a GRPO stage and the environment's domain; ``configs/tiny/
  agentic_tool.json`` and ``configs/tiny/swe_agent.json`` load (the SWE prompts fit its rows);
  the SWE one builds and runs one step (``slow``);
* the lookup SFT rows are the episode's canonical rendering; the lookup task arguments shape the
  tasks and ``copy`` is the share of SFT rows answering the code.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.agentic import stage as agentic_stage
from cascade_jax.agentic.env import Reset, Step
from cascade_jax.agentic.episode import ScriptedPolicy, run_episode
from cascade_jax.agentic.lookup import LOOKUP_TOOL, LookupEnv, lookup_sft_rows, lookup_solution, lookup_tasks
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.agentic.swe import SWEEnv
from cascade_jax.data.chat import render_chat
from cascade_jax.data.tokenizer import tiny_tokenizer
from cascade_jax.rollout.scoring import score_logprobs
from cascade_jax.runner import build as B
from cascade_jax.runner.metrics import PhaseTimer
from cascade_jax.runner.stage import Stage
from tests import runner_support
from tests.runner_support import ROOT

G, N, TURNS = 2, 2, 3


class TickEnv:
    """Answers every turn with ``tick k`` (tool role); ends after turn 3 with reward = the
    parity of the turns' total text length (so rewards differ within a group)."""

    def __init__(self):
        self.k, self.texts = 0, []

    def reset(self, task):
        return Reset(({"role": "user", "content": task["prompt"]},))

    def step(self, turn):
        self.k += 1
        self.texts.append(turn.text)
        if self.k == TURNS:
            return Step(done=True, reward=float(sum(map(len, self.texts)) % 2))
        return Step((f"tick {self.k}",))

    def truncate(self, reason):
        return 0.0

    def close(self):
        pass


def tick_tasks(n, seed=0):
    return [{"prompt": f"count {seed % 1000} {i}"} for i in range(n)]


def _config(tmp_path, **agentic):
    return C.from_dict(C.Config, {
        "model": {"preset": "tiny", "dtype": "float32", "overrides": {"pattern": "ME*"}},
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "rollout": {"sampling": {"n_samples": N, "max_prompt_len": 64, "max_response_len": 64, "thinking": False},
                    "batching": {"num_slots": 4, "steps_per_call": 4, "prefill_sizes": [4]}},
        "data": {"domains": ["tool_call"], "batch_prompts": G, "tiny_rows_per_domain": 16},
        "agentic": {"env": "lookup", "max_turns": TURNS, "max_new_tokens": 8,
                    "end_on_length": False, "tool_workers": 2, **agentic},
        "stage": {"name": "agentic_test", "objective": "grpo", "steps": 1},
        "eval": {"every": -1, "prompts": 2, "k": 2},
        "run": {"out_dir": str(tmp_path / "run")}})


@pytest.mark.integration
def test_stage_draws_episode_rows_and_trains_on_them(tmp_path, monkeypatch):
    monkeypatch.setitem(agentic_stage.ENVIRONMENTS, "lookup", (TickEnv, tick_tasks))
    cfg = _config(tmp_path)
    parts = B.build(cfg)
    stage = Stage(cfg, tmp_path / "run", parts, log=lambda s: None)
    params = stage.compute_params()
    before = jax.tree.map(np.asarray, params)
    key = jax.random.key(3)
    batch, info = stage._rollout_batch(0, key, PhaseTimer())
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))  # the stage's task / sampling seed
    tasks = tick_tasks(G, seed)
    renderer = ChatRenderer(parts.tokenizer)
    T = 64 + 64
    tok, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    logp, seg = np.asarray(batch.rollout_logp), np.asarray(batch.segment_ids)
    assert tok.shape == (G * N, T)
    np.testing.assert_array_equal(np.asarray(batch.group_ids), np.repeat(np.arange(G), N))
    np.testing.assert_array_equal(np.asarray(batch.policy_version), np.zeros(G * N))
    assert batch.sampling is not None and batch.sampling.temperature == 1.0
    rewards = []
    for r in range(G * N):
        L = int(seg[r].sum())
        assert seg[r, :L].all() and not seg[r, L:].any() and not mask[r, L:].any()
        row, m = tok[r, :L], mask[r, :L]
        # rebuild the row from the conversation: prompt, per turn the sampled tokens (mask 1),
        # [the stop token closing a cut turn,] the template's continuation (mask 0)
        msgs = [{"role": "user", "content": tasks[r // N]["prompt"]}]
        expect = list(renderer.prompt_ids(msgs))
        texts = []
        turn_spans = runner_support.mask_spans(m)
        assert len(turn_spans) == TURNS
        for k, (s, t) in enumerate(turn_spans):
            sampled = [int(x) for x in row[s:t]]
            cut = sampled[-1] != renderer.stop_id
            turn = renderer.parse(sampled, "length" if cut else "stop")
            texts.append(turn.text)
            expect += sampled + ([renderer.stop_id] if cut else [])
            msgs.append(turn.message)
            if k < TURNS - 1:
                obs = [{"role": "tool", "content": f"tick {k + 1}"}]
                expect += list(renderer.continuation_ids(msgs, obs))
                msgs += obs
        assert [int(x) for x in row] == expect
        assert m.sum() == sum(t - s for s, t in turn_spans)
        rewards.append(float(sum(map(len, texts)) % 2))
        assert not logp[r][mask[r] == 0].any()
    # rollout log-probs = teacher-forced log-probs of the whole row (temperature 1, fp32)
    L = seg.sum(1)
    refs = score_logprobs(params, parts.model_cfg, [tok[r, :1] for r in range(G * N)],
                          [tok[r, 1:L[r]] for r in range(G * N)], batch_size=G * N)
    for r, ref in enumerate(refs):
        on = mask[r, 1:L[r]] == 1
        np.testing.assert_allclose(logp[r, 1:L[r]][on], ref[on], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(batch.rewards), np.asarray(rewards, np.float32))
    assert info["reward/tool_call"] == pytest.approx(np.mean(rewards))
    assert info["agentic/turns_per_episode"] == TURNS
    # the GRPO update on the episode rows
    m = stage.train_on(batch, info, PhaseTimer(), sync=False)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
    assert m["num_tokens"] == mask.sum()
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                             stage.compute_params(), before)))
    if np.asarray(rewards).reshape(G, N).std(1).any():  # some group has non-zero advantages
        assert moved > 0
    else:
        assert moved == 0 and m["grad_norm"] == 0
    # the held-out evaluation: eval.prompts tasks x eval.k episodes, mean and standard error
    res = stage.evaluate(1)
    d = res["domains"]["tool_call"]
    assert d["n_episodes"] == 4 and 0.0 <= d["avg@2"] <= 1.0 and res["score"] == d["avg@2"]
    stage.close()


def test_agentic_config_checks(tmp_path):
    with pytest.raises(C.ConfigError, match=r"data.domains: agentic.env 'lookup' scores its "
                                            r"episodes under domain 'tool_call'"):
        C.from_dict(C.Config, {"data": {"domains": ["math"]}, "stage": {"objective": "grpo"},
                     "agentic": {"env": "lookup"}})
    with pytest.raises(C.ConfigError, match=r"agentic.env: episodes train with GRPO"):
        C.from_dict(C.Config, {"data": {"domains": ["tool_call"]}, "stage": {"objective": "sft"},
                     "agentic": {"env": "lookup"}})
    with pytest.raises(C.ConfigError, match=r"agentic.max_turns: must be >= 1"):
        C.from_dict(C.Config, {"agentic": {"max_turns": 0}})
    with pytest.raises(C.ConfigError, match=r"agentic.keep_cache: needs the embedded engine or JAX "
                                            r"rollout servers"):
        C.from_dict(C.Config, {"data": {"domains": ["tool_call"]}, "stage": {"objective": "grpo"},
                     "rollout": {"engine": "sglang", "servers": {"url": "http://x:1"}},
                     "agentic": {"env": "lookup", "keep_cache": True}})
    cfg = C.load(ROOT / "configs" / "tiny" / "agentic_tool.json")
    assert cfg.agentic.env == "lookup" and cfg.data.domains == ("tool_call",)
    assert {len(t["metadata"]["answer"]) for t in agentic_stage.step_tasks(cfg, 8, 0)} == {1}
    swe = C.load(ROOT / "configs" / "tiny" / "swe_agent.json")
    assert swe.agentic.env == "swe" and swe.data.domains == ("swe",)
    r = ChatRenderer(tiny_tokenizer())
    for t in agentic_stage.step_tasks(swe, 4, 0):  # the prompt (system, tools, issue) fits
        env = SWEEnv()
        reset = env.reset(t)
        env.close()
        assert len(r.prompt_ids(list(reset.messages), reset.tools)) < swe.rollout.sampling.max_prompt_len
    with pytest.raises(ValueError, match=r"agentic.task_args: .*n_kays"):
        agentic_stage.step_tasks(dataclasses.replace(
            cfg, agentic=dataclasses.replace(cfg.agentic, task_args={"n_kays": 3})), 2, 0)
    # a run dir written before the section existed compares equal to today's default
    old = C.to_dict(C.Config())
    del old["agentic"]
    assert C.migrate_dict(old) == C.to_dict(C.Config())


def test_lookup_sft_rows_are_the_canonical_episode():
    tok = tiny_tokenizer()
    r = ChatRenderer(tok)
    rows = lookup_sft_rows(3, seed=4)
    for row, task in zip(rows, lookup_tasks(3, seed=4)):
        ep = run_episode(LookupEnv(), task, ScriptedPolicy(r, lookup_solution(task)), r)
        assert ep.reward == 1.0 and ep.canonical and row["messages"] == ep.messages
        assert row["tools"] == [LOOKUP_TOOL]
        _, ids, _ = render_chat(tok, row["messages"], tools=row["tools"], thinking=False,
                                add_generation_prompt=False)
        np.testing.assert_array_equal(ids[:len(ep.tokens)], ep.tokens)
        json.dumps(row)  # the jsonl source layout


def test_lookup_task_args_and_format_rows():
    """``alphabet`` / ``code_len`` / ``key_space`` / ``n_keys`` shape the tasks; ``copy`` is the
    share of SFT rows answering the tool's code (the others a uniform draw: right with chance
    1 / |alphabet|); bad arguments are one-line errors naming them."""
    args = {"alphabet": "ABCD", "code_len": 1, "key_space": 4, "n_keys": 2}
    tasks = lookup_tasks(400, seed=2, **args)
    for t in tasks:
        table = t["metadata"]["table"]
        assert len(table) == 2 and set(table) <= {"k00", "k01", "k02", "k03"}
        assert all(len(v) == 1 and v in "ABCD" for v in table.values())
        meta = t["metadata"]
        assert meta["answer"] == table[meta["key"]] and meta["key"] in t["prompt"]
    assert {t["metadata"]["answer"] for t in tasks} == set("ABCD")
    n = 2000
    for copy in (0.0, 0.5, 1.0):
        rows = lookup_sft_rows(n, seed=5, copy=copy, **args)
        codes = [t["metadata"]["answer"] for t in lookup_tasks(n, seed=5, **args)]
        assert all(r["messages"][2]["content"].endswith(": " + c) for r, c in zip(rows, codes))
        right = np.mean([r["messages"][3]["content"] == c for r, c in zip(rows, codes)])
        want = copy + (1 - copy) / 4
        # binomial standard error of the share; 4 standard errors (0 when copy = 1)
        assert abs(right - want) <= 4 * np.sqrt(want * (1 - want) / n), (copy, right)
    with pytest.raises(ValueError, match=r"copy: .* got 1.5"):
        lookup_sft_rows(2, copy=1.5)
    with pytest.raises(ValueError, match=r"key_space"):
        lookup_tasks(2, n_keys=5, key_space=4)
    with pytest.raises(ValueError, match=r"alphabet"):
        lookup_tasks(2, alphabet="")


@pytest.mark.slow
def test_swe_agent_config_runs_a_step(tmp_path):
    """``configs/tiny/swe_agent.json`` (the agentic SWE stage over the generated tiny SWE tasks)
    builds and runs one GRPO step through the Stage, its batch and group sizes cut to 1 task ×
    2 episodes of at most 2 turns of 8 tokens (the config's row length kept); the episodes'
    rewards are the sandboxed test runs' (0 or 1). Slow (the 576-token rows compile); the
    config's loading is in ``test_agentic_config_checks``."""
    cfg = C.load(ROOT / "configs" / "tiny" / "swe_agent.json")
    assert cfg.agentic.env == "swe" and cfg.data.domains == ("swe",)
    T = cfg.rollout.sampling.max_prompt_len + cfg.rollout.sampling.max_response_len
    cfg = C.replace_path(C.replace_path(cfg, "rollout.sampling.n_samples", 2), "rollout.batching.num_slots", 2)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_prompts=1),
        agentic=dataclasses.replace(cfg.agentic, max_turns=2, max_new_tokens=8),
        run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "run")))
    stage = Stage(cfg, tmp_path / "run", B.build(cfg), log=lambda s: None)
    try:
        batch, info = stage._rollout_batch(0, jax.random.key(0), PhaseTimer())
        assert batch.tokens.shape == (2, T)
        assert set(np.asarray(batch.rewards).tolist()) <= {0.0, 1.0}
        assert info["reward/swe"] == float(np.asarray(batch.rewards).mean())
        assert 1 <= info["agentic/turns_per_episode"] <= 2
        m = stage.train_on(batch, info, PhaseTimer(), sync=False)
        assert np.isfinite(m["loss"])
        assert m["num_tokens"] == float(np.asarray(batch.loss_mask).sum())
    finally:
        stage.close()
