"""Exports the embeddings of every item of a split, for every modality it has.

  python launch/export.py --config=configs/audio_video_text.py --workdir=runs/avt \
      --split=test --out=emb/ [--dtype=float16] [--index=flat|ivf_pq]

Each process embeds and writes its own rows in shards: {out}/embeddings/{modality}/*.npy
(L2-normalized), {out}/items/*.parquet (item keys, ids, which modalities each row has),
and {out}/meta.json listing the shards in row order (layout: xmodal_jax/eval/export.py and
docs/guide.md). Re-running after an interruption resumes after the shards already written.
--index also builds a FAISS index per modality (the faiss extra).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.experimental import multihost_utils

from common import ALLOW_CONFIG_CHANGE, CONFIG, WORKDIR, join_runtime  # launch/common.py
from xmodal_jax import files
from xmodal_jax.eval import export, index
from xmodal_jax import experiment as experiment_lib
from xmodal_jax.train import checkpoint

_SPLIT = flags.DEFINE_string("split", None, "Split to export (default: config's eval split).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", export.DTYPES, "Embedding file dtype.")
_SHARD_ROWS = flags.DEFINE_integer(
    "shard_rows", 100_000, "Rows per shard (whole eval batches of a process: about this "
    "many); a process holds one shard's embeddings in memory.")
_INDEX = flags.DEFINE_enum("index", None, index.KINDS, "Also build a FAISS index per "
                           "modality: flat (exact) or ivf_pq (compressed, approximate).")
flags.mark_flags_as_required(["out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SHARD_ROWS.value < 1:
    raise app.UsageError(f"--shard_rows={_SHARD_ROWS.value}: expected a positive count")
  logging.set_verbosity(logging.WARNING)
  join_runtime()
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=_STEP.value,
                                    require_checkpoint=True,
                                    allow_config_change=ALLOW_CONFIG_CHANGE.value)
  config = experiment.config
  split = _SPLIT.value or config.data.eval_split
  # What the shards are written with: a resume with any other value is refused.
  signature = {"workdir": files.absolute(WORKDIR.value), "step": experiment.step,
               "checkpoint": checkpoint.identity(WORKDIR.value, experiment.step),
               "split": split, "dataset": config.data.name,
               "eval_batch_size": config.eval_batch_size,
               "process_count": jax.process_count(), "shard_rows": _SHARD_ROWS.value,
               "dtype": _DTYPE.value,
               "model": json.loads(config.model.to_json_best_effort(sort_keys=True))}
  export.write_shards(_OUT.value, experiment.embedder, experiment.state.params, split,
                      signature=signature, shard_rows=_SHARD_ROWS.value, dtype=_DTYPE.value)
  multihost_utils.sync_global_devices("export shards written")
  if jax.process_index() == 0:
    meta = export.finish(_OUT.value, signature, _DTYPE.value)
    print(f"wrote {meta['count']} rows x {sorted(meta['dims'])} in {len(meta['shards'])} "
          f"shards to {_OUT.value}")
    if _INDEX.value:
      exported = export.read_export(_OUT.value)
      for modality in exported.modalities:
        index.build(exported, modality, _INDEX.value)


if __name__ == "__main__":
  app.run(main)
