"""Trains a multi-modal embedding model and evaluates retrieval between every modality pair.

  python launch/train.py --config=configs/audio_video_text.py --workdir=runs/avt
  python launch/train.py --config=configs/audio_video_text.py:tiny --workdir=runs/tiny \
      --config.total_steps=20

Every host of a multi-host job runs the same command (docs/architecture.md, "Several hosts").

Re-running the same command resumes from the newest checkpoint in --workdir. Exit status 3:
training stopped on non-finite steps (config.nonfinite); the checkpoints are finite. SIGTERM
or SIGINT save a checkpoint at the next step boundary and exit with 143 or 130 (128 + the
signal), as a process the signal killed reports it; re-running loses no step. A checkpoint
that cannot be written (a full disk) stops the run with status 1 and a last line naming the
step that found it.
"""

import logging as std_logging
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before tf.data loads: its INFO is noise.

from absl import app, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import common  # launch/common.py
from xmodal_jax.train import checkpoint, nonfinite, preemption, run_lock

NONFINITE_EXIT_STATUS = 3  # Training stopped on non-finite steps (config.nonfinite).

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax and TensorBoard are chatty at INFO.
  # A failed save leaves Orbax's other writes unawaited: asyncio logs each of them, and the
  # interpreter warns at exit about each coroutine it collects. The failure itself is
  # reported once, as checkpoint.SaveFailed, on the last line.
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  common.join_runtime()
  # Imported here, after the flags are checked: a usage error then stops the launcher in
  # under 2 s instead of after the imports that bring TensorFlow (6 s).
  from xmodal_jax import experiment
  try:
    experiment.train(common.CONFIG.value, common.WORKDIR.value,
                     allow_config_change=common.ALLOW_CONFIG_CHANGE.value)
  except (run_lock.WorkdirLocked, checkpoint.SaveFailed) as e:
    sys.exit(f"error: {e}")
  except nonfinite.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(NONFINITE_EXIT_STATUS)
  except preemption.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(128 + e.signal_number)  # As a process killed by the signal reports it.


if __name__ == "__main__":
  app.run(main)
