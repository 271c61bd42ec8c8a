"""Compiles a config's train step ahead of time and prints what it needs per chip.

  python launch/compile.py --config=configs/image_text.py:L --topology=v5e:16x16
  python launch/compile.py --config=configs/audio_video_text.py:tiny   # the local devices

--topology takes any TPU topology name (v5e:16x16, v4:2x2x2, v5p:4x4x4, ...) and compiles
for its chips on this host, which needs libtpu (pip install -e '.[tpu]'), not a TPU. Prints
per-chip state, temporaries and total memory against the chip's HBM, XLA's flops per step
and the compile time; exits 1 when the step does not fit, naming what XLA reported.
Nothing is read from the dataset (a features modality states its `shape`), and pretrained
towers need only their folders' config.json (and a text tower's tokenizer files), not their
weights.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if any(arg.startswith("--topology") for arg in sys.argv[1:]):
  # Compiling for chips that are not here: JAX runs on the CPU, and libtpu is told not to
  # look for a TPU on this host (it would print errors; nothing else depends on these).
  os.environ["JAX_PLATFORMS"] = "cpu"
  # ALLOW_MULTIPLE_LIBTPU_LOAD: no TPU is claimed, so another process may hold libtpu.
  for key, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0",
                     "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
    os.environ.setdefault(key, value)

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import jax
from xmodal_jax import experiment
from xmodal_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology such as v5e:16x16 "
                                "(default: this host's devices).")
_OUT = flags.DEFINE_string("out", None, "Also write the figures as JSON to this file.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    devices = aot.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else jax.devices()
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"Compiling the train step for {len(devices)} x {devices[0].device_kind}...",
        flush=True)
  try:
    _, report = experiment.compile_train_step(_CONFIG.value, devices)
  except ValueError as e:
    sys.exit(f"error: {e}")
  except jax.errors.JaxRuntimeError as e:
    reason = str(e).split("\n")[0]
    sys.exit(f"error: the train step does not compile for {len(devices)} x "
             f"{devices[0].device_kind}: {reason}")
  print(aot.format_report(report))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(report), f, indent=1)
  if not report.fits():
    sys.exit(f"error: {aot.size(report.total_bytes)} per chip does not fit "
             f"{aot.size(report.hbm_bytes)} of HBM")


if __name__ == "__main__":
  app.run(main)
