"""A minimal OpenHands-style SWE agent environment over SWE-bench-format tasks.

Scaffold (the tools OpenHands' CodeAct agent declares, reduced to their core):

* ``execute_bash(command)``: run a shell command in the repository (``/repo``) in the sandbox;
* ``str_replace_editor(command, path, old_str, new_str, file_text, view_range)``: ``view`` a
  file (with line numbers) or directory, ``create`` a file, ``str_replace`` one exact
  occurrence;
* ``finish()``: end the episode.

A turn without a tool call also ends the episode (the answer is ignored: only the repository
state counts). Every call runs in the bubblewrap sandbox on the episode's own writable copy of the
snapshot (:class:`~cascade_jax.agentic.tools.Workspace`); hostile or failing calls are error
observations.

Reward (:meth:`SWEEnv.score_answer`, also for a truncated episode), SWE-bench's harness in
small: the test files of the snapshot are written back over the copy and the files the test
patch creates are removed (the agent's edits to tests are discarded), the task's ``test_patch``
is applied (``patch -p1`` in the sandbox), and the
``FAIL_TO_PASS`` + ``PASS_TO_PASS`` tests run in the sandbox (:meth:`Workspace.run_tests`):
reward 1 iff every one passes; 0 if the copy went over its disk quota, the patch does not apply,
or any test fails or errors. ``info`` carries the per-test outcomes. The task row may list
``FAIL_TO_PASS`` / ``PASS_TO_PASS`` as lists or as JSON strings (as SWE-bench stores them).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Mapping, Optional

import numpy as np

from .env import Reset, Tool, ToolEnvironment, tool_spec
from .render import AssistantTurn
from .swe_tasks import fix_candidates, gold_edit, materialize, swe_tasks
from .tools import REPO_MOUNT, ToolLimits, Workspace

__all__ = ["SWEEnv", "SWE_TOOLS", "SWE_SYSTEM", "task_test_ids", "evaluate_workspace",
           "swe_prompt", "swe_solution", "swe_sft_rows"]

SWE_SYSTEM = ("You are a software engineer. The repository is checked out at /repo. Fix the issue "
              "the user describes by editing the code with the tools; run commands to explore "
              "and test. Call finish when done.")

SWE_TOOLS = (
    tool_spec("execute_bash", "Run a shell command in /repo and return its output.",
              {"command": ("string", "the shell command")}, required=["command"]),
    tool_spec("str_replace_editor", "View, create or edit files in /repo.",
              {"command": ("string", "view, create or str_replace"),
               "path": ("string", "path relative to /repo"),
               "old_str": ("string", "str_replace: the exact text to replace (must occur once)"),
               "new_str": ("string", "str_replace: the replacement"),
               "file_text": ("string", "create: the file's content"),
               "view_range": ("string", "view: [start, end] line numbers")},
              required=["command", "path"]),
    tool_spec("finish", "Finish: the repository is fixed.", {}),
)


def task_test_ids(task: Mapping[str, Any], field: str) -> list[str]:
    """``task[field]`` (``FAIL_TO_PASS`` / ``PASS_TO_PASS``) as a list of test ids."""
    v = task.get(field, [])
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise ValueError(f"{field}: not a JSON list of test ids") from None
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise ValueError(f"{field}: expected a list of test ids")
    return v


def evaluate_workspace(ws: Workspace, task: Mapping[str, Any]) -> tuple[float, dict]:
    """Reward and info of the copy's current state (module doc)."""
    if ws.over_quota:
        return 0.0, {"reason": "the repository copy went over its disk quota"}
    snapshot = task.get("files") or {}
    tests = {p: t for p, t in snapshot.items() if p.startswith("tests/")}
    created = [p for p in re.findall(r"^\+\+\+ b/(\S+)", task.get("test_patch") or "", re.M)
               if p not in snapshot]
    if created:  # files the test patch creates: whatever the agent put there goes
        r = ws.run_shell("rm -f -- " + " ".join(shlex.quote(p) for p in created))
        if not r.ok:
            return 0.0, {"reason": f"could not clear the test patch's files: {r.text[:200]}"}
    if tests:
        r = ws.write_files(tests)
        if not r.ok:
            return 0.0, {"reason": f"could not restore the test files: {r.text[:200]}"}
    if task.get("test_patch"):
        r = ws.apply_patch(task["test_patch"])
        if not r.ok:
            return 0.0, {"reason": f"the test patch does not apply: {r.text[:200]}"}
    ids = task_test_ids(task, "FAIL_TO_PASS") + task_test_ids(task, "PASS_TO_PASS")
    if not ids:
        raise ValueError("FAIL_TO_PASS / PASS_TO_PASS: the task lists no tests")
    r = ws.run_tests(ids)
    outcome = r.data["tests"] if r.data else {t: "error" for t in ids}
    passed = all(outcome.get(t) == "passed" for t in ids)
    failing = [t for t in ids if outcome.get(t) != "passed"]
    return float(passed), {"reason": "all tests pass" if passed else f"failing: {failing}",
                           "tests": outcome}


def swe_prompt(task: Mapping[str, Any]) -> tuple[dict, dict]:
    """The episode's first messages: the system prompt and the issue."""
    user = (f"<issue>\n{task['problem_statement']}\n</issue>\n"
            f"The repository is at {REPO_MOUNT}. Fix the issue.")
    return {"role": "system", "content": SWE_SYSTEM}, {"role": "user", "content": user}


class SWEEnv(ToolEnvironment):
    """One SWE episode (module doc). ``limits``: the tools' sandbox limits and quotas."""

    finish_tool = "finish"

    def __init__(self, limits: ToolLimits = ToolLimits()):
        super().__init__()
        self.limits = limits
        self.ws: Optional[Workspace] = None
        self.task: Mapping[str, Any] = {}
        self.tools = {"execute_bash": Tool(SWE_TOOLS[0], self._bash),
                      "str_replace_editor": Tool(SWE_TOOLS[1], self._editor),
                      "finish": Tool(SWE_TOOLS[2], lambda: "")}

    def reset(self, task: Mapping[str, Any]) -> Reset:
        if not isinstance(task.get("problem_statement"), str):
            raise ValueError("problem_statement: a SWE task needs the issue text")
        self.task = task
        self.ws = Workspace(materialize(task), self.limits)
        return Reset(swe_prompt(task), SWE_TOOLS if task.get("declare_tools", True) else None)

    def _bash(self, command: str) -> str:
        return self.ws.run_shell(command).text

    def _editor(self, command: str, path: str, old_str: Optional[str] = None,
                new_str: Optional[str] = None, file_text: Optional[str] = None,
                view_range: Optional[str] = None) -> str:
        if command == "view":
            rng = None
            if view_range is not None:
                try:
                    rng = [int(v) for v in json.loads(view_range)]
                except (ValueError, TypeError):
                    return "error: view_range must be a JSON list [start, end]"
            return self.ws.view(path, rng).text
        if command == "create":
            if file_text is None:
                return "error: create needs file_text"
            return self.ws.create(path, file_text).text
        if command == "str_replace":
            if old_str is None:
                return "error: str_replace needs old_str"
            return self.ws.str_replace(path, old_str, new_str or "").text
        return f"error: unknown command {command!r} (view, create, str_replace)"

    def score_answer(self, turn: Optional[AssistantTurn]) -> tuple[float, str]:
        reward, self.final_info = evaluate_workspace(self.ws, self.task)
        return reward, self.final_info["reason"]

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def swe_solution(task: Mapping[str, Any], new_str: Optional[str] = None) -> list[tuple[str, dict]]:
    """The canonical episode's tool calls ``[(name, arguments)]``: view the module, replace the
    bug's line by ``new_str`` (default the fix, :func:`~.swe_tasks.gold_edit`), finish."""
    path, old, fix = gold_edit(task)
    return [("str_replace_editor", {"command": "view", "path": path}),
            ("str_replace_editor", {"command": "str_replace", "path": path, "old_str": old,
                                    "new_str": fix if new_str is None else new_str}),
            ("finish", {})]


def swe_sft_rows(n: int, seed: int = 0, *, copy: float = 1.0, limits: ToolLimits = ToolLimits(),
                 **task_args) -> list[dict]:
    """``n`` SFT rows ``{"messages"[, "tools"]}`` (the ``jsonl`` source layout): the canonical
    episode (:func:`swe_solution`) of :func:`~.swe_tasks.swe_tasks` ``(n, seed, **task_args)`` as
    the episode renders it (system, issue, three assistant tool calls, the tools' observations).
    The observations are the real tools' output in the sandbox (one run per distinct module
    text and edit: the only inputs of the view and the replacement). ``copy``: the share of
    rows whose replacement is the fix; the others replace the bug's line by a uniform draw from
    :func:`~.swe_tasks.fix_candidates` (seeded by ``seed``; one of three is the fix for the
    arithmetic family), so a warm start learns the scaffold from a demonstrator that fixes the
    task with chance ``copy + (1 - copy) / 3``."""
    if not 0.0 <= copy <= 1.0:
        raise ValueError(f"copy: the share of rows writing the fix must be in [0, 1], got {copy}")
    draw = np.random.default_rng([seed, 1])
    seen: dict = {}
    rows = []
    for task in swe_tasks(n, seed=seed, **task_args):
        cands = fix_candidates(task)
        pick = cands[int(draw.integers(0, len(cands)))]
        new_str = gold_edit(task)[2] if draw.random() < copy else pick
        calls = swe_solution(task, new_str)
        key = json.dumps([task["files"][calls[0][1]["path"]], calls], sort_keys=True)
        if key not in seen:
            env = SWEEnv(limits)
            try:
                env.reset(task)
                seen[key] = [env.call(name, a) for name, a in calls[:-1]]
            finally:
                env.close()
        msgs = list(swe_prompt(task))
        for (name, args), obs in zip(calls, seen[key] + [None]):
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": args}}]})
            if obs is not None:
                msgs.append({"role": "tool", "content": obs})
        rows.append({"messages": msgs,
                     **({"tools": list(SWE_TOOLS)} if task["declare_tools"] else {})})
    return rows
