"""Stopping a stage the way pods are preempted: SIGTERM (the scheduler's notice) or SIGINT
(Ctrl-C) asks the stage loop to stop; it finishes the step in flight, writes a checkpoint of
it, waits for the write and exits with :class:`~cascade_jax.runner.errors.Preempted` (exit code
75). A second signal while that happens aborts at once (``KeyboardInterrupt``; the partial
checkpoint is discarded by orbax at the next start, the previous one is used).

Multi-host: every process must stop after the same step, or the collectives of the next step
hang. :meth:`StopSignals.poll` is called by every process once per step with the step number:

* SIGTERM belongs to JAX's preemption service there (``jax.distributed.initialize`` installs
  the coordination service's notifier, which forwards the notice to every process); the step at
  which all processes stop is the one at which
  ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` is true (MaxText and
  orbax's ``CheckpointManager.reached_preemption`` use the same sync point);
* SIGINT (and SIGTERM where the preemption service is off) is seen by one process only, so the
  processes exchange their flags (``process_allgather``) and stop if any has one;
* the wall-clock checkpoint decision (``run.checkpoint_every_s``) is process 0's, shared in the
  same exchange, so every process saves the same steps.

In a single process only the local flags count and nothing is exchanged.

``tests/test_preempt_multihost.py`` runs this for real: ``launch/run.py`` as two CPU processes
on localhost, SIGTERM to one of them, both checkpoint the same step and exit 75, and the rerun
ends with the uninterrupted run's weights bit for bit. (Orbax writes the host-local leaves of
the state -- the RNG key -- as replicated global arrays, :mod:`cascade_jax.runner.checkpoint`.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

import numpy as np

__all__ = ["StopSignals", "hold_point", "jax_preemption_service"]

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set :attr:`signal_name` instead of
    killing the process (see the module doc); the previous handlers come back on exit. An
    ignored SIGINT stays ignored. Outside the main thread (where Python cannot install
    handlers) it only polls JAX's sync point."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signal_name: Optional[str] = None
        self._old: dict = {}
        self._event = threading.Event()

    # -- handlers --------------------------------------------------------------------------------

    def _handler(self, signum, frame):
        name = _NAMES.get(signum, str(signum))
        if self.signal_name is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt(f"second {name}")
        self.signal_name = name
        self._event.set()
        self.log(f"{name} received: finishing the current step, then writing a checkpoint and "
                 f"exiting (send it again to abort without one)")

    def __enter__(self) -> "StopSignals":
        import jax

        if threading.current_thread() is threading.main_thread():
            # a process started with SIGINT ignored (a background job of a script) keeps ignoring
            # it, as Python's own Ctrl-C handling does: the same outside the steps and in them
            sigs = [signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else []
            if jax.process_count() == 1 or not jax_preemption_service():
                sigs.append(signal.SIGTERM)
            for s in sigs:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    # -- per step ----------------------------------------------------------------------------

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a stop request; whether one arrived."""
        return self._event.wait(timeout)

    def poll(self, step: int, time_due: bool) -> tuple[bool, bool]:
        """``(stop, save_for_time)`` after ``step``, the same on every process: ``stop`` if a
        stop was requested here or anywhere (or the preemption sync point is reached);
        ``save_for_time`` is process 0's ``time_due``."""
        import jax

        if jax.process_count() == 1:
            return self.requested, time_due
        from jax.experimental import multihost_utils

        preempted = False
        try:
            preempted = bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is off: the exchange below carries it
            pass
        flags = np.asarray([int(self.requested), int(time_due)], np.int32)
        every = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2)
        stop = preempted or bool(every[:, 0].max())
        if stop and self.signal_name is None:
            self.signal_name = "SIGTERM (preemption notice)" if preempted else "a stop request"
        return stop, bool(every[0, 1])


#: the coordination-service key under which JAX's preemption sync manager publishes a notice
#: (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc)
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def jax_preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (``jax.distributed.initialize`` with
    ``jax_enable_preemption_service``, on by default): SIGTERM is then caught by its notifier
    on whichever process receives it and published to every process."""
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def hold_point(step: int, stop: StopSignals, limit_s: float = 300.0) -> None:
    """Test hook: with ``CASCADE_FAULT=hold@<step>`` in the environment the loop waits here,
    after ``step`` and its checkpoint, until a stop request arrives (at most ``limit_s``), so a
    test can deliver SIGTERM from outside at a known step. It logs ``holding after step <n>``
    first. Under JAX's preemption service (several processes) SIGTERM never reaches Python:
    every process then waits until the coordination service holds the preemption notice (the
    key JAX's sync manager writes when any process is signalled), after which the sync point
    falls at this step or the next few, the same on every process."""
    if os.environ.get("CASCADE_FAULT") != f"hold@{step}":
        return
    stop.log(f"holding after step {step}")
    t0 = time.monotonic()
    if jax_preemption_service():
        from jax._src import distributed

        client = distributed.global_state.client
        while time.monotonic() - t0 < limit_s:
            try:  # blocks up to 1 s, raises while the key is absent
                client.blocking_key_value_get(_NOTICE_KEY, 1000)
                return
            except Exception:  # noqa: BLE001 - the client's timeout error type is not exported
                continue
        return
    while not stop.requested and time.monotonic() - t0 < limit_s:
        stop.wait(0.05)
