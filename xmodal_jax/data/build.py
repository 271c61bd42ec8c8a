"""Builds a TFDS dataset from a JSONL manifest or a standard benchmark's files.

  python -m xmodal_jax.data.build --manifest=items.jsonl \
      --modalities=photo:image,caption:text,speech:audio --name=mydata --data_dir=DIR
  python -m xmodal_jax.data.build --dataset=flickr30k_karpathy --manual_dir=FILES \
      --data_dir=DIR

Configs then set `data.name` and `data.data_dir`. Bad records are skipped and listed in
DIR/NAME/VERSION/bad_records.jsonl, or stop the build with --strict.
"""

import os
import shutil
import sys

from absl import app, flags

flags.DEFINE_string("manifest", None, "JSONL file, one item per line")
flags.DEFINE_string("modalities", None, "NAME:KIND,... (kinds: image, audio, video, text, "
                    "features) for --manifest")
flags.DEFINE_string("name", None, "dataset name for --manifest (lower_snake_case)")
flags.DEFINE_string("dataset", None, "a standard benchmark adapter instead of --manifest")
flags.DEFINE_string("manual_dir", None, "the benchmark's files, for --dataset")
flags.DEFINE_string("data_dir", None, "where the TFDS dataset is written", required=True)
flags.DEFINE_integer("sample_rate", 16_000, "audio is resampled to this rate (Hz)")
flags.DEFINE_integer("video_frames", 8, "frames kept per video")
flags.DEFINE_integer("frame_size", 256, "stored video frames' shorter side (pixels)")
flags.DEFINE_bool("strict", False, "fail on the first bad record instead of skipping it")
flags.DEFINE_bool("overwrite", False, "rebuild when the dataset's version already exists")
FLAGS = flags.FLAGS


def make_builder(argv_flags):
  """The builder the flags describe."""
  from xmodal_jax.data import records  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import benchmarks  # pylint: disable=g-import-not-at-top
  options = records.BuildOptions(
      sample_rate=argv_flags.sample_rate, video_frames=argv_flags.video_frames,
      frame_size=argv_flags.frame_size, strict=argv_flags.strict)
  if bool(argv_flags.manifest) == bool(argv_flags.dataset):
    raise app.UsageError("give exactly one of --manifest or --dataset")
  if argv_flags.manifest:
    if not argv_flags.modalities or not argv_flags.name:
      raise app.UsageError("--manifest needs --modalities and --name")
    return records.manifest_builder(
        argv_flags.name, argv_flags.manifest, records.parse_modalities(argv_flags.modalities),
        options=options, data_dir=argv_flags.data_dir)
  if argv_flags.dataset not in benchmarks.ADAPTERS:
    raise app.UsageError(f"--dataset={argv_flags.dataset!r}: expected one of "
                         f"{sorted(benchmarks.ADAPTERS)}")
  if not argv_flags.manual_dir or not os.path.isdir(argv_flags.manual_dir):
    raise app.UsageError(f"--manual_dir={argv_flags.manual_dir!r}: no such folder (the "
                         f"benchmark's files; see its docstring for the layout)")
  return benchmarks.ADAPTERS[argv_flags.dataset](options=options,
                                                 data_dir=argv_flags.data_dir)


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import records  # pylint: disable=g-import-not-at-top
  os.makedirs(FLAGS.data_dir, exist_ok=True)
  try:
    builder = make_builder(FLAGS)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if builder.is_prepared():
    if not FLAGS.overwrite:
      print(f"{builder.data_dir} exists; pass --overwrite to rebuild it", file=sys.stderr)
      return
    shutil.rmtree(builder.data_dir)
    builder = make_builder(FLAGS)
  config = tfds.download.DownloadConfig(manual_dir=FLAGS.manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except records.BadRecord as e:
    sys.exit(f"error: --strict build stopped at a bad record: {e}")


if __name__ == "__main__":
  app.run(main)
