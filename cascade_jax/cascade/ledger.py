"""The study ledger: every study ever declared in this repository, with every recorded verdict.

A study's claims are fixed once any run exists for them. ``launch/studies/ledger.json`` holds,
for each study name, the declaration (the whole study config) with its fingerprint and the
runs recorded so far, failed verdicts included. A changed claim or setting is a new study with a
new name: :func:`check_declared` refuses to run a study whose name is in the ledger with another
fingerprint, and the tests refuse a shipped study file that differs from its ledger entry.

Fingerprint: ``sha256`` of the study spec (:class:`~cascade_jax.cascade.study.StudySpec`,
claims and settings, without the name and without fields left at their defaults) as canonical
JSON (sorted keys, no spaces), so formatting and key order of the study file do not matter,
every value does, and a field added to ``StudySpec`` later (with a default) keeps the
fingerprints of the studies declared before it.

Ledger layout::

    {"studies": [{"name", "status": "active" | "superseded", "file" (active only),
                  "declared": {"date", "commit"}, "superseded_by" (superseded only),
                  "history" (optional), "spec": {...}, "fingerprint": "<hex>",
                  "runs": [{"date", "commit", "seeds", "setting",
                            "verdicts": {claim: {"held": true | false | null, "numbers"}}}]}]}

``held: null`` means the run's record does not give that claim's verdict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

__all__ = ["LEDGER_PATH", "LedgerError", "fingerprint", "load_ledger", "check_declared",
           "ledger_lines"]

LEDGER_PATH = pathlib.Path(__file__).resolve().parents[2] / "launch" / "studies" / "ledger.json"


class LedgerError(ValueError):
    """A study whose declaration differs from the ledger's, or a malformed ledger."""


def fingerprint(spec) -> str:
    """``sha256`` hex of the spec's canonical JSON (fields other than ``name`` that differ from
    their defaults)."""
    full = dataclasses.asdict(spec)
    d = {f.name: full[f.name] for f in dataclasses.fields(spec)
         if f.name != "name" and (f.default is dataclasses.MISSING or getattr(spec, f.name) != f.default)}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def load_ledger(path=LEDGER_PATH) -> dict:
    """``{name: entry}`` of the ledger at ``path`` (:class:`LedgerError` if malformed)."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LedgerError(f"{path}: cannot read the study ledger ({e})") from None
    entries = {}
    for i, e in enumerate(doc.get("studies", [])):
        for key in ("name", "status", "spec", "fingerprint", "runs", "declared"):
            if key not in e:
                raise LedgerError(f"{path}: studies[{i}]: missing {key!r}")
        if e["name"] in entries:
            raise LedgerError(f"{path}: study {e['name']!r} is declared twice")
        if e["status"] not in ("active", "superseded"):
            raise LedgerError(f"{path}: studies[{i}].status: {e['status']!r}; valid: active, superseded")
        entries[e["name"]] = e
    return entries


def check_declared(spec, ledger=None) -> dict | None:
    """The ledger entry of ``spec.name`` if its fingerprint matches; ``None`` for a study the
    ledger does not know (a user's own study); :class:`LedgerError` if the name is declared
    with other claims or settings."""
    ledger = load_ledger() if ledger is None else ledger
    entry = ledger.get(spec.name)
    if entry is None:
        return None
    got = fingerprint(spec)
    if got != entry["fingerprint"]:
        raise LedgerError(
            f"study {spec.name!r}: its claims or settings differ from those declared in the study "
            f"ledger (fingerprint {got[:12]} vs {entry['fingerprint'][:12]}); declared claims never "
            f"change once a run exists: save the new claims under a new study name and add that "
            f"study to launch/studies/ledger.json")
    return entry


def _verdict(v) -> str:
    if v is None or v.get("held") is None:
        return "not recorded"
    return "held" if v["held"] else "NOT held"


def ledger_lines(ledger=None) -> list[str]:
    """Markdown: every study declared in the repository, its claims and every recorded run's
    verdicts (failed ones included)."""
    ledger = load_ledger() if ledger is None else ledger
    lines = ["## Every study declared in this repository", "",
             "From `launch/studies/ledger.json`: claims never change once run; a changed claim is "
             "a new study. Every recorded run is listed, failed verdicts included.", ""]
    for name, e in ledger.items():
        decl = e["declared"]
        head = f"### `{name}` ({e['status']}; declared {decl.get('date', '?')} at {decl.get('commit', '?')}"
        head += f"; superseded by `{e['superseded_by']}`)" if e.get("superseded_by") else ")"
        lines += [head, ""]
        if e.get("history"):
            lines += [e["history"], ""]
        claims = e["spec"]["claims"]
        for c in claims:
            args = ", ".join(f"{k} {c[k]}" for k in ("tolerance", "margin_steps", "margin") if k in c)
            lines.append(f"- `{c['name']}`: {c['kind']} on {c['domain']} ({args})")
        lines.append("")
        if not e["runs"]:
            lines += ["No run recorded.", ""]
            continue
        lines += ["| run | setting | " + " | ".join(c["name"] for c in claims) + " |",
                  "|---|---|" + "---|" * len(claims)]
        for r in e["runs"]:
            cells = []
            for c in claims:
                v = r["verdicts"].get(c["name"])
                cells.append(_verdict(v) + (f": {v['numbers']}" if v and v.get("numbers") else ""))
            lines.append(f"| {r['date']} {r.get('commit', '')} seeds {r.get('seeds', '?')} | "
                         f"{r.get('setting', '')} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
