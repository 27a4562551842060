"""The SWE agent loop with scripted agents, and the seeded task generator.

* generated tasks: deterministic in the seed; on the snapshot the FAIL_TO_PASS tests fail and the
  PASS_TO_PASS tests pass; with the gold patch applied every test passes;
* scripted agents: the correct fix (explore, view, str_replace, finish) gets reward 1; a wrong
  fix 0; an agent that rewrites the tests to pass 0 (the harness restores them); a hostile agent
  (fork bomb, infinite loop, flood, deleting the repository, filling the disk) 0 without a
  crash; truncated episodes are scored on the repository as it is;
* the tiny family (``functions`` / ``n_functions`` / ``packages`` / ``declare_tools``): one-line
  functions with a one-operator bug, the fix candidates; the SFT rows are the canonical episode
  (view, replace, finish) token for token, and ``copy`` is the share of rows writing the fix.
"""

import json

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.agentic.episode import EpisodeLimits, ScriptedPolicy, run_episode
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.agentic.swe import (SWE_TOOLS, SWEEnv, evaluate_workspace, swe_sft_rows,
                                     swe_solution, task_test_ids)
from cascade_jax.agentic.swe_tasks import (ARITH_FUNCTIONS, FUNCTIONS, fix_candidates, gold_edit,
                                           materialize, swe_tasks)
from cascade_jax.agentic.tools import ToolLimits, Workspace
from cascade_jax.data.chat import render_chat
from cascade_jax.data.tokenizer import tiny_tokenizer
from cascade_jax.rewards import sandbox
from cascade_jax.rewards.tool_call import format_tool_call as call
from tests.rewards.support import tracked_sandbox
from tests.runner_support import ROOT

LIMITS = ToolLimits(call=sandbox.Limits(wall_s=3.0, cpu_s=2, memory_bytes=256 << 20,
                                        file_size_bytes=2 << 20, processes=16,
                                        output_bytes=64 << 10),
                    workspace_bytes=4 << 20, max_observation_chars=1000)
EP_LIMITS = EpisodeLimits(max_turns=10, max_tokens=20000, max_new_tokens=4000)


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(tiny_tokenizer())


@pytest.fixture(scope="module")
def task():
    return swe_tasks(2, seed=11)[1]


def _episode(renderer, task, texts, limits=EP_LIMITS):
    return run_episode(SWEEnv(LIMITS), task, ScriptedPolicy(renderer, texts), renderer, limits,
                       domain="swe")


@pytest.mark.timeout(60)
def test_generated_tasks(monkeypatch):
    tasks = swe_tasks(3, seed=2)
    assert tasks == swe_tasks(3, seed=2) and tasks != swe_tasks(3, seed=3)
    with tracked_sandbox(monkeypatch):
        for t in tasks:
            f2p, p2p = task_test_ids(t, "FAIL_TO_PASS"), task_test_ids(t, "PASS_TO_PASS")
            assert len(f2p) == 2 and len(p2p) == 6
            assert t["metadata"]["buggy_function"] in t["problem_statement"]
            with Workspace(materialize(t), LIMITS) as ws:
                assert ws.apply_patch(t["test_patch"]).ok
                out = ws.run_tests(f2p + p2p).data["tests"]
                assert [out[i] for i in f2p] == ["failed"] * 2
                assert [out[i] for i in p2p] == ["passed"] * 6
            with Workspace(materialize(t), LIMITS) as ws:
                assert ws.apply_patch(t["patch"]).ok
                assert evaluate_workspace(ws, t)[0] == 1.0
    as_json = {**tasks[0], "FAIL_TO_PASS": '["a.py::t"]'}
    assert task_test_ids(as_json, "FAIL_TO_PASS") == ["a.py::t"]


@pytest.mark.timeout(60)
def test_correct_fix_scores_1(monkeypatch, renderer, task):
    path, old, new = gold_edit(task)
    texts = [call("execute_bash", {"command": "ls -R"}),
             call("str_replace_editor", {"command": "view", "path": path}),
             "I see the bug.\n" + call("str_replace_editor", {"command": "str_replace", "path": path,
                                                              "old_str": old, "new_str": new}),
             call("finish", {})]
    with tracked_sandbox(monkeypatch):
        ep = _episode(renderer, task, texts)
    assert (ep.reward, ep.ended_by, len(ep.turns)) == (1.0, "env", 4), ep.info
    assert set(ep.info["tests"].values()) == {"passed"} and ep.canonical
    obs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert "core.py" in obs[0] and old.strip() in obs[1] and obs[2].startswith("edited")
    # the row is the rendered conversation, loss only on the four turns
    assert list(ep.tokens) == list(renderer.tokenizer.encode(
        renderer.conversation_text(ep.messages, list(SWE_TOOLS))))
    assert renderer.tokenizer.decode(ep.tokens[ep.loss_mask == 1]) == "<|im_end|>".join(texts) + "<|im_end|>"


@pytest.mark.timeout(60)
def test_wrong_fix_and_test_tampering_score_0(monkeypatch, renderer, task):
    path, old, _ = gold_edit(task)
    wrong = [call("str_replace_editor", {"command": "str_replace", "path": path, "old_str": old,
                                         "new_str": "    return None"}), "Done."]
    tamper = [call("execute_bash", {"command": "printf 'def test_x():\\n    pass\\n' > tests/test_core.py"}),
              call("str_replace_editor", {"command": "create", "path": "tests/test_issue.py",
                                          "file_text": "def test_x():\n    pass\n"}),
              call("finish", {})]
    with tracked_sandbox(monkeypatch):
        ep = _episode(renderer, task, wrong)
        assert (ep.reward, ep.ended_by) == (0.0, "env") and "failing" in ep.info["reason"]
        ep = _episode(renderer, task, tamper)
        assert ep.reward == 0.0 and "failing" in ep.info["reason"], ep.info


@pytest.mark.timeout(120)
def test_hostile_agent_scores_0_without_crashing(monkeypatch, renderer, task):
    texts = [call("execute_bash", {"command": ":(){ :|:& };:"}),
             call("execute_bash", {"command": "python3 -c 'while True: pass'"}),
             call("execute_bash", {"command": "yes flood"}),
             call("execute_bash", {"command": "cat /etc/shadow; ls /root; curl http://127.0.0.1"}),
             call("str_replace_editor", {"command": "view", "path": "/etc/passwd"}),
             call("str_replace_editor", {"command": "explode", "path": "x"}),
             call("execute_bash", {"command": "rm -rf /repo/* /repo/.[!.]*; echo gone"}),
             call("finish", {})]
    with tracked_sandbox(monkeypatch):
        ep = _episode(renderer, task, texts)
    assert (ep.reward, ep.ended_by, len(ep.turns)) == (0.0, "env", 8)
    obs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert obs[0].startswith("[timeout") or obs[0].startswith("[runtime_error")
    assert obs[1].startswith("[timeout")
    assert obs[2].startswith("[output_limit") and len(obs[2]) < 1200
    assert "root:" not in obs[3] and "outside /repo" in obs[4]
    assert obs[5].startswith("error: unknown command 'explode'")
    with tracked_sandbox(monkeypatch):
        fill = _episode(renderer, task, [call("execute_bash", {
            "command": "for i in 1 2 3 4; do head -c 1900000 /dev/zero > f$i; done"}),
            call("finish", {})])
    assert fill.reward == 0.0 and "quota" in fill.info["reason"]


@pytest.mark.timeout(60)
def test_truncated_episode_is_scored_on_the_repository(monkeypatch, renderer, task):
    path, old, new = gold_edit(task)
    fix = call("str_replace_editor", {"command": "str_replace", "path": path, "old_str": old,
                                      "new_str": new})
    look = call("execute_bash", {"command": "ls"})
    with tracked_sandbox(monkeypatch):
        ep = _episode(renderer, task, [fix, look], EpisodeLimits(max_turns=2, max_tokens=20000,
                                                                 max_new_tokens=4000))
        assert (ep.ended_by, ep.reward, ep.finish_reason) == ("turns", 1.0, "length")
        ep = _episode(renderer, task, [look], EpisodeLimits(max_turns=2, max_tokens=20000,
                                                            max_new_tokens=4000))
        assert (ep.ended_by, ep.reward) == ("turns", 0.0)


TINY = {"functions": ARITH_FUNCTIONS, "n_functions": 1, "packages": ("calc",),
        "declare_tools": False}  # configs/tiny/swe_agent.json's task_args


@pytest.mark.timeout(60)
def test_tiny_task_family(monkeypatch):
    """One-line functions of add / mul / sub in ``calc/core.py``, the bug one operator (with
    two functions the bug's line occurs once: no function's line is another's bug); the fix
    candidates are the line with each of ``+ - *`` (the fix and the bug among them); the
    SWE-bench fields hold (FAIL_TO_PASS fail before the gold patch, everything passes after);
    the stage config's family is the same with one function."""
    assert C.load(ROOT / "configs" / "tiny" / "swe_agent.json").agentic.task_args == {
        **TINY, "functions": list(ARITH_FUNCTIONS), "packages": ["calc"]}
    tasks = swe_tasks(40, seed=3, **{**TINY, "n_functions": 2})
    assert {t["metadata"]["buggy_function"] for t in tasks} == set(ARITH_FUNCTIONS)
    for t in tasks:
        assert set(t["files"]) == {"calc/__init__.py", "calc/core.py", "tests/test_core.py"}
        assert not t["declare_tools"] and len(t["PASS_TO_PASS"]) == 2
        path, old, new = gold_edit(t)
        assert path == "calc/core.py" and t["files"][path].count(old) == 1
        assert [c for a, c in zip(old, new) if a != c] == [new[-3]]  # one operator differs
        cands = fix_candidates(t)
        assert len(cands) == 3 and new in cands and old in cands
        assert [c.replace("+", "-").replace("*", "-") for c in cands] == [new.replace(
            "+", "-").replace("*", "-")] * 3
    line = {"metadata": {"fix": ("    for x in xs[1:]:\n", "    for x in xs:\n")}}
    assert fix_candidates(line) == ["    for x in xs:"]  # no operator: the fix only
    fact = {"metadata": {"fix": FUNCTIONS["factorial"][1][::-1]}}
    assert fix_candidates(fact) == [f"    for k in range(1, n {o} 1):" for o in "+-*"]
    with tracked_sandbox(monkeypatch):
        for t in tasks[:2]:
            ids = t["FAIL_TO_PASS"] + t["PASS_TO_PASS"]
            with Workspace(materialize(t), LIMITS) as ws:
                assert ws.apply_patch(t["test_patch"]).ok
                out = ws.run_tests(ids).data["tests"]
                assert [out[i] for i in ids] == ["failed"] * 2 + ["passed"] * 2
            with Workspace(materialize(t), LIMITS) as ws:
                assert ws.apply_patch(t["patch"]).ok and evaluate_workspace(ws, t)[0] == 1.0
    with pytest.raises(ValueError, match=r"functions .*unknown: \['div'\]"):
        swe_tasks(1, functions=("add", "div"))
    with pytest.raises(ValueError, match=r"n_functions"):
        swe_tasks(1, functions=("add",), n_functions=2)
    with pytest.raises(ValueError, match=r"^n: must be >= 0, got -1"):
        swe_tasks(-1)
    with pytest.raises(ValueError, match=r"^packages: at least one"):
        swe_tasks(1, packages=())


@pytest.mark.timeout(120)
def test_swe_sft_rows_are_the_canonical_episode(monkeypatch, renderer):
    """Each row is the episode a scripted agent playing the row's three calls produces: the
    same messages and, rendered, the same tokens; rows writing the fix score 1, the others 0
    (for the arithmetic family every candidate but the fix leaves the bug). With the tool
    spec declared the rows carry it."""
    tok = renderer.tokenizer
    with tracked_sandbox(monkeypatch):
        rows = swe_sft_rows(6, seed=7, copy=0.5, limits=LIMITS, **TINY)
        for row, task in zip(rows, swe_tasks(6, seed=7, **TINY)):
            new = row["messages"][4]["tool_calls"][0]["function"]["arguments"]["new_str"]
            texts = [call(name, args) for name, args in swe_solution(task, new)]
            ep = _episode(renderer, task, texts)
            assert ep.canonical and row["messages"] == ep.messages and "tools" not in row
            assert ep.reward == float(new == gold_edit(task)[2]), ep.info
            _, ids, mask = render_chat(tok, row["messages"], thinking=False,
                                       add_generation_prompt=False)
            T = len(ep.tokens)  # the rendering ends with the template's newline after the stop
            assert tok.decode(ids[T:]) == "\n"
            np.testing.assert_array_equal(ids[:T], ep.tokens)
            # the SFT loss covers every sampled token of the episode (and the non-thinking
            # template's empty think block, which the episode's generation prompt holds)
            assert np.all(np.asarray(mask)[:T][ep.loss_mask == 1] == 1)
            extra = np.asarray(ids[:T])[(np.asarray(mask)[:T] == 1) & (ep.loss_mask == 0)]
            assert tok.decode(extra) == "<think></think>" * 3, tok.decode(extra)
            json.dumps(row)  # the jsonl source layout
        declared = swe_sft_rows(1, seed=7, limits=LIMITS)[0]
    assert declared["tools"] == list(SWE_TOOLS)
    with pytest.raises(ValueError, match=r"copy: .* got -0.1"):
        swe_sft_rows(2, copy=-0.1)


@pytest.mark.timeout(120)
def test_swe_sft_rows_copy_share(monkeypatch):
    """``copy`` is the share of rows writing the fix; the others a uniform draw of the three
    candidates, so a row fixes the task with chance ``copy + (1 - copy) / 3`` (4 binomial
    standard errors; exact at ``copy`` 1)."""
    n = 600
    tasks = swe_tasks(n, seed=5, **TINY)
    with tracked_sandbox(monkeypatch):
        for copy in (0.0, 0.5, 1.0):
            rows = swe_sft_rows(n, seed=5, copy=copy, limits=LIMITS, **TINY)
            news = [r["messages"][4]["tool_calls"][0]["function"]["arguments"]["new_str"]
                    for r in rows]
            assert all(x in fix_candidates(t) for x, t in zip(news, tasks))
            right = np.mean([x == gold_edit(t)[2] for x, t in zip(news, tasks)])
            want = copy + (1 - copy) / 3
            assert abs(right - want) <= 4 * np.sqrt(want * (1 - want) / n), (copy, right)
