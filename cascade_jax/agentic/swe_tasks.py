"""Seeded small Python repositories with SWE-bench-format tasks (for tests and the tiny preset).

Each task is a one-module package with ``n_functions`` (default four) functions drawn from
``functions`` (default :data:`DEFAULT_FUNCTIONS`, names of :data:`FUNCTIONS`); one of them carries
an injected bug (a mutated line). The tiny preset's family (``configs/tiny/swe_agent.json``) is
``functions=ARITH_FUNCTIONS``, ``n_functions=1``, one package: one-line functions whose bug is a
one-operator change (``+``, ``-``, ``*``). Fields, as SWE-bench / SWE-Gym name them:

=====================  ==========================================================================
``instance_id``        ``tiny__<package>-<seed>-<n>``
``repo``               the package name
``files``              the repository snapshot ``{path: text}`` (the buggy package, its
                       ``tests/test_core.py`` covering the correct functions)
``problem_statement``  the issue: the buggy function, an input, the expected and the actual result
``patch``              the gold fix (unified diff, ``a/`` ``b/`` prefixes)
``test_patch``         adds ``tests/test_issue.py`` with the tests of the buggy function
``FAIL_TO_PASS``       test ids of ``tests/test_issue.py`` (fail before the fix, pass after)
``PASS_TO_PASS``       test ids of ``tests/test_core.py`` (pass before and after)
=====================  ==========================================================================

Test ids are pytest-style ``path::function`` (:meth:`~cascade_jax.agentic.tools.Workspace.
run_tests`). Expected values come from running the correct function on seeded inputs; the
failing tests use inputs on which the bug changes the result (checked at generation).
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Mapping

import numpy as np

__all__ = ["FUNCTIONS", "DEFAULT_FUNCTIONS", "ARITH_FUNCTIONS", "OPERATORS", "swe_tasks",
           "unified_diff", "materialize", "gold_edit", "fix_candidates"]

#: name -> (correct source, (correct line, buggy line), input generator name)
FUNCTIONS = {
    "total": ("def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
              ("    for x in xs:\n", "    for x in xs[1:]:\n"), "list"),
    "maximum": ("def maximum(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n"
                "            best = x\n    return best\n",
                ("        if x > best:\n", "        if x < best:\n"), "list"),
    "is_even": ("def is_even(n):\n    return n % 2 == 0\n",
                ("    return n % 2 == 0\n", "    return n % 2 == 1\n"), "int"),
    "clamp": ("def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
              ("    return max(lo, min(x, hi))\n", "    return min(lo, max(x, hi))\n"), "clamp"),
    "mean": ("def mean(xs):\n    return sum(xs) / len(xs)\n",
             ("    return sum(xs) / len(xs)\n", "    return sum(xs) / (len(xs) + 1)\n"), "list"),
    "factorial": ("def factorial(n):\n    out = 1\n    for k in range(1, n + 1):\n        out *= k\n"
                  "    return out\n",
                  ("    for k in range(1, n + 1):\n", "    for k in range(1, n):\n"), "small"),
    "reverse_words": ("def reverse_words(text):\n    return ' '.join(text.split()[::-1])\n",
                      ("    return ' '.join(text.split()[::-1])\n",
                       "    return ' '.join(text.split()[1::-1])\n"), "words"),
    "add": ("def add(a, b):\n    return a + b\n",
            ("    return a + b\n", "    return a - b\n"), "pair"),
    "sub": ("def sub(x, y):\n    return x - y\n",
            ("    return x - y\n", "    return x + y\n"), "pair"),
    "mul": ("def mul(m, n):\n    return m * n\n",
            ("    return m * n\n", "    return m + n\n"), "pair"),
}
#: the default draw (the four-function repositories)
DEFAULT_FUNCTIONS = ("clamp", "factorial", "is_even", "maximum", "mean", "reverse_words", "total")
#: the tiny preset's one-line functions (the bug: one operator of :data:`OPERATORS`; distinct
#: argument names, so no function's line is another's buggy line)
ARITH_FUNCTIONS = ("add", "mul", "sub")
#: the operators a fix candidate may put in the bug's line (:func:`fix_candidates`)
OPERATORS = ("+", "-", "*")
_PACKAGES = ("mathkit", "numtools", "calclib", "arith", "smallops", "listutil")
_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree")


def _inputs(kind: str, rng: np.random.Generator) -> tuple:
    if kind == "list":
        return ([int(v) for v in rng.integers(-9, 10, int(rng.integers(2, 6)))],)
    if kind == "int":
        return (int(rng.integers(-50, 50)),)
    if kind == "pair":
        return (int(rng.integers(1, 10)), int(rng.integers(1, 10)))
    if kind == "small":
        return (int(rng.integers(2, 7)),)
    if kind == "clamp":
        lo = int(rng.integers(-5, 3))
        return (int(rng.integers(-10, 10)), lo, lo + int(rng.integers(1, 8)))
    if kind == "words":
        return (" ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(3, 6)))),)
    raise ValueError(f"unknown input kind {kind!r}")


def _call(src: str, name: str, args: tuple):
    ns: dict = {}
    exec(src, ns)  # the generator's own source text (FUNCTIONS), never model output
    return ns[name](*args)


def unified_diff(path: str, before: str, after: str) -> str:
    """A ``git diff``-style unified diff of one file (``/dev/null`` for a new file)."""
    src = "/dev/null" if before == "" else f"a/{path}"
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        src, f"b/{path}"))


def _test_fn(test_name: str, fn: str, args: tuple, expected) -> str:
    return f"def {test_name}():\n    assert {fn}(*{args!r}) == {expected!r}\n"


def swe_tasks(n: int, seed: int = 0, *, functions=DEFAULT_FUNCTIONS, n_functions: int = 4,
              packages=_PACKAGES, declare_tools: bool = True) -> list[dict]:
    """``n`` task rows (module doc), deterministic in ``seed``: each a package named from
    ``packages`` with ``n_functions`` distinct functions of ``functions`` (names of
    :data:`FUNCTIONS`), one of them buggy. ``declare_tools=False`` marks the tasks to start
    without the tool spec in the prompt (the template's ~1,000-token tool block): a model SFT'd
    on the scaffold's canonical episodes knows the tools (the tiny stage's short rows)."""
    functions, packages = tuple(functions), tuple(packages)
    unknown = [f for f in functions if f not in FUNCTIONS]
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if unknown:
        raise ValueError(f"functions: names of functions in FUNCTIONS, unknown: {unknown}")
    if not 1 <= n_functions <= len(functions):
        raise ValueError(f"n_functions: must be in [1, {len(functions)}] (the functions given), "
                         f"got {n_functions}")
    if not packages:
        raise ValueError("packages: at least one package name")
    rng = np.random.default_rng(seed)
    names = sorted(functions)
    out = []
    for t in range(n):
        pkg = packages[int(rng.integers(0, len(packages)))]
        chosen = [names[int(i)] for i in rng.choice(len(names), size=n_functions, replace=False)]
        bug = chosen[int(rng.integers(0, n_functions))]
        good_src = "\n\n".join(FUNCTIONS[f][0] for f in chosen)
        right, wrong = FUNCTIONS[bug][1]
        bug_src = FUNCTIONS[bug][0].replace(right, wrong)
        module = "\n\n".join(bug_src if f == bug else FUNCTIONS[f][0] for f in chosen)
        header = f"from {pkg}.core import " + ", ".join(chosen) + "\n\n\n"
        core_tests, p2p = [], []
        for f in chosen:
            if f == bug:
                continue
            for j in range(2):
                args = _inputs(FUNCTIONS[f][2], rng)
                name = f"test_{f}_{j}"
                core_tests.append(_test_fn(name, f, args, _call(FUNCTIONS[f][0], f, args)))
                p2p.append(f"tests/test_core.py::{name}")
        issue_tests, f2p, shown = [], [], None
        while len(issue_tests) < 2:
            args = _inputs(FUNCTIONS[bug][2], rng)
            want, got = _call(FUNCTIONS[bug][0], bug, args), _call(bug_src, bug, args)
            if want == got:
                continue
            name = f"test_{bug}_issue_{len(issue_tests)}"
            issue_tests.append(_test_fn(name, bug, args, want))
            f2p.append(f"tests/test_issue.py::{name}")
            shown = shown or (args, want, got)
        files = {f"{pkg}/__init__.py": "", f"{pkg}/core.py": module,
                 "tests/test_core.py": header + "\n\n".join(core_tests)}
        issue_file = f"from {pkg}.core import {bug}\n\n\n" + "\n\n".join(issue_tests)
        args, want, got = shown
        call = f"{bug}({', '.join(repr(a) for a in args)})"
        out.append({
            "instance_id": f"tiny__{pkg}-{seed}-{t}",
            "repo": pkg,
            "files": files,
            "problem_statement": f"`{call}` in `{pkg}/core.py` returns {got!r}, but it should "
                                 f"return {want!r}. Please fix `{bug}`.",
            "patch": unified_diff(f"{pkg}/core.py", module, good_src),
            "test_patch": unified_diff("tests/test_issue.py", "", issue_file),
            "FAIL_TO_PASS": f2p,
            "PASS_TO_PASS": p2p,
            "metadata": {"buggy_function": bug, "fix": (wrong, right), "module": f"{pkg}/core.py"},
            "declare_tools": bool(declare_tools),
        })
    return out


def gold_edit(task: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(path, old_str, new_str)``: the gold fix as one string replacement."""
    meta = task["metadata"]
    wrong, right = meta["fix"]
    return meta["module"], wrong.rstrip("\n"), right.rstrip("\n")


def fix_candidates(task: Mapping[str, Any]) -> list[str]:
    """The replacements of the bug's line a demonstrator may write (``new_str``, no newline):
    the correct line with its first operator of :data:`OPERATORS` replaced by each of them, in
    that order (one is the fix, one the bug itself for a one-operator bug); a line without such
    an operator has the fix as its only candidate."""
    right = task["metadata"]["fix"][1].rstrip("\n")
    hits = [(right.find(f" {op} "), op) for op in OPERATORS if f" {op} " in right]
    if not hits:
        return [right]
    at, op = min(hits)
    return [right[:at] + f" {o} " + right[at + len(op) + 2:] for o in OPERATORS]


_SNAPSHOTS: dict = {}
_SNAP_LOCK = threading.Lock()


@atexit.register
def _remove_snapshots() -> None:
    for d in _SNAPSHOTS.values():
        shutil.rmtree(d, ignore_errors=True)


def materialize(task: Mapping[str, Any]) -> str:
    """A host directory holding the task's repository snapshot: ``task["repo_dir"]`` when given
    (a checkout), else ``task["files"]`` written once per process into a temp directory (cached
    by the files' hash, removed at exit). The snapshot is never modified (episodes copy it)."""
    if task.get("repo_dir"):
        d = str(task["repo_dir"])
        if not os.path.isdir(d):
            raise ValueError(f"repo_dir: {d!r} is not a directory")
        return d
    files = task.get("files")
    if not isinstance(files, Mapping) or not files:
        raise ValueError("files: a task needs 'files' ({path: text}) or 'repo_dir'")
    key = hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()
    with _SNAP_LOCK:
        d = _SNAPSHOTS.get(key)
        if d is not None and os.path.isdir(d):
            return d
        d = tempfile.mkdtemp(prefix="cascade-agentic-snapshot-")
        os.chmod(d, 0o755)
        for path, text in files.items():
            if os.path.isabs(path) or ".." in path.split("/"):
                raise ValueError(f"files: path {path!r} must be relative, without '..'")
            full = os.path.join(d, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(text)
        _SNAPSHOTS[key] = d
        return d
