"""Rewrite configs, run dirs and text to today's config layout (the rollout section split by
reader: ``rollout.temperature`` → ``rollout.sampling.temperature``, the one table
:data:`cascade_jax.config.ROLLOUT_MOVED`).

    python launch/migrate_config.py runs/grpo            # a run dir: its run_config.json
    python launch/migrate_config.py configs/*.json       # config files (a "base" chain each)
    python launch/migrate_config.py --text README.md tests/test_x.py   # dotted keys in text
    python launch/migrate_config.py --check configs/*.json   # exit 1 if anything would change

A JSON file with a ``rollout`` section gets its flat keys moved into their sections
(:func:`cascade_jax.config.migrate_rollout`); in every file the dotted old keys
(``rollout.server_url``, ``cfg.rollout.temperature``, ``--set rollout.top_p=0.9``) become the new
paths. A run dir's ``run_config.json`` is migrated the same way (a run also migrates it itself when
it resumes, saying so in its log). Python code that reads a section through a local name
(``r = cfg.rollout; r.temperature``) and dict literals are not recognised: they are for a person.
Study declarations (``launch/studies/``) are fingerprinted in the ledger and never change: leave
them; their overrides are applied at the new keys (:func:`cascade_jax.config.migrate_override`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from cascade_jax import config as C

#: dotted old key → new key; ``cascade_jax.rollout.weight_sync`` (a module) is not a key
_DOTTED = [(re.compile(rf"(?<!cascade_jax\.)(?<![\w/])rollout\.{old}\b"), f"rollout.{new}")
           for old, new in C.ROLLOUT_MOVED.items()]


def migrate_text(text: str) -> str:
    """``text`` with every dotted old rollout key (:data:`~cascade_jax.config.ROLLOUT_MOVED`)
    written as its new path."""
    for pattern, new in _DOTTED:
        text = pattern.sub(new, text)
    return text


def migrate_json_text(text: str) -> str:
    """A JSON file's text (``json.dumps(indent=2)`` layout) in today's layout: a top-level
    ``rollout`` section migrated, then dotted keys in strings (study overrides)."""
    d = json.loads(text)
    if isinstance(d, dict) and isinstance(d.get("rollout"), dict):
        d = {**d, "rollout": C.migrate_rollout(d["rollout"])[0]}
        text = json.dumps(d, indent=2) + "\n"
    return migrate_text(text)


def _file_of(path: pathlib.Path) -> pathlib.Path:
    """A run dir's ``run_config.json``, else ``path``."""
    if not path.is_dir():
        return path
    if not (path / "run_config.json").is_file():
        raise SystemExit(f"{path}: not a run dir (no run_config.json)")
    return path / "run_config.json"


def migrated(path: pathlib.Path, *, text_only: bool = False) -> tuple[pathlib.Path, str, str]:
    """``(file, old text, new text)`` of a file or run dir (``text_only``: dotted keys only)."""
    f = _file_of(path)
    old = f.read_text()
    return f, old, migrate_text(old) if text_only or f.suffix != ".json" else migrate_json_text(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=pathlib.Path, help="run dirs, JSON configs, text files")
    ap.add_argument("--text", action="store_true", help="rewrite dotted keys only (also in .json files)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = ap.parse_args(argv)
    stale = 0
    for p in args.paths:
        f, old, new = migrated(p, text_only=args.text)
        if new == old:
            continue
        stale += 1
        if args.check:
            print(f"{f}: in the old layout (python launch/migrate_config.py {p})", file=sys.stderr)
        else:
            f.write_text(new)
            print(f"migrated {f}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
