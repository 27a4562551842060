"""Sandboxed repository tools: they work, and hostile calls are contained as error observations.

Attacks (each on its own per-episode copy, each leaving no sandbox process behind): fork bomb,
infinite loop, memory bomb, huge output, writing outside the copy (host paths, the snapshot,
the tool scripts, ``/usr``), network to the host's loopback, reading the host's files
(directly and through a symlink planted in the copy), filling the disk past the copy's quota.
"""

import os
import socket
import time

import pytest

from cascade_jax.agentic.tools import ToolLimits, Workspace
from cascade_jax.rewards import sandbox
from tests.rewards.support import tracked_sandbox

LIMITS = ToolLimits(call=sandbox.Limits(wall_s=3.0, cpu_s=2, memory_bytes=256 << 20,
                                        file_size_bytes=2 << 20, processes=16,
                                        output_bytes=64 << 10),
                    workspace_bytes=4 << 20, max_observation_chars=2000)


@pytest.fixture
def snapshot(tmp_path):
    d = tmp_path / "snap"
    (d / "pkg").mkdir(parents=True)
    (d / "tests").mkdir()
    (d / "pkg" / "__init__.py").write_text("def add(a, b):\n    return a - b\n")
    (d / "tests" / "test_add.py").write_text(
        "from pkg import add\n\ndef test_add():\n    assert add(2, 3) == 5\n\n"
        "def test_zero():\n    assert add(0, 0) == 0\n\ndef test_crash():\n    raise RuntimeError('x')\n")
    os.chmod(tmp_path, 0o755)
    return str(d)


@pytest.mark.timeout(60)
def test_tools_work_on_a_private_copy(monkeypatch, snapshot):
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        r = ws.view("pkg/__init__.py")
        assert r.ok and r.text == "     1\tdef add(a, b):\n     2\t    return a - b\n     3\t"
        assert ws.view(".").text.split() == ["pkg/__init__.py", "tests/test_add.py"]
        assert ws.view("pkg/__init__.py", [2, 2]).text == "     2\t    return a - b"
        ids = ["tests/test_add.py::test_add", "tests/test_add.py::test_zero",
               "tests/test_add.py::test_crash", "tests/test_add.py::test_missing"]
        r = ws.run_tests(ids)
        assert r.data["tests"] == {ids[0]: "failed", ids[1]: "passed", ids[2]: "error",
                                   ids[3]: "error"} and not r.ok
        bad = ws.str_replace("pkg/__init__.py", "a * b", "a + b")
        assert not bad.ok and "occurs 0 times" in bad.text
        assert ws.str_replace("pkg/__init__.py", "a - b", "a + b").ok
        assert ws.run_tests(ids[:2]).ok
        r = ws.run_python("import pkg\nprint(pkg.add(2, 3))")
        assert r.ok and r.text.endswith("\n5")
        assert ws.create("notes/x.txt", "hello\n").ok
        r = ws.run_shell("cat notes/x.txt && pwd && id -u")
        assert r.ok and r.text.split("\n")[1:] == ["hello", "/repo", str(sandbox.SANDBOX_UID)]
    # the snapshot is untouched and the copy is gone
    assert open(os.path.join(snapshot, "pkg", "__init__.py")).read().endswith("a - b\n")
    assert not os.path.exists(ws.path)


@pytest.mark.timeout(60)
def test_fork_bomb_infinite_loop_and_memory_bomb(monkeypatch, snapshot):
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        t = time.monotonic()
        r = ws.run_shell(":(){ :|:& };:")
        assert not r.ok and r.status in ("timeout", "runtime_error") and time.monotonic() - t < 8
        r = ws.run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
        assert r.status == "timeout" and "[timeout" in r.text
        t = time.monotonic()
        r = ws.run_python("while True:\n    pass")
        assert r.status == "timeout" and time.monotonic() - t < 6
        r = ws.run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))")
        assert r.status == "memory_limit" and "memory" in r.text
        assert ws.run_shell("echo still fine").ok  # the workspace survives


@pytest.mark.timeout(60)
def test_huge_output_is_cut(monkeypatch, snapshot):
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        t = time.monotonic()
        r = ws.run_shell("yes 0123456789")
        assert r.status == "output_limit" and time.monotonic() - t < 5
        assert len(r.text) <= LIMITS.max_observation_chars + 100 and "truncated" in r.text


@pytest.mark.timeout(60)
def test_writes_outside_the_copy_fail(monkeypatch, snapshot, tmp_path):
    host_target = tmp_path / "pwned"
    targets = ["/usr/pwned", "/pwned", "/etc/pwned", "/scripts/pwned", str(host_target),
               os.path.join(snapshot, "pwned"), "/proc/1/root/pwned"]
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        r = ws.run_shell("; ".join(f"echo x > {t} 2>/dev/null && echo WROTE {t}" for t in targets)
                         + "; echo done")
        assert "WROTE" not in r.text and r.text.split("[stderr]")[0].strip().endswith("done")
        assert r.text.count("Read-only file system") >= 4
        r = ws.create("../../pwned", "x")
        assert not r.ok and "outside /repo" in r.text
        r = ws.create(str(host_target), "x")
        assert not r.ok and "outside /repo" in r.text
    for t in targets[:3] + [str(host_target), os.path.join(snapshot, "pwned")]:
        assert not os.path.exists(t), t


@pytest.mark.timeout(60)
def test_network_is_unreachable(monkeypatch, snapshot):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    try:
        with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
            r = ws.run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                              "timeout=2)\nprint('connected')")
            assert r.status == "runtime_error" and "connected" not in r.text.split("[stderr]")[0]
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()


@pytest.mark.timeout(60)
def test_host_files_are_invisible(monkeypatch, snapshot, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-value")
    os.chmod(secret, 0o644)
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        r = ws.run_shell(f"cat {secret} /etc/passwd /etc/hostname; ls /home /root /work; echo end")
        assert "s3cr3t-value" not in r.text and "root:" not in r.text
        assert r.text.split("[stderr]")[0].strip().endswith("end")
        assert ws.run_shell(f"ln -s {secret} leak && ln -s /etc/passwd pw").ok
        for path in ("leak", "pw"):
            r = ws.view(path)
            assert not r.ok and "s3cr3t-value" not in r.text and "root:" not in r.text
        r = ws.run_shell("cat leak pw")
        assert "s3cr3t-value" not in r.text and "root:" not in r.text


@pytest.mark.timeout(60)
def test_disk_quota(monkeypatch, snapshot):
    with tracked_sandbox(monkeypatch), Workspace(snapshot, LIMITS) as ws:
        r = ws.run_shell("for i in 1 2 3; do head -c 2000000 /dev/zero > big$i; done")
        assert not r.ok and ws.over_quota and "over its quota" in r.text
        r = ws.run_shell("head -c 5000000 /dev/zero > huge")  # one file past file_size_bytes
        assert not r.ok and os.path.getsize(os.path.join(ws.path, "huge")) <= 2 << 20


def test_bad_arguments_name_the_field(snapshot, tmp_path):
    with pytest.raises(ValueError, match="mount"):
        sandbox.run_command(("true",), directory=snapshot, mount="/usr")
    with pytest.raises(ValueError, match="mount"):
        sandbox.run_command(("true",), directory=snapshot, ro_binds=((snapshot, "relative"),))
    with pytest.raises(ValueError, match="directory"):
        sandbox.run_command(("true",), directory=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="argv"):
        sandbox.run_command((), directory=snapshot)
    with pytest.raises(ValueError, match="snapshot"):
        Workspace(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="workspace_bytes"):
        ToolLimits(workspace_bytes=0)
    with Workspace(snapshot, LIMITS) as ws:
        assert not ws.run_shell("  ").ok and not ws.str_replace("pkg/__init__.py", "", "x").ok
        r = ws.run_tests(["tests/test_add.py"])
        assert not r.ok and "path::function" in r.text
        assert "view_range" in ws.view("pkg/__init__.py", [1]).text
