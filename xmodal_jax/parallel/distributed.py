"""Joining JAX's distributed runtime, so that every host of a slice or cluster runs the same
program over one global mesh (docs/architecture.md, "Several hosts")."""

import os
import re

import jax
import numpy as np

MODES = ("auto", "on", "off")

def _count(var):
  value = os.environ.get(var, "")
  return int(value) if value.isdigit() else 1


def _cluster():
  """The scheduler that started this process as one of several, or None."""
  if os.environ.get("SLURM_JOB_ID") and _count("SLURM_NTASKS") > 1:
    return "SLURM"
  if _count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
  # Off a TPU, libtpu may leave a warning text in TPU_WORKER_HOSTNAMES: names only count.
  if len(hosts) > 1 and all(re.fullmatch(r"[\w.:-]+", h) for h in hosts):
    return "a TPU slice"
  return None


def initialize(mode="auto", coordinator_address=None, num_processes=None, process_id=None):
  """Joins the distributed runtime when asked or when a scheduler started several processes;
  returns whether it did. With `coordinator_address` the processes are named explicitly
  (`num_processes` and `process_id` then required); otherwise JAX detects them (TPU VMs,
  SLURM, Open MPI, Kubernetes). "auto" joins under SLURM with several tasks, Open MPI with
  several ranks or a multi-host TPU slice; "off", or "auto" elsewhere, is one process."""
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


class HostFailed(RuntimeError):
  """Process 0 failed in work the others were taking part in; they stop too."""


def _any_failed(failed):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(failed))).any())


def run_on_first_process(work, steps):
  """`work(steps)` on process 0 while every other process only steps through `steps` (an
  iterable whose items run collectives, such as gathered embeddings); returns work's result
  on process 0, None elsewhere.

  Without this, an error in `work` (a full disk, a bad path) leaves the other processes
  waiting in their next collective for a process that has gone. Here every process checks
  a shared flag before each item and after the last, and process 0, on an error, steps on to
  the next check and sets it: every other process then raises HostFailed and process 0
  re-raises its error.
  """
  if jax.process_count() == 1:
    return work(steps)
  failed = False

  def checked():
    for step in steps:
      if _any_failed(failed):
        raise HostFailed("process 0 failed; stopping with it")
      yield step
    if _any_failed(failed):
      raise HostFailed("process 0 failed; stopping with it")

  stream = checked()
  if jax.process_index() != 0:
    for _ in stream:
      pass
    return None
  try:
    return work(stream)
  except Exception:
    failed = True
    try:
      for _ in stream:
        pass
    except HostFailed:
      pass
    raise
