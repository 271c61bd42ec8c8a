"""Exports the embeddings of every item of a split, for every modality it has.

  python launch/export.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --split=test --out=emb/

Writes {out}/{modality}.npy (float32, L2-normalized, one row per item in the order of
{out}/ids.npy), {out}/mask_{modality}.npy and {out}/meta.json (see xmodal_jax/eval/export.py).
Re-running after an interruption resumes from the batches already written.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import CONFIG, WORKDIR, join_runtime  # launch/common.py
from xmodal_jax import files
from xmodal_jax.eval import export
from xmodal_jax.parallel import distributed
from xmodal_jax import experiment as experiment_lib

_SPLIT = flags.DEFINE_string("split", None, "Split to export (default: config's eval split).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  join_runtime()
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=_STEP.value,
                                    require_checkpoint=True)
  config = experiment.config
  split = _SPLIT.value or config.data.eval_split
  batches = experiment.embedder.batches(experiment.state.params, split)
  total = experiment.source.builder.info.splits[split].num_examples
  num_batches = -(-total // config.eval_batch_size)
  # What the parts were written with: a resume with any other value is refused.
  signature = {"workdir": files.absolute(WORKDIR.value), "step": experiment.step,
               "split": split, "dataset": config.data.name,
               "eval_batch_size": config.eval_batch_size,
               "model": json.loads(config.model.to_json_best_effort(sort_keys=True))}
  # Process 0 writes; the others take part in every gather, and stop if its writing fails.
  meta = distributed.run_on_first_process(
      lambda steps: export.write_export(_OUT.value, steps, num_batches, signature,
                                        dict(signature)), batches)
  if meta is not None:
    print(f"wrote {meta['count']} items x {sorted(meta['dims'])} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
