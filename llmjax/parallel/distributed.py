"""Starting JAX's multi-controller runtime: one process per host (or per GPU), all running the same program.

    initialize()                                           # one process, or a cluster JAX detects (SLURM, ...)
    initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # explicit

After it, jax.devices() lists every process's devices, meshes span hosts and XLA's collectives run
over NCCL (GPU) or Gloo (CPU). Call it before anything else touches JAX's backends.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

log = logging.getLogger(__name__)

# Environment variables by which JAX recognizes a cluster it can join without flags.
CLUSTER_ENVIRONMENTS = {
    "SLURM_JOB_ID": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU",
    "MEGASCALE_COORDINATOR_ADDRESS": "Megascale",
}


class DistributedError(RuntimeError):
    """A multi-process start that cannot go ahead; the message says what to fix."""


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX would join by itself, if any."""
    return next((name for var, name in CLUSTER_ENVIRONMENTS.items() if var in os.environ), None)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"--coordinator {address!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    return host, int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until the coordinator accepts TCP connections, or raise after timeout_s.

    JAX's own client aborts the whole process (a C++ fatal error) when the coordinator never answers,
    so the other processes check that it is up before handing over.
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"cannot reach the coordinator at {address} after {timeout_s:.0f} s ({error.strerror or error}); "
                    f"start process 0 first, check the address and port, or raise --init-timeout"
                ) from None
            time.sleep(0.5)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: float = 300.0) -> None:
    """Join the other processes of this job (a no-op for a lone process outside any cluster).

    coordinator / num_processes / process_id: all three, or none to let JAX read them from a cluster
    environment (SLURM, Open MPI, Cloud TPU). timeout_s: how long to wait for the coordinator.
    """
    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [flag for flag, value in explicit.items() if value is not None]
    if given and len(given) < 3:
        missing = [flag for flag in explicit if flag not in given]
        raise DistributedError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process start needs all three")
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
        if num_processes == 1:
            return
        parse_address(coordinator)
        if process_id != 0:
            wait_for_coordinator(coordinator, timeout_s)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU meshes across processes
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=int(timeout_s))
    elif detected_cluster() is not None:
        log.info("joining the %s job's processes", detected_cluster())
        jax.distributed.initialize(initialization_timeout=int(timeout_s))
    else:
        return
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
