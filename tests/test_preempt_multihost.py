"""Preemption agreed across processes, for real: ``launch/run.py`` as two processes on
localhost joined by ``jax.distributed`` (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, one CPU device each, the tiny SFT stage on a 2-device mesh), SIGTERM sent
to process 1 only. JAX's preemption notifier on that process publishes the notice, every
process reaches ``multihost_utils.reached_preemption_sync_point`` at the same step, writes the
checkpoint of it and exits 75; rerunning both resumes there, and the final weights equal an
uninterrupted two-process run's bit for bit (the Hub exports' safetensors bytes) with the same
loss at every step.

Determinism without sleeps: both processes hold after step 2 (``CASCADE_FAULT=hold@2``) until
the coordination service holds the preemption notice, so the stop falls after step 2 and
before the last step whatever the machine's speed."""

import hashlib
import json
import pathlib
import re
import signal

import pytest

from cascade_jax.rollout.launcher import free_port
from tests.runner_support import Child, cli_env, launch_cmd, write_config

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

STEPS = 6
HOLD = 2


class _Job:
    """Both processes of one ``run.py`` command (:class:`~tests.runner_support.Child` each);
    :meth:`finish` waits for both and stops whatever is left, also on failure."""

    def __init__(self, config: pathlib.Path, fault=None):
        port = free_port()
        self.procs = []
        try:
            for pid in range(2):
                # no persistent compilation cache: JAX writes it from process 0 only, so process
                # 0 would load its programs while process 1 compiles, and the CPU collectives'
                # transport (gloo) gives up on a peer more than 30 s late
                env = cli_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                              JAX_PROCESS_ID=str(pid), **({"CASCADE_FAULT": fault} if fault else {}))
                self.procs.append(Child(launch_cmd("run.py", f"--config={config}", "--no-progress"), env))
        except BaseException:
            self.kill()
            raise

    @property
    def lines(self) -> list:
        return [p.lines for p in self.procs]

    def wait_for(self, pid: int, text: str, timeout: float) -> None:
        self.procs[pid].wait_for(text, timeout)

    def finish(self, timeout: float) -> list[int]:
        try:
            return [p.wait(timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            p.stop()

    def text(self, pid: int) -> str:
        return "\n".join(l for l in self.lines[pid] if not l.startswith(("I1", "W1", "[Gloo]")))[-3000:]


def _hub_digest(run_dir: pathlib.Path) -> dict:
    files = sorted((run_dir / "hub").glob("*.safetensors"))
    assert files
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _losses(run_dir: pathlib.Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    def cfg(name):
        return write_config(tmp_path / f"{name}.json", "sft", tmp_path / name, steps=STEPS,
                            run={"checkpoint_every": 100},
                            data={"batch_rows": 2, "seq_len": 128, "domains": ["math"]},
                            optimizer={"lr": 3e-3, "warmup_steps": 1})

    ref = _Job(cfg("ref"))
    assert ref.finish(600) == [0, 0], (ref.text(0), ref.text(1))

    job = _Job(cfg("killed"), fault=f"hold@{HOLD}")
    try:
        job.wait_for(1, f"holding after step {HOLD}", 600)
        job.procs[1].p.send_signal(signal.SIGTERM)
        codes = job.finish(300)
    finally:
        job.kill()
    assert codes == [75, 75], (codes, job.text(0), job.text(1))
    stopped = []
    for pid in range(2):
        errs = [l for l in job.lines[pid] if l.startswith("error: ")]
        assert len(errs) == 1 and "stopped by SIGTERM (preemption notice)" in errs[0], job.text(pid)
        stopped.append(int(re.search(r"after step (\d+)/", errs[0]).group(1)))
    assert stopped[0] == stopped[1] and HOLD <= stopped[0] < STEPS, stopped
    s = stopped[0]
    ck = tmp_path / "killed" / "checkpoints"
    assert sorted(int(x.name) for x in ck.iterdir() if x.name.isdigit()) == [s]
    assert not (tmp_path / "killed" / "hub").exists()

    again = _Job(cfg("killed"))
    assert again.finish(600) == [0, 0], (again.text(0), again.text(1))
    assert any(f"at step {s}" in l and "resumed" in l for l in again.lines[0]), again.text(0)
    assert _hub_digest(tmp_path / "killed") == _hub_digest(tmp_path / "ref")
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")
    assert [st for st, _ in _losses(tmp_path / "ref")] == list(range(1, STEPS + 1))
