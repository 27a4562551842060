"""The SWE agent loop with scripted agents, and the seeded task generator.

* generated tasks: deterministic in the seed; on the snapshot the FAIL_TO_PASS tests fail and the
  PASS_TO_PASS tests pass; with the gold patch applied every test passes;
* scripted agents: the correct fix (explore, view, str_replace, finish) gets reward 1; a wrong
  fix 0; an agent that rewrites the tests to pass 0 (the harness restores them); a hostile agent
  (fork bomb, infinite loop, flood, deleting the repository, filling the disk) 0 without a
  crash; truncated episodes are scored on the repository as it is.
"""

import pytest

from cascade_jax.agentic.episode import EpisodeLimits, ScriptedPolicy, run_episode
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.agentic.swe import SWE_TOOLS, SWEEnv, evaluate_workspace, task_test_ids
from cascade_jax.agentic.swe_tasks import gold_edit, materialize, swe_tasks
from cascade_jax.agentic.tools import ToolLimits, Workspace
from cascade_jax.data.tokenizer import tiny_tokenizer
from cascade_jax.rewards import sandbox
from cascade_jax.rewards.tool_call import format_tool_call as call
from tests.rewards.support import tracked_sandbox

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
