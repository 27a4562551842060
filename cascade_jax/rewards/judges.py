"""Judges: a served judge model over SGLang's ``/generate`` and rule-based synthetic judges.

A judge maps named text fields to a :class:`Verdict` (``value`` in [0, 1], a ``label`` and a
``reason``)::

    judge({"prompt": ..., "response_a": ..., "response_b": ...})   # pairwise: 1 = A better
    judge({"question": ..., "reference": ..., "response": ...})    # QA: 1 = correct
    judge({"issue": ..., "gold_patch": ..., "patch": ...})         # SWE repair quality

**Served judge** (:class:`ServedJudge`): the prompt comes from a config file
(``configs/judges/<name>.toml``: ``template`` with ``{field}`` placeholders, optional ``system``,
``sampling_params``, ``thinking``, and a ``[verdict]`` table with a ``pattern`` whose first group
is mapped to a value by ``labels = {A = 1.0, ...}`` or linearly by ``scale = [worst, best]``). The
conversation is rendered by ``render`` (default: ChatML, which Qwen3 judges use; pass the judge
tokenizer's ``apply_chat_template`` to use its own template), then sent through a
:class:`Transport` as SGLang ``/generate`` body — ``text``, or ``input_ids`` when the judge's own
``tokenizer`` callable is given (then ``detokenizer`` turns ``output_ids`` back into text if the
server returns no text). The verdict is parsed from the text after the judge's last ``</think>``
(the last match of ``pattern`` wins).

:class:`HttpTransport` is the stdlib HTTP implementation; the rollout client can implement the
same one-method :class:`Transport` protocol (``generate(body) -> response dict``) to share its
connection pool, retries and rate limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
import time
import tomllib
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import configs

__all__ = [
    "Verdict", "Judge", "JudgeError", "Transport", "HttpTransport", "JudgePrompt",
    "load_judge_prompt", "ServedJudge", "chatml", "JUDGE_CONFIG_DIR",
    "RulePairwiseJudge", "RuleQAJudge", "RulePatchJudge", "normalize_answer", "diff_lines",
]

JUDGE_CONFIG_DIR = str(configs.root() / "judges")  # packaged with the configs


class JudgeError(RuntimeError):
    """The judge could not be asked or its answer could not be parsed."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    value: float
    label: str
    reason: str


class Judge(Protocol):
    def __call__(self, fields: Mapping[str, Any]) -> Verdict: ...


# --------------------------------------------------------------------------------------------
# Transport


class Transport(Protocol):
    """Sends one SGLang ``/generate`` body (single item) and returns the response dict
    (``{"text", "output_ids", "meta_info": {"finish_reason", ...}}``)."""

    def generate(self, body: Mapping[str, Any]) -> Mapping[str, Any]: ...


@dataclasses.dataclass
class HttpTransport:
    """POST ``{base_url}/generate`` with the stdlib; retries connection errors and 5xx answers
    ``retries`` times with exponential back-off; raises :class:`JudgeError` otherwise."""

    base_url: str
    timeout_s: float = 300.0
    retries: int = 3
    backoff_s: float = 0.5

    def generate(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        data = json.dumps(body).encode("utf-8")
        url = self.base_url.rstrip("/") + "/generate"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    out = json.loads(r.read().decode("utf-8"))
                if isinstance(out, list):  # batch-shaped answer to a single request
                    out = out[0]
                if not isinstance(out, dict):
                    raise JudgeError(f"{url}: expected a JSON object, got {type(out).__name__}")
                return out
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = JudgeError(f"{url}: HTTP {e.code}: {detail}")
                if e.code < 500:
                    raise last from e
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = JudgeError(f"{url}: {type(e).__name__}: {e}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise last  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Prompt configs


@dataclasses.dataclass(frozen=True)
class JudgePrompt:
    name: str
    template: str
    system: str = ""
    thinking: bool = True
    sampling_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pattern: str = ""
    labels: Mapping[str, float] = dataclasses.field(default_factory=dict)
    scale: tuple = ()

    def __post_init__(self):
        if not self.pattern:
            raise ValueError(f"judge prompt {self.name!r}: [verdict].pattern is required")
        if bool(self.labels) == bool(self.scale):
            raise ValueError(f"judge prompt {self.name!r}: give exactly one of [verdict].labels "
                             f"or [verdict].scale")
        if re.compile(self.pattern).groups < 1:
            raise ValueError(f"judge prompt {self.name!r}: pattern needs a capture group")

    @property
    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def render_user(self, fields: Mapping[str, Any]) -> str:
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise KeyError(f"judge prompt {self.name!r}: missing fields {missing}")
        return self.template.format(**{f: fields[f] for f in self.fields})

    def parse(self, text: str) -> tuple[float, str]:
        """(value, label) from the judge's output; raises :class:`JudgeError`."""
        answer = text.rsplit("</think>", 1)[-1]
        matches = re.findall(self.pattern, answer, flags=re.S)
        if not matches:
            raise JudgeError(f"judge {self.name!r}: no verdict matching {self.pattern!r} in "
                             f"{answer.strip()[-200:]!r}")
        label = matches[-1] if isinstance(matches[-1], str) else matches[-1][0]
        label = label.strip()
        if self.labels:
            if label not in self.labels:
                raise JudgeError(f"judge {self.name!r}: unknown verdict {label!r}")
            return float(self.labels[label]), label
        worst, best = (float(x) for x in self.scale)
        try:
            x = float(label)
        except ValueError as e:
            raise JudgeError(f"judge {self.name!r}: verdict {label!r} is not a number") from e
        return min(1.0, max(0.0, (x - worst) / (best - worst))), label


def load_judge_prompt(name_or_path: str) -> JudgePrompt:
    """Load ``configs/judges/<name>.toml`` (or a path to a ``.toml`` file)."""
    path = name_or_path if name_or_path.endswith(".toml") else os.path.join(
        JUDGE_CONFIG_DIR, name_or_path + ".toml")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    verdict = raw.pop("verdict", {})
    known = {f.name for f in dataclasses.fields(JudgePrompt)} - {"pattern", "labels", "scale"}
    unknown = sorted(set(raw) - known) + [
        f"verdict.{k}" for k in sorted(set(verdict) - {"pattern", "labels", "scale"})]
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    return JudgePrompt(name=raw.pop("name", os.path.basename(path)[:-5]),
                       pattern=verdict.get("pattern", ""), labels=verdict.get("labels", {}),
                       scale=tuple(verdict.get("scale", ())), **raw)


def chatml(messages: Sequence[Mapping[str, str]], thinking: bool = True) -> str:
    """ChatML rendering with the generation prompt (``<think>\\n`` opened when ``thinking``)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + ("<think>\n" if thinking else "")


@dataclasses.dataclass
class ServedJudge:
    """A judge model behind SGLang's ``/generate`` (see module docstring)."""

    transport: Transport
    prompt: JudgePrompt
    tokenizer: Optional[Callable[[str], list[int]]] = None
    detokenizer: Optional[Callable[[Sequence[int]], str]] = None
    render: Optional[Callable[[list[dict]], str]] = None
    sampling_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def request(self, fields: Mapping[str, Any]) -> dict:
        messages = ([{"role": "system", "content": self.prompt.system}] if self.prompt.system
                    else []) + [{"role": "user", "content": self.prompt.render_user(fields)}]
        text = (self.render(messages) if self.render is not None
                else chatml(messages, self.prompt.thinking))
        body: dict = {"sampling_params": {**self.prompt.sampling_params,
                                          **self.sampling_overrides}}
        if self.tokenizer is not None:
            body["input_ids"] = list(self.tokenizer(text))
        else:
            body["text"] = text
        return body

    def __call__(self, fields: Mapping[str, Any]) -> Verdict:
        out = self.transport.generate(self.request(fields))
        text = out.get("text") or ""
        if not text and out.get("output_ids") and self.detokenizer is not None:
            text = self.detokenizer(out["output_ids"])
        finish = (out.get("meta_info") or {}).get("finish_reason") or {}
        if isinstance(finish, dict) and finish.get("type") == "abort":
            raise JudgeError(f"judge {self.prompt.name!r}: request aborted: {finish}")
        value, label = self.prompt.parse(text)
        return Verdict(value, label, f"{self.prompt.name} judge: {label}")


# --------------------------------------------------------------------------------------------
# Rule-based synthetic judges (tiny preset, tests)


_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation, articles and extra spaces."""
    s = _ARTICLES.sub(" ", s.lower().translate(_DROP_PUNCTUATION))
    return " ".join(s.split())


@dataclasses.dataclass
class RuleQAJudge:
    """Correct iff the normalised reference equals the normalised response, or (``contains``)
    appears in it as whole words."""

    contains: bool = True

    def __call__(self, fields: Mapping[str, Any]) -> Verdict:
        ref, resp = normalize_answer(str(fields["reference"])), normalize_answer(str(fields["response"]))
        ok = bool(ref) and (ref == resp or (self.contains and f" {ref} " in f" {resp} "))
        return Verdict(float(ok), "CORRECT" if ok else "INCORRECT",
                       f"reference {'found' if ok else 'not found'} in the answer")


@dataclasses.dataclass
class RulePairwiseJudge:
    """Synthetic preference: quality = [the response mentions ``fields['keyword']``]
    (case-insensitive, if a keyword is given) then fewer words; equal quality is a tie.

    A small model can move this reward (mention the keyword, be brief), which is all the tiny
    RLHF stage needs."""

    def _quality(self, text: str, keyword: str) -> tuple:
        words = len(text.split())
        has = bool(keyword) and keyword.lower() in text.lower()
        return (has, -words)

    def __call__(self, fields: Mapping[str, Any]) -> Verdict:
        kw = str(fields.get("keyword", ""))
        qa, qb = self._quality(str(fields["response_a"]), kw), self._quality(
            str(fields["response_b"]), kw)
        if qa == qb:
            return Verdict(0.5, "TIE", "equal synthetic quality")
        return (Verdict(1.0, "A", f"A preferred {qa} > {qb}") if qa > qb
                else Verdict(0.0, "B", f"B preferred {qb} > {qa}"))


def diff_lines(patch: str) -> tuple[list[str], list[str]]:
    """(removed, added) lines of a unified diff, whitespace-normalised, headers skipped."""
    removed, added = [], []
    for line in patch.splitlines():
        if line.startswith(("---", "+++", "@@", "diff ", "index ")):
            continue
        if line.startswith("-"):
            removed.append(" ".join(line[1:].split()))
        elif line.startswith("+"):
            added.append(" ".join(line[1:].split()))
    return removed, added


@dataclasses.dataclass
class RulePatchJudge:
    """Synthetic repair judge: value = F1 between the candidate's and the gold patch's changed
    lines (removed and added lines, whitespace-normalised); 1.0 for an equivalent edit."""

    def __call__(self, fields: Mapping[str, Any]) -> Verdict:
        gr, ga = diff_lines(str(fields["gold_patch"]))
        cr, ca = diff_lines(str(fields["patch"]))
        gold = [("-", x) for x in gr] + [("+", x) for x in ga]
        cand = [("-", x) for x in cr] + [("+", x) for x in ca]
        if not cand:
            return Verdict(0.0, "0", "patch changes no lines")
        pool, common = list(gold), 0
        for c in cand:
            if c in pool:
                pool.remove(c)
                common += 1
        if common == 0:
            return Verdict(0.0, "0", "no changed line matches the reference fix")
        p, r = common / len(cand), common / len(gold)
        f1 = 2 * p * r / (p + r)
        return Verdict(f1, f"{f1:.2f}", f"changed-line F1 {f1:.2f} (precision {p:.2f}, recall {r:.2f})")
