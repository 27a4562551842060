"""One step off-policy (``rollout.max_policy_lag: 1``; NeMo-RL's ``max_trajectory_age_steps: 1``).

Strictly on-policy (lag 0, the paper) step ``t`` (1-based) is ``rollouts(w_{t-1}) → train →
sync w_t``. With lag 1 the rollouts of step ``t+1`` are drawn from the engine (weights
``w_{t-1}``) while step ``t`` trains, so a step costs about ``max(rollout, train) + sync``
instead of ``rollout + train + sync``::

    step t:  batch_t = pending (drawn during step t-1 from w_{t-2}; step 1 draws its own from w_0)
             start: batch_{t+1} = rollouts(w_{t-1})          (a worker thread: engine, scorers, teachers)
             train on batch_t → w_t                           (lag w.r.t. the trained weights: 1)
             wait for batch_{t+1} → sync w_t → pending = batch_{t+1}

so no rollout is ever in flight between steps (evaluation, checkpoints and a SIGTERM stop see
a quiet engine). The IS weights of the losses (``rl.is_weights``: the trainer's log-probs before
the update over the engine's) then correct the lag as well as the engine mismatch; the step
logs ``policy_lag_mean`` / ``_max``, ``weight_version/trainer`` / ``rollout_min`` / ``_max``
and the IS statistics.

Resume stays bit-exact: the pending batch is part of the run's state. Each checkpoint of step
``s`` writes ``<run dir>/pending/<s>.pkl`` (the batch of step ``s+1`` as numpy arrays and its
rollout metrics) before the checkpoint itself; a resume at ``s`` trains on it instead of drawing
anew (its prompts were already taken from the data iterator whose state the checkpoint holds).
Only process 0 writes; all processes read it.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import pickle
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.runner.errors import RunDirError
from cascade_jax.runner.metrics import PhaseTimer

__all__ = ["OffPolicy", "PENDING_DIR"]

#: the run-dir folder of the pending batches (a run artefact)
PENDING_DIR = "pending"


class OffPolicy:
    """Drives :class:`~cascade_jax.runner.stage.Stage` one step off-policy (module docstring).
    ``step(step, timer) -> metrics`` replaces ``Stage.step``; ``save(step)`` and
    ``restore(step)`` keep the pending batch with the checkpoints."""

    def __init__(self, stage, run_dir: pathlib.Path, total_steps: int, *, writer: bool = True):
        self.stage, self.run_dir, self.total = stage, pathlib.Path(run_dir), total_steps
        self.writer = writer
        self.pending = None  # (batch, info) of the next step
        self._exhausted = False  # the data ran out drawing the next step's prompts
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead")

    # ---- steps ----------------------------------------------------------------------------

    def _draw(self, step: int, key, version: int):
        """``(batch, info, timer)`` of step ``step + 1`` (0-based ``step``) from the engine's
        weights ``version`` (run in the worker thread; reads nothing the train step writes)."""
        t = PhaseTimer()
        batch, info = self.stage._rollout_batch(step, key, t, version=version)
        return batch, info, t

    def step(self, step: int, timer) -> dict:
        st = self.stage
        if self._exhausted:
            raise StopIteration
        version = int(st.state.step)
        if self.pending is None:  # the first step (or a resume at 0): draw it on-policy
            st.rng, key = jax.random.split(st.rng)
            with timer("rollout_reward"):
                batch, info = st._rollout_batch(step, key, timer, version=version)
        else:
            batch, info = self.pending
        self.pending = None
        ahead = None
        if step + 1 < self.total:
            st.rng, key = jax.random.split(st.rng)
            ahead = self._pool.submit(self._draw, step + 1, key, version)
        try:
            m = st.train_on(batch, info, timer, sync=False)
        finally:
            if ahead is not None:
                with timer("rollout_wait"):
                    concurrent.futures.wait([ahead])
        if ahead is not None:
            try:
                nb, ninfo, t = ahead.result()
                self.pending = (nb, ninfo)
                m.update({f"time/ahead_{k}_s": v for k, v in t.t.items()})
            except StopIteration:  # the data ran out: this step stands, the next one stops
                self._exhausted = True
        with timer("sync"):
            st.sync_weights()
        return m

    # ---- the pending batch with the checkpoints ---------------------------------------------

    def _path(self, step: int) -> pathlib.Path:
        return self.run_dir / PENDING_DIR / f"{step}.pkl"

    def save(self, step: int, keep: Iterable[int] = ()) -> None:
        """Write the pending batch for checkpoint ``step`` (before the checkpoint is started)
        and drop those of steps not in ``keep`` (the checkpoints still on disk)."""
        if not self.writer:
            return
        d = self.run_dir / PENDING_DIR
        d.mkdir(parents=True, exist_ok=True)
        if self.pending is not None:
            batch, info = self.pending
            host = jax.tree.map(np.asarray, batch)
            tmp = self._path(step).with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps((host, info), protocol=pickle.HIGHEST_PROTOCOL))
            tmp.replace(self._path(step))
        keep = set(keep) | {step}
        for p in d.glob("*.pkl"):
            if p.stem.isdigit() and int(p.stem) not in keep:
                p.unlink(missing_ok=True)

    def restore(self, step: int) -> None:
        """The pending batch of checkpoint ``step`` (none at the last step or at 0)."""
        if step == 0 or step >= self.total:
            return
        p = self._path(step)
        if not p.is_file():
            raise RunDirError(f"run dir {self.run_dir}: checkpoint {step} of a rollout.max_policy_lag 1 run "
                              f"has no pending batch {p}; pass --fresh to start over")
        host, info = pickle.loads(p.read_bytes())
        self.pending = (jax.tree.map(jnp.asarray, host), info)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def make(stage, run_dir, total_steps: int, *, writer: bool) -> Optional[OffPolicy]:
    """An :class:`OffPolicy` driver for RL stages with ``rollout.max_policy_lag`` 1, else None."""
    cfg = stage.config
    if stage.obj == "sft" or cfg.rollout.max_policy_lag == 0:
        return None
    return OffPolicy(stage, run_dir, total_steps, writer=writer)
