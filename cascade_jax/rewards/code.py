"""``code``: run model-written programs against test cases in the sandbox.

Metadata:
* ``tests`` — list of test cases, either
  - stdin/stdout style: ``{"input": str, "output": str}``, or
  - function-call style (Python only; needs ``fn_name``): ``{"args": [...], "kwargs": {...},
    "expected": <JSON value>}``;
* ``fn_name`` — function to call (a top-level function, or a method of ``class Solution``
  as in LeetCode-style data); its presence selects the function-call style;
* ``language`` — ``"python"`` or ``"cpp"``; default: the language of the code fence;
* ``expression`` — if true, the answer is one Python expression (fenced, or the bare final answer)
  and the program is ``print(<expression>)`` (the tiny preset's code domain);
* ``limits`` — optional overrides of :class:`~cascade_jax.rewards.sandbox.Limits` per test
  (e.g. ``{"wall_s": 2, "cpu_s": 1}``).

Rules:
1. The program is the last fenced code block (```` ```python ````, ```` ```py ````,
   ```` ```cpp ````, ```` ```c++ ````) of the final answer (after ``</think>``); no block scores 0.
2. Every test runs in a fresh sandbox process (C++ is compiled once per response, also sandboxed).
3. stdin/stdout: whitespace-separated tokens must match; tokens where the expected one is a
   decimal/exponent number compare with tolerance ``1e-6`` (absolute or relative).
   Function-call: the return value, JSON-encoded, must equal ``expected`` (lists == tuples,
   ``1 == 1.0``, floats within ``1e-6``); prints by the program are ignored.
4. Reward = 1 iff every test passes (the paper's strict binary reward); ``metrics`` carry
   ``pass_fraction``, ``n_tests``, ``n_passed``, ``compile_error``, ``n_timeouts``.

:class:`CodeScorer` is the batch scorer: one thread pool (``workers``, default the CPU count)
runs the compile jobs and then every (response, test) pair of the batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import re
import threading
from typing import Any, Mapping, Optional, Sequence

from cascade_jax.rewards import sandbox
from cascade_jax.rewards.base import (NO_ANSWER, MetadataError, Score, check_batch, final_answer,
                                      require, values_match)

__all__ = ["CodeScorer", "score_code", "extract_program", "outputs_match", "values_match"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9+#]*)[^\n]*\n(.*?)```", re.S)
_LANG = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp",
         "cxx": "cpp", "cc": "cpp"}
_RESULT_MARK = "\x1e__CASCADE_RESULT__"
_FLOAT_TOKEN = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)")


def extract_program(text: str) -> Optional[tuple[str, str]]:
    """``(code, language)`` of the last fenced Python/C++ block, or ``None``."""
    found = [(code, _LANG[lang.lower()]) for lang, code in _FENCE.findall(text)
             if lang.lower() in _LANG]
    return found[-1] if found else None




def outputs_match(got: str, expected: str, tol: float = 1e-6) -> bool:
    """Token-wise comparison of program output with the expected output (rules above)."""
    a, b = got.split(), expected.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if not _FLOAT_TOKEN.fullmatch(y):
            return False
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not (abs(fx - fy) <= tol or abs(fx - fy) <= tol * abs(fy)):
            return False
    return True


def _function_harness(program: str, fn_name: str) -> str:
    """Append a driver that reads ``{"args", "kwargs"}`` JSON on stdin, calls ``fn_name`` and
    prints the JSON result after a marker (so the program's own prints do not interfere)."""
    return program + f"""

# ---- cascade-jax test harness ----
def _cascade_main():
    import json as _json, sys as _sys
    _call = _json.loads(_sys.stdin.read())
    _g = globals()
    if {fn_name!r} in _g and callable(_g[{fn_name!r}]):
        _f = _g[{fn_name!r}]
    elif "Solution" in _g and hasattr(_g["Solution"], {fn_name!r}):
        _f = getattr(_g["Solution"](), {fn_name!r})
    else:
        raise SystemExit("function {fn_name} is not defined")
    _out = _f(*_call.get("args", []), **_call.get("kwargs", {{}}))
    _sys.stdout.write({_RESULT_MARK!r} + _json.dumps(_out, default=list) + "\\n")

_cascade_main()
"""


@dataclasses.dataclass(frozen=True)
class _Item:
    program: str
    language: str
    tests: tuple
    fn_name: Optional[str]
    limits: sandbox.Limits


def _parse_item(response: str, meta: Mapping[str, Any]) -> _Item | Score:
    tests = require(meta, "tests", list)
    if not tests:
        raise MetadataError("field 'tests': empty")
    fn_name = meta.get("fn_name")
    for j, t in enumerate(tests):
        if not isinstance(t, Mapping):
            raise MetadataError(f"field 'tests[{j}]': expected a mapping")
        need = ("args", "expected") if fn_name else ("input", "output")
        for k in need:
            if k not in t:
                raise MetadataError(f"field 'tests[{j}]': missing {k!r} "
                                    f"({'function-call' if fn_name else 'stdin/stdout'} style)")
    try:
        limits = dataclasses.replace(sandbox.DEFAULT_LIMITS, **dict(meta.get("limits") or {}))
    except TypeError as e:
        raise MetadataError(f"field 'limits': {e}") from e
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER, _metrics(len(tests), 0))
    found = extract_program(final)
    if found is None and meta.get("expression") and final.strip():
        found = (final.strip().strip("`").strip(), "python")
    if found is None:
        return Score(0.0, "no ```python or ```cpp code block in the final answer",
                     _metrics(len(tests), 0))
    code, fence_lang = found
    language = meta.get("language") or fence_lang
    if language not in sandbox.LANGUAGES:
        raise MetadataError(f"field 'language': must be one of {sandbox.LANGUAGES}")
    if fn_name and language != "python":
        raise MetadataError("function-call tests ('fn_name') are supported for Python only")
    if fn_name:
        code = _function_harness(code, str(fn_name))
    elif meta.get("expression"):
        if language != "python":
            raise MetadataError("'expression' items are Python only")
        code = f"print(eval(compile({code.strip()!r}, '<expression>', 'eval')))"
    return _Item(code, language, tuple(tests), fn_name, limits)


def _metrics(n: int, passed: int, compile_error: bool = False, timeouts: int = 0) -> dict:
    return {"pass_fraction": passed / n if n else 0.0, "n_tests": float(n),
            "n_passed": float(passed), "compile_error": float(compile_error),
            "n_timeouts": float(timeouts)}


def _short(s: str, n: int = 60) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "…")


def _judge_test(item: _Item, test: Mapping[str, Any], res: sandbox.Result) -> tuple[bool, str]:
    if res.status != "ok":
        return False, f"{res.status}: {res.reason}"
    if item.fn_name:
        out = res.stdout
        if _RESULT_MARK not in out:
            return False, "no return value (harness marker missing)"
        try:
            got = json.loads(out.rsplit(_RESULT_MARK, 1)[1])
        except ValueError as e:
            return False, f"return value is not JSON-serialisable: {e}"
        if values_match(got, test["expected"]):
            return True, "passed"
        return False, f"wrong answer: expected {_short(json.dumps(test['expected']))}, " \
                      f"got {_short(json.dumps(got))}"
    if outputs_match(res.stdout, str(test["output"])):
        return True, "passed"
    return False, f"wrong answer: expected {_short(str(test['output']))}, got {_short(res.stdout)}"


@dataclasses.dataclass
class CodeScorer:
    """Batch code scorer (the :class:`~cascade_jax.rewards.base.Scorer` of ``code``).

    ``workers`` threads run sandbox jobs (each a separate process, so threads give real
    parallelism); ``stop_on_first_failure`` skips the remaining tests of a response once one fails
    (cheaper; the reward is unchanged, ``pass_fraction`` then counts skipped tests as failed)."""

    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 2)
    stop_on_first_failure: bool = False
    compile_limits: sandbox.Limits = sandbox.COMPILE_LIMITS

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[Score]:
        check_batch(prompts, responses, metadata)
        parsed: list[_Item | Score] = []
        for i, (r, m) in enumerate(zip(responses, metadata)):
            try:
                parsed.append(_parse_item(r, m))
            except MetadataError as e:
                raise MetadataError(f"metadata[{i}]: {e}") from e
        prep: dict[int, cf.Future] = {}
        try:
            with cf.ThreadPoolExecutor(max_workers=max(1, self.workers),
                                       thread_name_prefix="code-sandbox") as pool:
                prep = {i: pool.submit(sandbox.prepare, it.program, language=it.language,
                                       compile_limits=self.compile_limits)
                        for i, it in enumerate(parsed) if isinstance(it, _Item)}
                failed = {i: threading.Event() for i in prep}
                runs: dict[int, list[cf.Future]] = {}
                for i, fut in prep.items():
                    item = parsed[i]
                    runs[i] = [pool.submit(self._run_test, item, fut.result(), t, failed[i])
                               for t in item.tests]
                return [it if isinstance(it, Score) else
                        self._aggregate(it, prep[i].result(), [f.result() for f in runs[i]])
                        for i, it in enumerate(parsed)]
        finally:
            # the pool has finished every job: close each program directory that was created,
            # also when another item's preparation raised
            for fut in prep.values():
                if not fut.cancelled() and fut.exception() is None:
                    fut.result().close()

    def _run_test(self, item: _Item, prepared: sandbox.Prepared, test: Mapping[str, Any],
                  failed: threading.Event) -> Optional[tuple[bool, str, sandbox.Result]]:
        if self.stop_on_first_failure and failed.is_set():
            return None
        if item.fn_name:
            stdin = json.dumps({"args": list(test["args"]), "kwargs": dict(test.get("kwargs", {}))})
        else:
            stdin = str(test["input"])
        res = sandbox.run_prepared(prepared, stdin, item.limits)
        ok, why = _judge_test(item, test, res)
        if not ok:
            failed.set()
        return ok, why, res

    @staticmethod
    def _aggregate(item: _Item, prepared: sandbox.Prepared, results: list) -> Score:
        n = len(item.tests)
        if prepared.error is not None:
            return Score(0.0, prepared.error.reason, _metrics(n, 0, compile_error=True))
        passed = sum(1 for r in results if r is not None and r[0])
        timeouts = sum(1 for r in results if r is not None and r[2].status == "timeout")
        metrics = _metrics(n, passed, timeouts=timeouts)
        if passed == n:
            return Score(1.0, f"all {n} tests passed", metrics)
        first = next(j for j, r in enumerate(results) if r is not None and not r[0])
        return Score(0.0, f"{passed}/{n} tests passed; test {first}: {results[first][1]}", metrics)


def score_code(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    """Score one response (runs its tests on a pool of CPU-count workers)."""
    return CodeScorer()([prompt], [response], [meta])[0]
