"""The contract layer (``cascade_jax.contract``) sits below data, rollout and rl: it imports no
other project package, and ``cascade_jax.data`` imports neither rewards, rl nor rollout — checked
on the source of every module (function bodies included) and at run time (a fresh interpreter
that builds the tiny tokenizer, draws tiny rows and an SFT batch has loaded none of them)."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "cascade_jax"


def project_imports(path: pathlib.Path, package: str) -> set:
    """Every ``cascade_jax.*`` module the file ``path`` of ``package`` imports (absolute or
    relative, at any depth: function bodies included)."""
    tree = ast.parse(path.read_text())
    pkg = package
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cascade_jax")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("cascade_jax"):
                out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("data", ("cascade_jax.rewards", "cascade_jax.rl", "cascade_jax.rollout", "cascade_jax.runner")),
    ("contract", ("cascade_jax.data", "cascade_jax.rewards", "cascade_jax.rl", "cascade_jax.rollout",
                  "cascade_jax.runner", "cascade_jax.config")),
])
def test_layer_imports_nothing_above_it(package, forbidden):
    bad = {}
    for f in sorted((PKG / package).glob("*.py")):
        hits = sorted(m for m in project_imports(f, f"cascade_jax.{package}") if m.startswith(forbidden))
        if hits:
            bad[f.name] = hits
    assert not bad, f"cascade_jax.{package} imports from above it: {bad}"


def test_project_imports_sees_relative_and_nested_imports(tmp_path):
    """The checker itself: a relative import and one inside a function body are both found."""
    f = tmp_path / "m.py"
    f.write_text("from ..rl import batch\n\ndef f():\n    from cascade_jax.rewards import tiny\n")
    got = project_imports(f, "cascade_jax.data")
    assert "cascade_jax.rl.batch" in got and "cascade_jax.rewards.tiny" in got


_PROBE = """
import json, sys
from cascade_jax import config as C
from cascade_jax import data
from cascade_jax.data import sources, tiny
tok = data.tiny_tokenizer()
cfg = C.apply_overrides(C.Config(), ["data.batch_rows=2", "data.seq_len=128", "data.tiny_rows_per_domain=8"])
batch = next(data.sft_batches(cfg, tok))
print(json.dumps({"shape": list(batch.tokens.shape), "type": type(batch).__module__,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[:2] in
                                   (["cascade_jax", "rewards"], ["cascade_jax", "rl"], ["cascade_jax", "rollout"]))}))
"""


def test_data_runs_without_rewards_rl_or_rollout():
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                      "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shape"] == [2, 128] and out["type"] == "cascade_jax.contract.batch"
    assert out["loaded"] == [], out["loaded"]
