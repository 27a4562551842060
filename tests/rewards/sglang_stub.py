"""A rule-based stand-in for an SGLang judge server: a real HTTP process speaking the subset of
SGLang's ``/generate`` protocol the served judge uses (docs/rollout-protocol.md §3–4).

    python -m tests.rewards.sglang_stub [--skip-tokenizer-init]   # prints the port, then serves

Requests carry exactly one of ``text`` / ``input_ids`` (ids are UTF-8 bytes: the tests' trivial
tokenizer). Answers follow the judge prompts in ``configs/judges``:
* pairwise (``[The Start of Response A]``): the shorter response wins, equal lengths tie; a
  response containing ``BREAK_JUDGE`` makes the verdict unparseable;
* QA (``Reference answer:``): CORRECT iff the candidate contains the reference (case-insensitive);
* repair (``[Candidate patch]``): ``Score: 10`` if the candidate equals the reference patch,
  else ``Score: 2``.
``GET /stats`` returns the number of requests and the last body; ``GET /health`` returns 200.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"requests": 0, "last": None, "skip_tokenizer_init": False}
LOCK = threading.Lock()


def _between(text: str, start: str, end: str) -> str:
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, flags=re.S)
    return m.group(1) if m else ""


def judge_text(prompt: str) -> str:
    if "[The Start of Response A]" in prompt:
        a = _between(prompt, "[The Start of Response A]", "[The End of Response A]")
        b = _between(prompt, "[The Start of Response B]", "[The End of Response B]")
        if "BREAK_JUDGE" in a or "BREAK_JUDGE" in b:
            return "<think>confused</think>I cannot decide."
        verdict = "TIE" if len(a) == len(b) else ("A" if len(a) < len(b) else "B")
        return f"<think>A has {len(a)} chars, B has {len(b)}.</think>Shorter is better.\n[[{verdict}]]"
    if "Reference answer:" in prompt:
        ref = re.search(r"Reference answer: (.*?)\n", prompt).group(1).strip().lower()
        cand = re.search(r"Candidate answer: (.*?)\n\nReply", prompt, flags=re.S).group(1).lower()
        return "CORRECT" if ref and ref in cand else "INCORRECT"
    if "[Candidate patch]" in prompt:
        gold = prompt.split("[Reference patch]\n", 1)[1].split("\n\n[Candidate patch]", 1)[0]
        cand = prompt.split("[Candidate patch]\n", 1)[1].split("\n\nExplain briefly", 1)[0]
        return f"<think>reviewing</think>Looks {'right' if cand.strip() == gold.strip() else 'off'}." \
               f"\nScore: {10 if cand.strip() == gold.strip() else 2}"
    return "I do not know this task."


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path in ("/health", "/health_generate"):
            self._send(200, {})
        elif self.path == "/stats":
            with LOCK:
                self._send(200, {"requests": STATE["requests"], "last": STATE["last"]})
        else:
            self._send(404, {"error": f"unknown path {self.path}"})

    def do_POST(self):
        if self.path != "/generate":
            self._send(404, {"error": f"unknown path {self.path}"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with LOCK:
            STATE["requests"] += 1
            STATE["last"] = body
        if ("text" in body) == ("input_ids" in body):
            self._send(400, {"error": "exactly one of text / input_ids is required"})
            return
        prompt = body["text"] if "text" in body else bytes(body["input_ids"]).decode("utf-8")
        out = judge_text(prompt)
        ids = list(out.encode("utf-8"))
        self._send(200, {
            "text": "" if STATE["skip_tokenizer_init"] else out,
            "output_ids": ids,
            "meta_info": {"id": body.get("rid", "r0"), "prompt_tokens": len(prompt.encode()),
                          "completion_tokens": len(ids), "cached_tokens": 0, "e2e_latency": 0.0,
                          "finish_reason": {"type": "stop", "matched": 0}},
        })


def main() -> None:
    STATE["skip_tokenizer_init"] = "--skip-tokenizer-init" in sys.argv
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
