"""Metric writers: {workdir}/metrics.jsonl, TensorBoard event files, and progress on stdout."""

import json
import os
import time

import jax
import numpy as np


def _scalar(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
  """Writes one JSON object per logged step to metrics.jsonl and scalars to TensorBoard.

  On resume from `start_step`, lines of steps after it (written before the restart but not
  covered by the checkpoint) are dropped first, so every step appears once. Only process 0
  writes.
  """

  def __init__(self, workdir, start_step=0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tensorboard = SummaryWriter(logdir=workdir)

  def write(self, step, metrics):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.tensorboard.add_scalar(key, value, int(step))
    self.tensorboard.flush()

  def close(self):
    if self.enabled:
      self.tensorboard.close()


class Progress:
  """A one-line-per-log progress report: step, percent, loss, speed and time left."""

  def __init__(self, total_steps, start_step):
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()

  def line(self, step, loss):
    done = step - self.start
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    left = (self.total - step) / rate if rate > 0 else float("nan")
    return (f"step {step}/{self.total} ({100 * step / self.total:3.0f}%)  loss {loss:.4f}  "
            f"{rate:.2f} steps/s  eta {left / 60:.1f} min")
