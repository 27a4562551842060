"""Errors the runner reports as one line with a distinct process exit code.

Bad input never ends in a traceback: every check that can fail on user input raises
:class:`RunError` (or a subclass) naming the bad thing, and ``launch/run.py`` prints
``error: <message>`` and exits with the class's ``exit_code``.

=====  ====================  ==================================================================
code   class                 when
=====  ====================  ==================================================================
2      ConfigError           unknown stage or key, ill-typed or out-of-range value
3      InputFileError        a config / dataset / checkpoint path is missing or unreadable
4      RunDirError           the run dir holds a different run (pass ``--fresh``) or is unusable
5      CheckpointLoadError   a checkpoint does not load or does not fit the configured model
6      RolloutUnavailable    a rollout server is unreachable or a weight sync failed
7      OutputError           the run cannot write its files (disk full, quota, file size limit,
                             permissions)
75     Preempted             SIGTERM / SIGINT (a pod preemption, Ctrl-C) during the steps: the
                             stage wrote a checkpoint of its last finished step; rerun the same
                             command to resume (75 is ``EX_TEMPFAIL`` of ``sysexits.h``: "try
                             again later", which schedulers may retry)
130    (KeyboardInterrupt)   Ctrl-C / SIGTERM outside the steps (build, compile, evaluation):
                             nothing half-written is kept; rerunning the command continues
1      RunError              anything else the runner detects (the message says what)
=====  ====================  ==================================================================
"""

from __future__ import annotations

import errno

__all__ = ["RunError", "ConfigError", "InputFileError", "RunDirError", "CheckpointLoadError",
           "RolloutUnavailable", "OutputError", "Preempted", "EXIT_CODES", "INTERRUPTED_EXIT",
           "disk_error"]

#: exit status of a command interrupted outside a stage's steps (128 + SIGINT, the shell's)
INTERRUPTED_EXIT = 130


class RunError(RuntimeError):
    """A failure the runner reports as one line; ``exit_code`` is the process exit status."""

    exit_code = 1


class ConfigError(RunError):
    exit_code = 2


class InputFileError(RunError):
    exit_code = 3


class RunDirError(RunError):
    exit_code = 4


class CheckpointLoadError(RunError):
    exit_code = 5


class RolloutUnavailable(RunError):
    exit_code = 6


class OutputError(RunError):
    exit_code = 7


class Preempted(RunError):
    """A stage stopped by SIGTERM / SIGINT after checkpointing its last finished step."""

    exit_code = 75


EXIT_CODES = {c.__name__: c.exit_code for c in
              (RunError, ConfigError, InputFileError, RunDirError, CheckpointLoadError,
               RolloutUnavailable, OutputError, Preempted)}

_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (file size limit)"}
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_error(exc: BaseException):
    """An :class:`OutputError` if ``exc`` (or an exception it was raised from or during) is a
    failed write for lack of space (``ENOSPC``, ``EDQUOT``, ``EFBIG``; orbax / tensorstore
    report these as text inside their own exception types), else ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            where = f" writing {exc.filename}" if exc.filename else ""
            return OutputError(f"cannot write the run's files{where}: {_DISK_ERRNOS[exc.errno]}; "
                               f"free space (or raise the limit) and rerun the same command")
        text = str(exc)
        hit = next((t for t in _DISK_TEXTS if t in text), None)
        if hit is not None:
            return OutputError(f"cannot write the run's files: {hit.lower()} "
                               f"({text.splitlines()[0][:160]}); free space and rerun the same "
                               f"command")
        exc = exc.__cause__ or exc.__context__
    return None
