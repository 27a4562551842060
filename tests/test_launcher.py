"""``rollout.launcher.Launcher`` stops and restarts whole server process groups: a server's own
worker processes (SGLang's scheduler and detokenizer, a tokenizer pool) must not outlive it and
hold a port or accelerator memory."""

from __future__ import annotations

import pathlib
import sys
import time

from cascade_jax.rollout.launcher import Launcher

# A stand-in server: starts one worker process, records its pid, answers /health with 200.
SERVER = r'''
import http.server, subprocess, sys
port, pid_file = int(sys.argv[1]), sys.argv[2]
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(pid_file, "a") as f:
    f.write(f"{worker.pid}\n")

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
'''


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _workers(pid_file: pathlib.Path, n: int, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [int(x) for x in pid_file.read_text().split()] if pid_file.exists() else []
        if len(pids) >= n:
            return pids
        assert time.monotonic() < deadline, f"{n} workers expected, {pids} started"
        time.sleep(0.05)


def test_stop_ends_each_server_with_its_workers(tmp_path):
    script, pid_file = tmp_path / "server.py", tmp_path / "workers"
    script.write_text(SERVER)
    launcher = Launcher([sys.executable, str(script), "{port}", str(pid_file)], n=2,
                        health_timeout_s=60, restart=False, log_dir=str(tmp_path))
    launcher.start()
    try:
        workers = _workers(pid_file, 2)
        assert all(_alive(w) for w in workers)
    finally:
        launcher.stop()
    assert all(_gone(w) for w in workers), [w for w in workers if _alive(w)]


def test_a_crashed_server_is_restarted_without_its_old_workers(tmp_path):
    script, pid_file = tmp_path / "server.py", tmp_path / "workers"
    script.write_text(SERVER)
    launcher = Launcher([sys.executable, str(script), "{port}", str(pid_file)], n=1,
                        health_timeout_s=60, poll_s=0.1, log_dir=str(tmp_path))
    launcher.start()
    try:
        (old,) = _workers(pid_file, 1)
        launcher.kill(0)  # SIGKILL of the server alone: its worker is orphaned
        new = _workers(pid_file, 2)[1]
        assert _gone(old), "the crashed server's worker outlived the restart"
        assert _alive(new) and launcher.restarts == 1 and not launcher.errors
    finally:
        launcher.stop()
    assert _gone(new)
