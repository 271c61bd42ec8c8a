"""Joining JAX's distributed runtime, so that every host of a slice or cluster runs the same
program over one global mesh (docs/architecture.md, "Several hosts")."""

import os

import jax

MODES = ("auto", "on", "off")

# Environment variables by which a scheduler says this process is one of several.
_CLUSTER_HINTS = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "a TPU slice",
    "JOB_COMPLETION_INDEX": "a Kubernetes indexed job",
}


def _cluster():
  """The scheduler that started this process as one of several, or None."""
  for var, name in _CLUSTER_HINTS.items():
    value = os.environ.get(var, "")
    several = len(value.split(",")) > 1 if var == "TPU_WORKER_HOSTNAMES" else (
        value.isdigit() and int(value) > 1)
    if var == "JOB_COMPLETION_INDEX":
      several = bool(value) and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if several:
      return name
  return None


def initialize(mode="auto", coordinator_address=None, num_processes=None, process_id=None):
  """Joins the distributed runtime when asked or when a scheduler started several processes;
  returns whether it did. With `coordinator_address` the processes are named explicitly
  (`num_processes` and `process_id` then required); otherwise JAX detects them (TPU VMs,
  SLURM, Open MPI, Kubernetes). Mode "off", or "auto" outside a cluster, is one process."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if mode == "off":
      raise ValueError("--distributed=off with --coordinator_address/--num_processes/"
                       "--process_id: drop one or the other")
    if any(x is None for x in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                       f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id}: expected 0 .. {num_processes - 1}")
  elif mode == "off" or (mode == "auto" and _cluster() is None):
    return False
  # CPU devices of several processes talk through gloo; accelerators ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True
