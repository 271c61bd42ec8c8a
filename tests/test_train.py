"""launch/train.py end to end: resume after SIGKILL, 1 vs 8 devices, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_train

CONFIG = os.path.join(REPO, "configs", "audio_video_text.py")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_tiny_run_trains_evaluates_and_resumes_when_done(digit_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={digit_data_dir}"]
  out = run_train(args).stdout
  assert "test/audio->text" not in out and "audio->text" in out  # The printed table.
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
  final = records[-1]
  assert final["step"] == 6
  for pair in ("audio->video", "audio->text", "video->audio", "video->text", "text->audio",
               "text->video"):
    for metric in ("R@1", "R@5", "R@10", "MedR", "MnR"):
      assert f"test/{pair}/{metric}" in final
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # Re-running a finished run restores it and only evaluates.
  again = run_train(args).stdout
  assert "Resuming from the checkpoint of step 6" in again
  assert "step 2/6" not in again
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [2, 4, 6]


def test_sigkill_midway_then_rerun_resumes_and_logs_each_step_once(digit_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={digit_data_dir}", "--config.total_steps=400",
          "--config.checkpoint_every=20", "--config.log_every=10", "--config.evals.retrieval.every=400"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "train.py"), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(
        checkpoints) else []
    if steps and max(steps) >= 40:
      break
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(r["step"] for r in read_metrics(workdir))
  assert killed_at < 400
  out = run_train(args).stdout
  resumed_from = int(out.split("Resuming from the checkpoint of step ")[1].split(".")[0])
  assert 40 <= resumed_from < 400
  steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
  assert steps == list(range(10, 401, 10)), "each logged step must appear exactly once"
  assert "test/video->text/R@1" in read_metrics(workdir)[-1]


def test_eight_devices_give_the_same_loss_curve_as_one(digit_data_dir, tmp_path):
  curves = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f"run{devices}")
    out = run_train([f"--config={CONFIG}:tiny", f"--workdir={workdir}",
                     f"--config.data.data_dir={digit_data_dir}", "--config.total_steps=8",
                     "--config.log_every=1", "--config.evals.retrieval.every=8"], devices=devices).stdout
    assert f"{devices} devices" in out
    curves[devices] = train_losses(workdir)
  assert sorted(curves[1]) == list(range(1, 9))
  np.testing.assert_allclose([curves[8][s] for s in range(1, 9)],
                             [curves[1][s] for s in range(1, 9)], rtol=2e-5)


@pytest.mark.parametrize("override, message", [
    ("--config.bogus_key=1", "bogus_key"),
    ("--config.data.data_dir=/no/such/folder", "/no/such/folder"),
    ("--config.modalities.audio.feature=speech", "speech"),
    ("--config.loss.kind=hinge", "config.loss.kind='hinge'"),
])
def test_bad_config_stops_before_compiling_and_names_the_culprit(digit_data_dir, tmp_path,
                                                                  override, message):
  args = [f"--config={CONFIG}:tiny", f"--workdir={tmp_path}", override]
  if "data_dir" not in override:
    args.append(f"--config.data.data_dir={digit_data_dir}")
  proc = run_train(args, check=False)
  assert proc.returncode != 0
  assert message in proc.stdout + proc.stderr
  assert "parameters;" not in proc.stdout  # Nothing was built or compiled.


@pytest.mark.parametrize("variant, impl", [("tiny,regression", "blockwise"),
                                           ("tiny,sigmoid", "ring")])
def test_objective_variants_train_sharded(digit_data_dir, tmp_path, variant, impl):
  workdir = str(tmp_path / "run")
  run_train([f"--config={CONFIG}:{variant}", f"--workdir={workdir}",
             f"--config.data.data_dir={digit_data_dir}", f"--config.loss.impl={impl}",
             "--config.loss.block_size=1"], devices=8)
  records = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in records)
  if "regression" in variant:
    assert "train/regression/audio-video/regression" in records[-1]
    assert "train/contrastive" not in records[-1]
  else:
    assert "train/logit_bias" in records[-1]
    assert records[0]["train/logit_bias"] == pytest.approx(-10.0, abs=0.1)
