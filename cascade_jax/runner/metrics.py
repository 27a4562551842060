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
from typing import Mapping

__all__ = ["MetricsWriter", "Progress", "scalars"]


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


class Progress:
    """A tqdm bar over the stage's steps showing the running reward (or loss) and step time."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "", enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                             mininterval=0.5)

    def update(self, m: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        post = {}
        for key, label in (("reward_mean", "reward"), ("loss", "loss"),
                           ("time/step_s", "step_s")):
            if key in m and m[key] is not None:
                post[label] = f"{m[key]:.4g}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
