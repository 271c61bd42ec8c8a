"""Two processes x 4 CPU devices (jax.distributed over localhost) give one process's loss,
and launch/train.py runs as two processes like one."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CONFIG, free_port, run_train, start_launchers
from configs import audio_video_text
from xmodal_jax import losses
from xmodal_jax import experiment as experiment_lib

import distributed_worker  # pylint: disable=g-bad-import-order


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  out = str(tmp_path / "losses.json")
  port = free_port()
  worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(rank), out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for rank in (0, 1)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  with open(out) as f:
    results = json.load(f)
  emb, masks = distributed_worker.global_inputs()
  expected = {
      "softmax": float(losses.contrastive_loss(emb, 9.0, masks=masks)[0]),
      "regression": float(losses.similarity_regression_loss(emb, masks=masks)[0]),
  }
  assert len(results) == 6
  for key, value in results.items():
    assert value == pytest.approx(expected[key.split("/")[0]], rel=1e-5), key
  # InStep: an error in process 1's work stops process 0 too (it raises HostFailed instead
  # of waiting in the next item's collective), wherever the error happens.
  outcomes = []
  for rank in (0, 1):
    with open(f"{out}.failures{rank}") as f:
      outcomes.append(json.load(f))
  total = 2 * (0 + 1 + 2)
  assert outcomes[1] == {"before": "OSError", "first": "OSError", "last": "OSError",
                         "after": "OSError", "none": total, "in_step": 2}
  assert outcomes[0] == {"before": "HostFailed", "first": "HostFailed",
                         "last": "HostFailed", "after": "HostFailed", "none": total,
                         "in_step": 2}


def preempt(args, workdir, processes, after_lines):
  """Trains until metrics.jsonl has `after_lines` more lines, sends every process SIGTERM
  and returns the step they all saved and stopped after."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  lines = lambda: len(open(metrics).readlines()) if os.path.exists(metrics) else 0
  target, deadline = lines() + after_lines, time.time() + 300
  procs = start_launchers("train.py", args, processes)
  while lines() < target:
    assert all(p.poll() is None for p in procs) and time.time() < deadline, \
        "training ended before SIGTERM: " + procs[0].stderr.read()[-3000:]
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 128 + signal.SIGTERM, out + err[-3000:]
  saved = {int(err.split("preempted (SIGTERM) at step ")[1].split(":")[0]) for _, err in outs}
  assert len(saved) == 1, f"the processes stopped after different steps: {saved}"
  saved = saved.pop()
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert max(steps) == saved  # No periodic checkpoint: the preemption saved this one.
  return saved, outs[0][0]


def logged(workdir):
  """{step: train loss} and the last evaluation's metrics of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
  return ({r["step"]: r["train/loss"] for r in records if "train/loss" in r},
          [r for r in records if "test/audio->text/R@1" in r][-1])


@pytest.mark.slow
def test_preempted_runs_resume_on_either_layout_with_one_loss_curve(digit_data_dir, tmp_path):
  """What a TPU/cloud preemption sends (SIGTERM), at steps far from any periodic checkpoint,
  to a run that changes layout each time: 1 process x 8 devices (stopped, its checkpoint
  saved), then 2 x 4 from that checkpoint (both processes stop after the same step), then
  1 x 8 again to the end. Its loss curve and final table are those of one uninterrupted
  1 x 8 run, with every logged step once. (One 2-process leg: on CPU, gloo runs each tensor
  of a collective separately, about 0.4 s per step here.)"""
  args = [f"--config={CONFIG}:tiny", f"--config.data.data_dir={digit_data_dir}",
          "--config.total_steps=16", "--config.checkpoint_every=1000", "--config.log_every=2",
          "--config.evals.retrieval.every=16", "--config.evals.retrieval.fused=none"]
  # The uninterrupted 1 x 8 run, in this process (the suite's 8 devices): the launcher's loop.
  reference = str(tmp_path / "one_process")
  config = audio_video_text.get_config("tiny")
  config.update_from_flattened_dict({
      "data.data_dir": digit_data_dir, "total_steps": 16, "checkpoint_every": 1000,
      "log_every": 2, "evals.retrieval.every": 16, "evals.retrieval.fused": "none"})
  experiment_lib.train(config, reference)

  workdir = str(tmp_path / "layouts")
  args += [f"--workdir={workdir}"]
  first, _ = preempt(args, workdir, 1, after_lines=2)
  second, out = preempt(args, workdir, 2, after_lines=1)
  assert f"Resuming from the checkpoint of step {first}." in out
  assert 0 < first < second < 16
  out = run_train(args, devices=8).stdout
  assert f"Resuming from the checkpoint of step {second}." in out

  losses_one, table_one = logged(reference)
  losses_mixed, table_mixed = logged(workdir)
  assert sorted(losses_mixed) == sorted(losses_one) == list(range(2, 17, 2))
  np.testing.assert_allclose([losses_mixed[s] for s in sorted(losses_one)],
                             [losses_one[s] for s in sorted(losses_one)], rtol=2e-4)
  for key, value in table_one.items():
    if key.endswith("R@1"):
      assert table_mixed[key] == pytest.approx(value, abs=0.5), key


def test_runtime_is_joined_only_when_asked_or_started_as_several(monkeypatch):
  from xmodal_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed._cluster() is None  # pylint: disable=protected-access
  assert not distributed.initialize("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker "
                     "hostnames or IP addresses, please set env var")  # what libtpu leaves
  assert distributed._cluster() is None  # pylint: disable=protected-access
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
  assert distributed._cluster() == "a TPU slice"  # pylint: disable=protected-access
  assert not distributed.initialize("off")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  assert distributed._cluster() is None  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("auto", "localhost:1234", 2, None)
  with pytest.raises(ValueError, match=r"--process_id=2: expected 0 .. 1"):
    distributed.initialize("auto", "localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="--distributed=off with"):
    distributed.initialize("off", "localhost:1234", 2, 0)
  with pytest.raises(ValueError, match="expected one of"):
    distributed.initialize("yes")
