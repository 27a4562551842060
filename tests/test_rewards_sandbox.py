"""Sandbox containment: each attack is contained, scores 0 with a reason, stays within its limits
and leaves no process behind. One attack per test, each under a pytest timeout."""

import os
import socket
import threading
import time

import pytest

from cascade_jax.rewards import sandbox
from cascade_jax.rewards.code import CodeScorer
from tests.rewards.support import processes_mounting, tracked_sandbox

LIMITS = sandbox.Limits(wall_s=3.0, cpu_s=2, output_bytes=64 << 10)


def _code_reward(program, language="python", tests=None, limits=None):
    fence = "python" if language == "python" else "cpp"
    meta = {"tests": tests or [{"input": "", "output": "ok"}],
            "limits": {k: getattr(limits or LIMITS, k) for k in ("wall_s", "cpu_s", "output_bytes")}}
    return CodeScorer(workers=2)(["p"], [f"```{fence}\n{program}\n```"], [meta])[0]


def _timed_run(program, language="python", limits=LIMITS, stdin=""):
    t = time.monotonic()
    with sandbox.prepare(program, language=language) as p:
        assert p.error is None, p.error
        res = sandbox.run_prepared(p, stdin, limits)
    return res, time.monotonic() - t


@pytest.mark.timeout(30)
def test_sandbox_runs_python_and_cpp(monkeypatch):
    with tracked_sandbox(monkeypatch):
        r = sandbox.run("print(input()[::-1])", language="python", stdin="abc")
        assert (r.status, r.stdout, r.exit_code) == ("ok", "cba\n", 0) and r.reason
        assert r.memory_bytes < 100e6  # the program's peak, not this (large) test process's
        r = sandbox.run("#include <iostream>\nint main(){int a,b;std::cin>>a>>b;std::cout<<a*b;}",
                        language="cpp", stdin="6 7")
        assert (r.status, r.stdout) == ("ok", "42")
        r = sandbox.run("int main(){ this is not c++ }", language="cpp")
        assert r.status == "compile_error" and "error" in r.reason
        r = sandbox.run("import sys; sys.exit(3)", language="python")
        assert (r.status, r.exit_code) == ("runtime_error", 3) and "exit code 3" in r.reason
        r = sandbox.run("x = bytearray(150 * 10**6); x[::4096] = b'1' * len(x[::4096])",
                        language="python")
        assert r.status == "ok" and r.memory_bytes > 140e6 and r.time_s > 0


@pytest.mark.timeout(30)
def test_missing_bubblewrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox, "_which", lambda tool: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
        sandbox.run("print(1)", language="python")
    with pytest.raises(ValueError, match="language"):
        sandbox.run("print(1)", language="rust")


@pytest.mark.timeout(30)
def test_fork_bomb_python(monkeypatch):
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    with tracked_sandbox(monkeypatch):
        res, dt = _timed_run(prog)
        assert res.status == "timeout" and dt < LIMITS.wall_s + 3, (res, dt)
        s = _code_reward(prog)
        assert s.value == 0 and "timeout" in s.reason


@pytest.mark.timeout(40)
def test_fork_bomb_cpp_hits_process_limit(monkeypatch):
    prog = ("#include <unistd.h>\n#include <cstdio>\nint main(){int n=0;"
            "for(;n<100000;n++){int pid=fork(); if(pid==0){pause();_exit(0);} if(pid<0)break;}"
            "printf(\"fork failed after %d\\n\", n);return 1;}")
    with tracked_sandbox(monkeypatch):
        res, dt = _timed_run(prog, "cpp")
        assert res.status == "runtime_error" and dt < LIMITS.wall_s + 8, (res, dt)
        # RLIMIT_NPROC bites although CI runs as root: the sandbox's init + main + children
        assert res.stdout == f"fork failed after {LIMITS.processes - 2}\n", res


@pytest.mark.timeout(30)
def test_memory_bomb(monkeypatch):
    prog = "x = []\nwhile True:\n    x.append(bytearray(10**7))"
    with tracked_sandbox(monkeypatch):
        res, dt = _timed_run(prog)
        assert res.status == "memory_limit" and "memory" in res.reason, res
        assert res.memory_bytes <= LIMITS.memory_bytes + (64 << 20)
        s = _code_reward(prog)
        assert s.value == 0 and "memory_limit" in s.reason


@pytest.mark.timeout(30)
def test_infinite_loop_cpu_and_sleep(monkeypatch):
    with tracked_sandbox(monkeypatch):
        lim = sandbox.Limits(wall_s=8.0, cpu_s=1)
        res, dt = _timed_run("while True:\n    pass", limits=lim)
        # the CPU limit normally fires first; on a loaded machine the wall clock may
        assert res.status == "timeout" and dt < lim.wall_s + 2, res
        assert "CPU time limit" in res.reason or "wall-clock" in res.reason
        res, dt = _timed_run("import time\ntime.sleep(1000)")
        assert res.status == "timeout" and "wall-clock" in res.reason, res
        assert LIMITS.wall_s <= dt < LIMITS.wall_s + 2
        s = _code_reward("while True:\n    pass")
        assert s.value == 0 and "timeout" in s.reason


@pytest.mark.timeout(30)
def test_connection_to_host_loopback_is_refused(monkeypatch):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'hello')\nprint('connected')")
    try:
        with tracked_sandbox(monkeypatch):
            res, dt = _timed_run(prog)
            assert res.status == "runtime_error" and "connected" not in res.stdout, res
            s = _code_reward(prog, tests=[{"input": "", "output": "connected"}])
            assert s.value == 0 and "runtime_error" in s.reason
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing ever reached the listener
    finally:
        srv.close()


@pytest.mark.timeout(30)
def test_write_outside_temp_dir(monkeypatch, tmp_path):
    target = tmp_path / "pwned.txt"
    targets = ["/box/pwned", "/usr/pwned", "/etc/pwned", "/pwned", "/dev/pwned", str(target),
               f"/proc/{os.getpid()}/cwd/pwned"]
    prog = ("import sys\nok = []\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p, 'w').write('x'); ok.append(p)\n"
            "    except OSError as e:\n        print(p, type(e).__name__, file=sys.stderr)\n"
            "open('/tmp/inside', 'w').write('fine')\n"
            "print('wrote', ok)\nsys.exit(1 if ok else 0)")
    with tracked_sandbox(monkeypatch):
        res, _ = _timed_run(prog)
        assert res.status == "ok" and res.stdout.strip() == "wrote []", res
        s = _code_reward("open('/usr/pwned', 'w').write('x')\nprint('ok')")
        assert s.value == 0 and "runtime_error" in s.reason
    assert not target.exists() and not os.path.exists("/usr/pwned")
    assert not os.path.exists("/pwned") and not os.path.exists("/etc/pwned")


@pytest.mark.timeout(30)
def test_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("CASCADE_SECRET_TOKEN", "s3cr3t-value")
    prog = ("import os, glob\nfound = []\n"
            "found += [v for v in os.environ.values()]\n"
            "for f in glob.glob('/proc/*/environ'):\n"
            "    try:\n        found.append(open(f, 'rb').read().decode(errors='replace'))\n"
            "    except OSError:\n        pass\n"
            f"try:\n    found.append(open('/proc/{os.getppid()}/environ','rb').read().decode())\n"
            "except OSError:\n    pass\n"
            "print('s3cr3t-value' if any('s3cr3t-value' in x for x in found) else 'clean')\n"
            "print(sorted(os.environ))")
    with tracked_sandbox(monkeypatch):
        res, _ = _timed_run(prog)
        assert res.status == "ok" and res.stdout.startswith("clean"), res
        assert "CASCADE_SECRET_TOKEN" not in res.stdout
        s = _code_reward(prog, tests=[{"input": "", "output": "s3cr3t-value"}])
        assert s.value == 0 and "wrong answer" in s.reason


@pytest.mark.timeout(30)
def test_output_flooding(monkeypatch):
    with tracked_sandbox(monkeypatch):
        for prog in ("while True:\n    print('x' * 10000)",
                     "import sys\nwhile True:\n    sys.stderr.write('y' * 10000)"):
            res, dt = _timed_run(prog)
            assert res.status == "output_limit" and dt < LIMITS.wall_s, res
            assert len(res.stdout) <= LIMITS.output_bytes and len(res.stderr) <= LIMITS.output_bytes
        s = _code_reward("while True:\n    print('x' * 10000)")
        assert s.value == 0 and "output_limit" in s.reason


@pytest.mark.timeout(30)
def test_background_children_die_with_the_program(monkeypatch):
    prog = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n"
            "        os.setsid()\n        time.sleep(1000)\nprint('parent done')")
    with tracked_sandbox(monkeypatch) as marker:
        with sandbox.prepare(prog, language="python") as p:
            seen = []
            t = threading.Thread(target=lambda: seen.append(processes_mounting(marker)))
            res = sandbox.run_prepared(p, "", LIMITS)
            t.start()
            t.join()
        assert res.status == "ok" and res.stdout == "parent done\n"
        assert seen == [[]]


@pytest.mark.timeout(30)
def test_disk_fill_is_capped(monkeypatch):
    lim = sandbox.Limits(wall_s=5.0, tmp_bytes=8 << 20, file_size_bytes=4 << 20)
    prog = ("total = 0\nfor d in ('/tmp', '/dev/shm'):\n    for i in range(100):\n"
            "        try:\n            open(f'{d}/f{i}', 'wb').write(b'x' * (1 << 20))\n"
            "            total += 1 << 20\n        except OSError:\n            break\n"
            "print(total)")
    with tracked_sandbox(monkeypatch):
        res, _ = _timed_run(prog, limits=lim)
        assert res.status == "ok" and int(res.stdout) <= 2 * lim.tmp_bytes, res
        res, _ = _timed_run("open('/tmp/big', 'wb').write(b'x' * (5 << 20))", limits=lim)
        assert res.status == "runtime_error", res
        assert "file size limit" in res.reason or "File too large" in res.reason
