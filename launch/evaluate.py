"""Runs the config's evaluators (config.evals) on a trained checkpoint.

  python launch/evaluate.py --config=configs/audio_video_text.py --workdir=runs/avt
  python launch/evaluate.py ... --split=train --step=1000 --out=eval.json

Restores the newest checkpoint in --workdir (or --step), runs every entry of config.evals
(retrieval between every modality pair and fused query, re-ranking, ...) on --split
(default: each entry's own split), prints the tables and writes the metrics as JSON
(default: {workdir}/eval_{split}_step{step}.json).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import CONFIG, WORKDIR, join_runtime  # launch/common.py
import jax
from xmodal_jax import files
from xmodal_jax.eval import evaluators, retrieval
from xmodal_jax import experiment as experiment_lib

_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: each evaluator's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Metrics JSON path.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  join_runtime()
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=_STEP.value,
                                    require_checkpoint=True)
  split = _SPLIT.value or experiment.config.data.eval_split
  metrics = evaluators.run(experiment.config, experiment.embedder, experiment.state.params,
                           split=_SPLIT.value)
  print(f"step {experiment.step}")
  print(retrieval.format_tables(metrics), flush=True)
  out = _OUT.value or os.path.join(WORKDIR.value, f"eval_{split}_step{experiment.step}.json")
  if jax.process_index() == 0:
    files.write_atomically(out, json.dumps({"step": experiment.step, "split": split, **metrics},
                                           indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
