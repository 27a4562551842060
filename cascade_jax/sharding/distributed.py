"""Multi-host start through JAX's own distributed runtime (no process orchestration here).

:func:`initialize_distributed` calls ``jax.distributed.initialize``:

* with explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` when given (or
  from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
* otherwise with no arguments when a multi-process cluster is detected (:func:`cluster_detected`:
  a SLURM step with more than one task, an Open MPI job with more than one rank, a TPU slice
  with more than one worker, a multi-slice TPU job, or ``CASCADE_DISTRIBUTED=1``) — JAX then
  reads SLURM's ``SLURM_*`` variables, Open MPI's ``OMPI_*`` and the TPU metadata itself;
* not at all in a single process.

After it, ``jax.devices()`` lists every host's devices, :func:`cascade_jax.sharding.make_mesh`
spans them, and only process 0 (:func:`is_primary`) writes logs and checkpoint metadata.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

__all__ = ["initialize_distributed", "leave_distributed", "sync_processes", "is_primary", "cluster_detected"]

def cluster_detected(env=None) -> bool:
    """Whether ``env`` (default ``os.environ``) is a multi-process launch JAX can auto-configure."""
    env = os.environ if env is None else env
    if env.get("CASCADE_DISTRIBUTED") == "1":
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in env


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


def leave_distributed(timeout_s: float = 60.0) -> None:
    """``jax.distributed.shutdown()`` if this process joined a job (else nothing), for a process
    about to end with ``os._exit`` (which skips JAX's own exit hook): every process leaves
    through the shutdown barrier, so the coordination service on process 0 outlives the
    others' last call. Bounded by ``timeout_s`` (a peer that already died is not waited for)."""
    import sys
    import threading

    if "jax" not in sys.modules or not jax.distributed.is_initialized():
        return
    t = threading.Thread(target=jax.distributed.shutdown, daemon=True, name="leave-distributed")
    t.start()
    t.join(timeout_s)


def sync_processes(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process of the job arrived here (a barrier of JAX's coordination
    service, no device collective); nothing in a single process. ``name`` must be the same on
    every process and new for each barrier."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
