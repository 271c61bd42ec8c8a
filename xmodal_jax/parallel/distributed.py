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
  """Another process failed in work this one was taking part in; this one stops too."""


class InStep:
  """Iterates `items` on every process in step, for items whose making runs collectives
  (gathered or sharded embeddings): an error in any process's work on an item, inside the
  `with`, stops every process before the next item instead of leaving the others waiting in
  its collective for a process that has gone.

      with distributed.InStep(batches) as stream:
        for batch in stream:
          write(batch)        # an error here, on any process, stops them all

  Every process agrees before each item and once on leaving: the failing process re-raises
  its error, the others raise HostFailed naming it. An error in making an item (inside
  `items`) on one process alone is not covered: the others are already in its collective.
  """

  def __init__(self, items):
    self._items, self._settled = iter(items), False

  def _agree(self, failed):
    """Every process's `failed`; raises HostFailed here when another process failed."""
    if jax.process_count() == 1:
      return
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failures = np.flatnonzero(np.asarray(multihost_utils.process_allgather(np.int32(failed))))
    if failures.size and not failed:
      self._settled = True
      raise HostFailed(f"process {failures[0]} failed; stopping with it")

  def __enter__(self):
    return self

  def __iter__(self):
    while True:
      self._agree(False)
      try:
        item = next(self._items)
      except StopIteration:
        return
      yield item

  def __exit__(self, kind, error, traceback):
    if not self._settled:
      self._settled = True
      self._agree(error is not None)
    return False
