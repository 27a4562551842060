"""The cascade: stage order and state, the MOPD teacher registry, reports and the MOPD-vs-GRPO study.

- :mod:`.registry` -- ``teachers.json``: per-checkpoint eval scores per domain; teacher policies.
"""

from .registry import (PAPER_ASSIGNMENT, REGISTRY_FILE, RegistryError, assign_teachers,
                       load_registry, record_assignment, register_checkpoint, save_registry,
                       score_matrix)

__all__ = ["PAPER_ASSIGNMENT", "REGISTRY_FILE", "RegistryError", "assign_teachers", "load_registry",
           "record_assignment", "register_checkpoint", "save_registry", "score_matrix"]
