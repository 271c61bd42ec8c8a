"""Shared fixtures. Tests never reach a network: hubs are offline, datasets are built here."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests in this process see 8 CPU devices (set before anything imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digit_data_dir(tmp_path_factory):
  """A data_dir holding the embedded digit_sequences dataset, built once per session."""
  from xmodal_jax.data.builders import digit_sequences
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  digit_sequences.DigitSequences(data_dir=data_dir).download_and_prepare()
  return data_dir


def run_train(args, *, devices=1, timeout=600, check=True):
  """Runs launch/train.py in a fresh process with `devices` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), *args],
                        env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f"train.py {args} failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr[-5000:]}")
  return proc
