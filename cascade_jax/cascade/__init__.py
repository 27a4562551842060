"""The cascade: stage order and state, the MOPD teacher registry, reports and the MOPD-vs-GRPO study.

- :mod:`.plan` -- the paper's stage order (with the RLHF side branch), per-stage configs, the
  resumable ``cascade_state.json``;
- :mod:`.registry` -- ``teachers.json``: per-checkpoint eval scores per domain; teacher policies;
- :mod:`.driver` -- :func:`run_cascade` / :func:`run_mopd` over the stage runner
  (``launch/run.py --stage=cascade`` / ``--stage=mopd``);
- :mod:`.report` -- ``report.md`` and its plots;
- :mod:`.study` -- MOPD vs continuing GRPO, claims declared before running (``launch/study.py``).
"""

from .driver import run_cascade, run_mopd
from .plan import CASCADE, STAGE_NAMES, StageSpec, stage_config
from .registry import (PAPER_ASSIGNMENT, REGISTRY_FILE, RegistryError, assign_teachers,
                       load_registry, record_assignment, register_checkpoint, save_registry,
                       score_matrix)
from .report import write_report, write_study_report

__all__ = ["run_cascade", "run_mopd", "CASCADE", "STAGE_NAMES", "StageSpec", "stage_config",
           "PAPER_ASSIGNMENT", "REGISTRY_FILE", "RegistryError", "assign_teachers", "load_registry",
           "record_assignment", "register_checkpoint", "save_registry", "score_matrix",
           "write_report", "write_study_report"]
