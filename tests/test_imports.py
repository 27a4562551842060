"""The project's import graph, read with ``ast`` (nothing is imported): every project module
parses, project imports sit at module top, and no two modules import each other, directly or
through others, counting the imports inside functions too (they would hide a cycle).

Exceptions are listed here, each with its reason: :data:`INNER_IMPORTS_ALLOWED` (files that may
import project modules inside functions, and how many such imports each may have at most)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: the project's top-level packages (what counts as a project import)
PACKAGES = ("cascade_jax", "models", "kernels", "launch", "configs")

#: ``{file: (most project imports inside functions, why)}``: the only files allowed any. The
#: command-line scripts import the stack after parsing arguments (fast ``--help`` / argument
#: errors, and ``JAX_PLATFORMS`` / ``XLA_FLAGS`` / device counts set before ``jax`` starts);
#: ``kernels`` chooses a backend (Pallas GPU / TPU modules load only on their platform).
INNER_IMPORTS_ALLOWED = {
    "launch/accept.py": (27, "script: sections import what they measure after argument parsing"),
    "launch/run.py": (13, "script: jax / the runner start after argument parsing and env setup"),
    "launch/bench_runner.py": (11, "script: env (device count) set before jax starts"),
    "launch/bench_agentic.py": (10, "script: env set before jax starts"),
    "launch/bench_serve.py": (9, "script: env set before jax starts"),
    "launch/study.py": (6, "script: jax starts after argument parsing"),
    "launch/bench_fidelity.py": (5, "script: env set before jax starts"),
    "launch/eval.py": (5, "script: jax starts after argument parsing"),
    "launch/plan.py": (4, "script: simulated device count set before jax starts"),
    "launch/bench_plan.py": (3, "script: simulated device count set before jax starts"),
    "launch/tune_kernels.py": (2, "script: env set before jax starts"),
    "kernels/__init__.py": (5, "backend choice: platform-specific Pallas modules load on use"),
    "kernels/benchmark.py": (2, "backend choice: platform-specific Pallas modules load on use"),
    "kernels/pallas_gmm.py": (1, "backend choice: the Mosaic GPU variant loads on GPU only"),
    "cascade_jax/rollout/server.py": (13, "server process: routes import their stack on first use"),
    "cascade_jax/sharding/dryrun.py": (11, "dry run: simulated device count set before jax starts"),
    "cascade_jax/cascade/study.py": (6, "study driver: launches stages in subprocesses"),
    "cascade_jax/cascade/driver.py": (5, "cascade driver: launches stages in subprocesses"),
    "cascade_jax/rollout/weight_sync.py": (4, "torch.distributed transport loads only when used"),
    "cascade_jax/data/bench.py": (3, "benchmark data loads its sources only when asked"),
    "cascade_jax/data/convert.py": (3, "converters of optional formats load on use"),
    "cascade_jax/data/sources.py": (3, "optional sources (datasets) load on use"),
    "cascade_jax/rollout/client.py": (3, "HTTP client: the embedded stack loads only when used"),
    "cascade_jax/rollout/factory.py": (3, "engine backends load only when chosen"),
    "cascade_jax/data/tokenizer.py": (2, "transformers tokenizers load on use"),
    "cascade_jax/rl/logprobs.py": (2, "to be hoisted"),
    "cascade_jax/rollout/openai_api.py": (2, "server routes import their stack on first use"),
    "cascade_jax/rollout/scoring.py": (2, "to be hoisted"),
    "cascade_jax/config.py": (1, "config is the lowest layer; one check loads the model presets"),
    "cascade_jax/data/sft.py": (1, "to be hoisted"),
    "cascade_jax/rl/steps.py": (1, "to be hoisted"),
    "cascade_jax/rollout/bench.py": (1, "to be hoisted"),
    "cascade_jax/rollout/engine.py": (1, "to be hoisted"),
    "cascade_jax/rollout/exact.py": (1, "to be hoisted"),
    "cascade_jax/rollout/sampler.py": (1, "to be hoisted"),
    "cascade_jax/rollout/teachers.py": (1, "to be hoisted"),
    "cascade_jax/sharding/plan.py": (1, "kernels' backend choice loads on use"),
}


def _modules() -> dict:
    """``{dotted module name: path}`` of every project module (a package is its ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(path: pathlib.Path, name: str, modules: dict) -> list:
    """``[(lineno, module, inner)]``: the project modules ``path`` imports; ``inner`` when the
    import sits inside a function or class body (``if TYPE_CHECKING`` blocks are skipped)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []

    def target(mod: str, names) -> list:
        hits = []
        for n in names:
            sub = f"{mod}.{n}" if mod else n
            if sub in modules:
                hits.append(sub)
        return hits or ([mod] if mod in modules else [])

    def visit(nodes, inner: bool):
        for n in nodes:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                continue
            if isinstance(n, ast.Import):
                for a in n.names:
                    parts = a.name.split(".")
                    if parts[0] in PACKAGES:
                        while parts and ".".join(parts) not in modules:
                            parts.pop()
                        if parts:
                            found.append((n.lineno, ".".join(parts), inner))
            elif isinstance(n, ast.ImportFrom):
                mod = n.module or ""
                if n.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (n.level - 1)]
                    mod = ".".join(base + ([mod] if mod else []))
                if mod.split(".")[0] in PACKAGES:
                    for m in target(mod, [a.name for a in n.names]):
                        found.append((n.lineno, m, inner))
            deeper = inner or isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                             ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(n, field, None)
                if isinstance(sub, list):
                    visit(sub, deeper)

    visit(tree.body, False)
    return found


def _graph():
    modules = _modules()
    return modules, {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _is_init_edge(src: str, dst: str) -> bool:
    """A package ``__init__`` importing its own submodules (re-exports): such an edge closes no
    real cycle, since the submodule is loaded first and finished before the package uses it."""
    return dst.startswith(src + ".")


def test_every_module_is_found_and_parses():
    modules, graph = _graph()
    assert len(modules) > 100 and "cascade_jax.runner.build" in modules
    assert graph["cascade_jax.runner.loop"], "the graph reader found no imports"


def test_no_import_cycles_counting_imports_inside_functions():
    """No cycle among project modules; a package's ``__init__`` re-exporting its submodules is
    not an edge back (a submodule importing its own package's ``__init__`` still is)."""
    _, graph = _graph()
    edges = {src: sorted({m for _, m, _ in imps if m != src and not _is_init_edge(src, m)})
             for src, imps in graph.items()}
    assert _cycles(edges) == []


def test_project_imports_are_at_module_top():
    """Project imports inside functions only in :data:`INNER_IMPORTS_ALLOWED` files, at most
    the stated number each."""
    modules, graph = _graph()
    bad, over = [], []
    for name, imps in graph.items():
        rel = str(modules[name].relative_to(ROOT))
        inner = [(line, m) for line, m, is_inner in imps if is_inner]
        limit = INNER_IMPORTS_ALLOWED.get(rel, (0, ""))[0]
        if len(inner) > limit:
            (over if limit else bad).append((rel, len(inner), limit, inner[:5]))
    assert not bad, f"project imports inside functions (move them to the module top): {bad}"
    assert not over, f"more inner imports than INNER_IMPORTS_ALLOWED states: {over}"


def test_the_checker_finds_a_cycle_and_an_inner_import(tmp_path):
    """The reader is not vacuous: a hand-made two-module cycle is found, and an import inside a
    function is reported as inner."""
    assert _cycles({"a": ["b"], "b": ["a"], "c": ["a"]}) == [["a", "b"]]
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom cascade_jax import config\n\ndef g():\n    from models import nemotron_h\n")
    got = _imports(f, "cascade_jax.m", {"cascade_jax.config": f, "models.nemotron_h": f,
                                         "cascade_jax": f, "models": f})
    assert got == [(2, "cascade_jax.config", False), (5, "models.nemotron_h", True)]
