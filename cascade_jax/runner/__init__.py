"""The stage runner: config → model, data, rollouts, rewards, teachers → the train loop with
orbax checkpoints, exact resume, metrics, evaluation and provenance.

    from cascade_jax.runner import run_stage
    summary = run_stage(config, "runs/my_stage")        # resumes if the run dir holds this run

``launch/run.py`` is the command line over :func:`run_stage`; ``launch/eval.py`` over
:mod:`cascade_jax.runner.evaluate`. Errors on bad input are :class:`RunError` subclasses with
distinct exit codes (:mod:`cascade_jax.runner.errors`).
"""

from cascade_jax.runner.errors import (EXIT_CODES, CheckpointLoadError, ConfigError,
                                       InputFileError, OutputError, Preempted, RolloutUnavailable,
                                       RunDirError, RunError)
from cascade_jax.runner.loop import RUN_ARTIFACTS, check_run_dir, run_stage

__all__ = ["run_stage", "check_run_dir", "RUN_ARTIFACTS", "RunError", "ConfigError",
           "InputFileError", "RunDirError", "CheckpointLoadError", "RolloutUnavailable",
           "OutputError", "Preempted", "EXIT_CODES"]
