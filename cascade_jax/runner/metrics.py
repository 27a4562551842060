"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
(tensorboardX) and a tqdm progress bar with the running reward and the step time.

Only process 0 writes (``jax.process_index() == 0``); other processes get a writer whose
methods do nothing. On resume, :meth:`MetricsWriter.truncate_after` drops the ``metrics.jsonl``
lines of steps the restored checkpoint does not contain, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping, Optional

__all__ = ["MetricsWriter", "PhaseTimer", "Progress", "scalars"]


def scalars(metrics: Mapping) -> dict:
    """``{name: float}`` of the scalar entries of ``metrics`` (device arrays are fetched)."""
    import numpy as np

    out = {}
    for k, v in metrics.items():
        try:
            a = np.asarray(v)
        except Exception:  # noqa: BLE001 - non-array values are simply not scalars
            continue
        if a.ndim == 0 and a.dtype.kind in "biuf":
            out[k] = float(a)
    return out


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` to ``<run_dir>/metrics.jsonl`` and the same scalars to
    TensorBoard under ``<run_dir>/tensorboard``. Non-finite values are written as JSON ``null``
    (and skipped for TensorBoard)."""

    def __init__(self, run_dir: pathlib.Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"), flush_secs=10)

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step > step``; returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                s = json.loads(line).get("step", 0)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                dropped += 1
                continue
            if s <= step:
                keep.append(line)
            else:
                dropped += 1
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        tmp.replace(self.path)
        return dropped

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[prefix + k] = v if math.isfinite(v) else None
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and v is not None:
                self._tb.add_scalar(k, v, global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _duration(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _rate(x: float) -> str:
    """Three significant digits, never in exponent form (``1234.5`` -> ``1234``)."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


#: seconds between progress lines without a terminal (``CASCADE_PROGRESS_S`` overrides)
PROGRESS_EVERY_S = 30.0


class Progress:
    """Progress of a stage's steps. On a terminal: a tqdm bar with the running reward (or loss)
    and step time. Without one (``enabled=False``: logs of a batch job, a pod, a pipe), a line
    every :data:`PROGRESS_EVERY_S` seconds from a background thread, also while a step, the
    build or a compile runs::

        [sft] step 120/300 (40%), 2.1 steps/s, ETA 1m26s, loss 1.234 (last step 0.48s)

    ``lines=False`` turns those lines off too (``log`` receives them)."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "", enabled: bool = True,
                 lines: bool = True, log=None, every_s: Optional[float] = None,
                 unit: str = "step"):
        import os
        import sys
        import threading
        import time

        self._bar = None
        self.total, self.n, self.start_n, self.desc = total, initial, initial, desc
        self.phase = "starting"
        self.unit = unit
        self._post: dict = {}
        self._t0 = time.monotonic()
        self._t_steps = None  # when the first step of this process began
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                             mininterval=0.5)
        elif lines:
            every = float(os.environ.get("CASCADE_PROGRESS_S") or every_s or PROGRESS_EVERY_S)
            self._thread = threading.Thread(target=self._beat, args=(every,), daemon=True,
                                            name="cascade-progress")
            self._thread.start()

    def line(self) -> str:
        """The current progress line (see the class doc)."""
        import time

        now = time.monotonic()
        head = f"[{self.desc}] " if self.desc else ""
        if self._t_steps is None:
            return f"{head}{self.phase} ({_duration(now - self._t0)} so far)"
        done = self.n - self.start_n
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        u = self.unit
        text = f"{head}{u} {self.n}/{self.total}{pct}"
        el = now - self._t_steps
        if done > 0 and el > 0:
            rate = done / el
            text += (f", {_rate(rate)} {u}s/s" if rate >= 1 else f", {_rate(1.0 / rate)} s/{u}")
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        for k, v in self._post.items():
            text += f", {k} {v}"
        if self.phase != "steps":
            text += f"; {self.phase}"
        return text

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self._log(self.line())

    def begin_steps(self, initial: int) -> None:
        """The build is done; steps start at ``initial`` (the resumed step)."""
        import time

        self.n = self.start_n = initial
        self.phase = "steps"
        self._t_steps = time.monotonic()
        if self._bar is not None:
            self._bar.n = initial
            self._bar.refresh()

    def set_phase(self, phase: str) -> None:
        """The current phase; without a terminal, each new phase before the first step is also
        announced at once (a fast phase would otherwise fall between two beats)."""
        announce = self._thread is not None and self._t_steps is None and phase != self.phase
        self.phase = phase
        if announce:
            self._log(self.line())

    def count(self, done: int, total: int) -> None:
        """Work counted in units rather than stepped (``launch/eval.py``: samples): ``done``
        of ``total``; the first call starts the clock of the rate and ETA."""
        if self._t_steps is None:
            self.total = total
            self.begin_steps(0)
        self.n = done

    def update(self, m: Mapping[str, float]) -> None:
        post = {}
        for key, label in (("reward_mean", "reward"), ("loss", "loss"),
                           ("time/step_s", "step_s")):
            if key in m and m[key] is not None:
                post[label] = f"{m[key]:.4g}"
        self.n += 1
        self._post = post
        if self._bar is None:
            return
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()


class PhaseTimer:
    """Wall time per phase of a step (``time/<phase>_s`` metrics)."""

    def __init__(self):
        self.t = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()
