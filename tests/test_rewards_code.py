"""Code scorer: stdin/stdout and function-call tests, Python and C++, binary reward plus
partial-pass metrics, on the sandbox worker pool."""

import pytest

from cascade_jax.rewards import MetadataError, make_scorer
from cascade_jax.rewards.code import CodeScorer, extract_program, outputs_match, values_match

ADD_TESTS = [{"input": f"{i} {2 * i}\n", "output": f"{3 * i}\n"} for i in range(4)]


def _py(src):
    return f"<think>plan</think>Here:\n```python\n{src}\n```"


@pytest.mark.timeout(60)
def test_stdio_python_and_cpp_with_partial_metrics():
    responses = [
        _py("a, b = map(int, input().split())\nprint(a + b)"),
        _py("a, b = map(int, input().split())\nprint(a + b if a else 1)"),   # fails test 0
        "```cpp\n#include <cstdio>\nint main(){long a,b;scanf(\"%ld %ld\",&a,&b);"
        "printf(\"%ld\\n\",a+b);}\n```",
        "```cpp\nint main() { return }\n```",                               # compile error
        "<think>```python\nprint(0)\n```</think>I cannot solve this.",      # code only in reasoning
        _py("import sys\nprint(int(sys.stdin.read().split()[0]) * 3)"),
    ]
    out = make_scorer("code", workers=2)(["p"] * 6, responses, [{"tests": ADD_TESTS}] * 6)
    assert [s.value for s in out] == [1, 0, 1, 0, 0, 1]
    assert out[1].metrics["pass_fraction"] == 0.75 and "test 0: wrong answer" in out[1].reason
    assert out[3].metrics["compile_error"] == 1 and "compilation failed" in out[3].reason
    assert "no ```python or ```cpp code block" in out[4].reason
    assert out[0].metrics == {"pass_fraction": 1.0, "n_tests": 4.0, "n_passed": 4.0,
                              "compile_error": 0.0, "n_timeouts": 0.0}


@pytest.mark.timeout(60)
def test_function_call_style():
    meta = {"fn_name": "two_sum", "tests": [
        {"args": [[2, 7, 11, 15], 9], "expected": [0, 1]},
        {"args": [[3, 2, 4], 6], "expected": [1, 2]},
        {"args": [], "kwargs": {"nums": [3, 3], "target": 6}, "expected": [0, 1]}]}
    solution = ("class Solution:\n    def two_sum(self, nums, target):\n        print('debug')\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n"
                "            if target - x in seen:\n                return (seen[target - x], i)\n"
                "            seen[x] = i\n")
    top_level = "def two_sum(nums, target):\n    return [0, 1]"
    missing = "def other(nums, target):\n    return [0, 1]"
    out = CodeScorer(workers=2)(["p"] * 3, [_py(solution), _py(top_level), _py(missing)],
                                [meta] * 3)
    assert out[0].value == 1, out[0].reason
    assert out[1].value == 0 and out[1].metrics["n_passed"] == 2
    assert out[2].value == 0 and "not defined" in out[2].reason
    with pytest.raises(MetadataError, match="Python only"):
        CodeScorer()(["p"], ["```cpp\nint main(){}\n```"], [meta])


@pytest.mark.timeout(60)
def test_expression_mode_and_stop_on_first_failure():
    meta = {"tests": [{"input": "", "output": "12"}], "expression": True}
    out = CodeScorer(workers=2)(["p"] * 4, ["```python\n3 * 4\n```", "<think>x</think>6+6",
                                            "13", "```python\nimport os\n```"], [meta] * 4)
    assert [s.value for s in out] == [1, 1, 0, 0]
    slow_tests = [{"input": "", "output": "never"}] * 6
    s = CodeScorer(workers=1, stop_on_first_failure=True)(
        ["p"], [_py("print('x')")], [{"tests": slow_tests}])[0]
    assert s.value == 0 and s.metrics["n_passed"] == 0


def test_metadata_errors():
    with pytest.raises(MetadataError, match=r"metadata\[0\]: field 'tests\[0\]': missing 'output'"):
        CodeScorer()(["p"], [_py("print(1)")], [{"tests": [{"input": ""}]}])
    with pytest.raises(MetadataError, match="limits"):
        CodeScorer()(["p"], [_py("print(1)")], [{"tests": ADD_TESTS, "limits": {"bogus": 1}}])


def test_comparison_rules():
    assert outputs_match("3\n 4 ", "3 4\n") and not outputs_match("3 4 5", "3 4")
    assert outputs_match("0.3333333", "0.333333333") and not outputs_match("0.34", "0.333333")
    assert not outputs_match("1", "1.5") and not outputs_match("abc", "abd")
    assert values_match((1, [2.0000000001]), [1, [2]]) and not values_match(True, 1)
    assert values_match({"a": [1]}, {"a": [1]}) and not values_match(float("nan"), float("nan"))
    assert extract_program("```py\nprint(1)\n```\n```c++\nint main(){}\n```") == (
        "int main(){}\n", "cpp")
    assert extract_program("no code") is None
