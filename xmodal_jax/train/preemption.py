"""Preemption: SIGTERM (what TPU and cloud schedulers send before taking a machine away) or
SIGINT (Ctrl-C) asks training to save a checkpoint at the next step boundary and stop, so
that re-running the same command loses no step.

One process catches the signals itself. Several processes (jax.distributed) use JAX's
preemption sync point instead, which the distributed runtime's own SIGTERM notifier drives,
so that every host stops after the same step.
"""

import contextlib
import signal

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training saved the checkpoint of `step` and stopped on `signal_number`."""

  def __init__(self, step, signal_number):
    name = signal.Signals(signal_number).name if signal_number else "preemption notice"
    super().__init__(f"preempted ({name}) at step {step}: its checkpoint is saved; re-run the "
                     "same command to resume from it")
    self.step, self.signal_number = step, signal_number


class Watch:
  """Remembers the first SIGTERM or SIGINT while `installed()`; a second SIGINT stops at once
  (KeyboardInterrupt)."""

  def __init__(self):
    self.signal_number = None
    self.distributed = jax.process_count() > 1

  def _handle(self, signal_number, frame):
    del frame
    if self.signal_number is not None and signal_number == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_number = signal_number

  @contextlib.contextmanager
  def installed(self):
    if self.distributed:  # The distributed runtime's notifier owns SIGTERM.
      yield self
      return
    previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def reached(self, step):
    """Whether to save and stop after `step` (the same answer on every process)."""
    if self.distributed:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_number = self.signal_number or signal.SIGTERM
        return True
      return False
    return self.signal_number is not None
