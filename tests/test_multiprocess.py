"""Two processes x 4 CPU devices (jax.distributed over localhost) give one process's loss."""

import json
import os
import socket
import subprocess
import sys

import pytest

from xmodal_jax import losses

import distributed_worker  # pylint: disable=g-bad-import-order


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


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
