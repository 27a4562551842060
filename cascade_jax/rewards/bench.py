"""Code-reward throughput: sandboxed test cases per second on this machine.

    python -m cascade_jax.rewards.bench [--programs 16] [--tests 8] [--workers N]

Scores ``programs`` correct a+b solutions with ``tests`` stdin/stdout cases each through
:class:`~cascade_jax.rewards.code.CodeScorer` (every case is one sandboxed process), for Python and
C++ (compile included, and reported separately), and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from cascade_jax.rewards import sandbox
from cascade_jax.rewards.code import CodeScorer

PY = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
CPP = ("```cpp\n#include <cstdio>\nint main(){long a,b;scanf(\"%ld %ld\",&a,&b);"
       "printf(\"%ld\\n\",a+b);}\n```")


def measure(response: str, programs: int, tests: int, workers: int) -> dict:
    cases = [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(tests)]
    # distinct program text per response so nothing could be cached across responses
    responses = [response.replace("\n```", f"\n{'//' if 'cpp' in response else '#'} {k}\n```")
                 for k in range(programs)]
    scorer = CodeScorer(workers=workers)
    t = time.perf_counter()
    scores = scorer(["p"] * programs, responses, [{"tests": cases}] * programs)
    dt = time.perf_counter() - t
    assert all(s.value == 1.0 for s in scores), [s.reason for s in scores if s.value != 1.0][:3]
    return {"programs": programs, "test_cases": programs * tests, "seconds": round(dt, 3),
            "test_cases_per_s": round(programs * tests / dt, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=16)
    ap.add_argument("--tests", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    measure(PY, 2, 2, args.workers)  # warm-up (imports, page cache)
    py = measure(PY, args.programs, args.tests, args.workers)
    cpp = measure(CPP, max(2, args.programs // 4), args.tests, args.workers)
    t = time.perf_counter()
    with sandbox.prepare(CPP.split("\n", 1)[1].rsplit("```", 1)[0], language="cpp") as p:
        assert p.error is None, p.error
    compile_s = time.perf_counter() - t
    out = {"cpu_count": os.cpu_count(), "workers": args.workers, "machine": platform.machine(),
           "python": py, "cpp_including_compile": cpp, "cpp_compile_s_one": round(compile_s, 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
