"""Multi-host start through JAX's own distributed runtime (no process orchestration here).

:func:`initialize_distributed` calls ``jax.distributed.initialize``:

* with explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` when given (or
  from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
* otherwise with no arguments when a cluster is detected — JAX reads SLURM's
  ``SLURM_*`` variables, Open MPI's ``OMPI_*`` and the TPU pod metadata itself;
* not at all in a single process (nothing detected).

After it, ``jax.devices()`` lists every host's devices, :func:`cascade_jax.sharding.make_mesh`
spans them, and only process 0 (:func:`is_primary`) writes logs and checkpoint metadata.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

__all__ = ["initialize_distributed", "is_primary", "cluster_detected"]

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_detected() -> bool:
    """Whether the environment looks like a multi-process launch JAX can auto-configure."""
    if any(k in os.environ for k in _CLUSTER_ENV):
        if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            return False
        return True
    return False


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None,
                           local_device_ids=None) -> bool:
    """Join the job's processes; returns whether ``jax.distributed`` was initialized."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("initialize_distributed: coordinator_address needs num_processes and "
                             "process_id (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids)
        return True
    if cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """Process 0: the only one writing logs and checkpoint metadata."""
    return jax.process_index() == 0
