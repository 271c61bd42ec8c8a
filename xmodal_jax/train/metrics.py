"""Metric writers: {workdir}/metrics.jsonl, TensorBoard event files, and progress on stdout."""

import json
import os
import time

import jax
import numpy as np

from xmodal_jax import files
from xmodal_jax.train import event_file


def _scalar(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def read_records(path):
  """The JSON objects of a metrics.jsonl. A torn last line (the writer was killed mid-line)
  is dropped with a notice; any other unreadable line is an error naming it."""
  text = files.read_text(path)
  lines = [(number, line) for number, line in enumerate(text.splitlines(keepends=True), start=1)
           if line.strip()]
  records = []
  for number, line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number != lines[-1][0] or line.endswith("\n"):
        raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
      print(f"{path}:{number}: dropping a torn last line (written when the run was killed)",
            flush=True)
  return records


class MetricWriter:
  """Writes one JSON object per logged step to metrics.jsonl and scalars to TensorBoard.

  On resume from `start_step`, lines of steps after it (written before the restart but not
  covered by the checkpoint) are dropped first, so every step appears once, and so is a torn
  last line (a kill mid-write); the file is rewritten atomically. Only process 0 writes, and
  every write reaches both files before it returns: there is nothing to close.
  """

  def __init__(self, workdir, start_step=0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.enabled:
      return
    files.makedirs(workdir)
    if files.exists(self.path):
      kept = [record for record in read_records(self.path) if record["step"] <= start_step]
      files.write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self.tensorboard = event_file.EventFile(workdir)

  def write(self, step, metrics):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with files.open_file(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.tensorboard.write_scalars(step, {
        key: value for key, value in record.items()
        if key != "step" and isinstance(value, (int, float))})


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


def validate_profile(profile):
  """config.profile: (first, last) steps to trace, 1 <= first <= last, or (0, 0) for none."""
  ok = (isinstance(profile, (tuple, list)) and len(profile) == 2
        and all(isinstance(s, int) for s in profile)
        and (tuple(profile) == (0, 0) or 1 <= profile[0] <= profile[1]))
  if not ok:
    raise ValueError(f"config.profile={profile!r}: expected (first, last) steps with "
                     "1 <= first <= last, or (0, 0) for no trace")


class Profiler:
  """Traces steps first..last (config.profile) with jax.profiler into {workdir}/profile,
  for TensorBoard's profile plugin or Perfetto: the host's and devices' activity, without
  jax's Python function tracer. On Python 3.11 that tracer walks every thread's state while
  tf.data's threads create and delete theirs (each numpy_function call of the readers), and
  the process dies of a segmentation fault (tests/test_train.py runs that case)."""

  def __init__(self, profile, workdir):
    self.first, self.last = profile
    self.folder = os.path.join(workdir, "profile")
    self.options = jax.profiler.ProfileOptions()
    self.options.python_tracer_level = 0

  def before(self, step):
    if self.first and step == self.first:
      jax.profiler.start_trace(self.folder, profiler_options=self.options)

  def after(self, step):
    if self.first and step == self.last:
      jax.profiler.stop_trace()
      print(f"profile of steps {self.first}-{self.last} -> {self.folder}", flush=True)


# Peak dense bfloat16 FLOP/s per chip by jax's device_kind; GPU kinds match by prefix
# ("NVIDIA H100 80GB HBM3"; SXM parts' figures).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
              "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops(device_kind):
  """The chip's peak FLOP/s, or None where unknown (CPUs, other chips)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  return next((v for k, v in PEAK_FLOPS.items()
               if k.startswith("NVIDIA") and device_kind.startswith(k)), None)


class Throughput:
  """examples/s over the steps since the last log and, given the step's FLOPs on chips of
  known peak, MFU: the model's FLOP/s over the chips' peak. Starts its clock at `start()`
  (after the first step, so the compile is not counted)."""

  def __init__(self, batch_size, peak_per_chip=None, chips=1, clock=time.perf_counter):
    self.batch_size, self.clock, self.flops = batch_size, clock, None  # flops: set per step
    self.peak = peak_per_chip * chips if peak_per_chip else None
    self.since, self.steps = None, 0

  def start(self):
    self.since, self.steps = self.clock(), 0

  def add_step(self):
    self.steps += self.since is not None

  def pop(self):
    """{"examples_per_s", ["mfu"]} since the last pop ({} before start or with no step)."""
    if self.since is None or not self.steps:
      return {}
    now = self.clock()
    steps_per_s = self.steps / max(now - self.since, 1e-9)
    out = {"examples_per_s": steps_per_s * self.batch_size}
    if self.flops and self.peak:
      out["mfu"] = steps_per_s * self.flops / self.peak
    self.since, self.steps = now, 0
    return out


class SourceTally:
  """A mixture's per-source train metrics: the rows each source gave since the last log
  (summed on the devices, no wait per step), turned at a log into
  "source/{name}/fraction", ".../rows" and the logged step's ".../loss" (absent when the
  source has no row in that step's batch)."""

  KEYS = ("source_rows", "source_loss")

  def __init__(self, names):
    self.names, self.rows = list(names), None

  def add(self, step_metrics):
    if self.names:
      rows = step_metrics["source_rows"]
      self.rows = rows if self.rows is None else self.rows + rows

  def pop(self, step_metrics):
    """The named metrics at a log (step_metrics fetched to the host); resets the count."""
    if not self.names:
      return {}
    rows = np.asarray(jax.device_get(self.rows), np.int64)
    self.rows = None
    out = {}
    for k, name in enumerate(self.names):
      out[f"source/{name}/fraction"] = float(rows[k] / max(rows.sum(), 1))
      out[f"source/{name}/rows"] = int(rows[k])
      if step_metrics["source_rows"][k]:
        out[f"source/{name}/loss"] = float(step_metrics["source_loss"][k])
    return out
