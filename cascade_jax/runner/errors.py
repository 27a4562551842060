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
1      RunError              anything else the runner detects (the message says what)
=====  ====================  ==================================================================
"""

from __future__ import annotations

__all__ = ["RunError", "ConfigError", "InputFileError", "RunDirError", "CheckpointLoadError",
           "RolloutUnavailable", "EXIT_CODES"]


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


EXIT_CODES = {c.__name__: c.exit_code for c in
              (RunError, ConfigError, InputFileError, RunDirError, CheckpointLoadError,
               RolloutUnavailable)}
