"""Builds a TFDS dataset from a JSONL manifest or a standard benchmark's files.

  python -m xmodal_jax.data.build --manifest=items.jsonl \
      --modalities=photo:image,caption:text,speech:audio --name=mydata --data_dir=DIR
  python -m xmodal_jax.data.build --dataset=flickr30k_karpathy --manual_dir=FILES \
      --data_dir=DIR

A manifest line is one item, or names webdataset tar shards (xmodal_jax/data/webdataset.py):
  {"split": "train", "tar": "shards/train-{000..099}.tar", "speech": "flac", "caption": "txt"}
--beam encodes the records in an Apache Beam pipeline: DirectRunner with one worker per core
here, or any runner given by --beam_options ("--runner=DataflowRunner --project=..."), with
the same examples and bad-record report. --file_format=array_record writes ArrayRecord
shards, read by position (no random-access copy needed).

Configs then set `data.name` and `data.data_dir`. Bad records are skipped and listed in
DIR/NAME/VERSION/bad_records.jsonl, or stop the build with --strict. TFRecord builds also
write the random-access copy training reads; for a TFDS dataset built elsewhere, write it
once with

  python -m xmodal_jax.data.build --random_access_copy --name=NAME --data_dir=DIR
"""

import logging
import os
import re
import shutil
import sys

from absl import app, flags
from absl import logging as absl_logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow loads: its INFO is noise.

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
flags.DEFINE_float("max_audio_seconds", 600, "longer audio files are bad records (decoding "
                   "stops there)")
flags.DEFINE_integer("max_pixels", 64 << 20, "larger images and video frames (width x height) "
                     "are bad records, refused before decoding")
flags.DEFINE_integer("max_video_frames", 216_000, "longer videos are bad records, refused "
                     "before decoding")
flags.DEFINE_bool("confine", True, "relative media paths that leave the manifest's (or "
                  "--manual_dir's) folder, through '..' or a symlink, are bad records (and "
                  "such tar shard paths an error); absolute paths are taken as written")
flags.DEFINE_bool("strict", False, "fail on the first bad record instead of skipping it")
flags.DEFINE_bool("beam", False, "encode the records in an Apache Beam pipeline")
flags.DEFINE_string("beam_options", None, "Beam pipeline options, space-separated (default "
                    "with --beam: DirectRunner, one worker process per core)")
flags.DEFINE_enum("file_format", "tfrecord", ["tfrecord", "array_record"],
                  "shard format of the built dataset")
flags.DEFINE_bool("overwrite", False, "rebuild when the dataset's version already exists")
flags.DEFINE_bool("random_access_copy", False, "write the random-access copy of every split "
                  "of the built TFDS dataset --name (in --data_dir) instead of building")
FLAGS = flags.FLAGS


def make_builder(argv_flags):
  """The builder the flags describe."""
  from xmodal_jax.data import encoding, manifest, records  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import benchmarks  # pylint: disable=g-import-not-at-top
  options = encoding.BuildOptions(
      sample_rate=argv_flags.sample_rate, video_frames=argv_flags.video_frames,
      frame_size=argv_flags.frame_size, strict=argv_flags.strict,
      max_audio_seconds=argv_flags.max_audio_seconds, confine=argv_flags.confine,
      max_pixels=argv_flags.max_pixels, max_video_frames=argv_flags.max_video_frames)
  if bool(argv_flags.manifest) == bool(argv_flags.dataset):
    raise app.UsageError("give exactly one of --manifest or --dataset")
  if argv_flags.manifest:
    if not argv_flags.modalities or not argv_flags.name:
      raise app.UsageError("--manifest needs --modalities and --name")
    return records.manifest_builder(
        argv_flags.name, argv_flags.manifest, manifest.parse_modalities(argv_flags.modalities),
        options=options, data_dir=argv_flags.data_dir, beam=argv_flags.beam,
        file_format=argv_flags.file_format)
  if argv_flags.dataset not in benchmarks.ADAPTERS:
    raise app.UsageError(f"--dataset={argv_flags.dataset!r}: expected one of "
                         f"{sorted(benchmarks.ADAPTERS)}")
  if not argv_flags.manual_dir or not os.path.isdir(argv_flags.manual_dir):
    raise app.UsageError(f"--manual_dir={argv_flags.manual_dir!r}: no such folder (the "
                         f"benchmark's files; see its docstring for the layout)")
  return benchmarks.ADAPTERS[argv_flags.dataset](
      options=options, beam=argv_flags.beam, file_format=argv_flags.file_format,
      data_dir=argv_flags.data_dir)


def beam_options(spec):
  """PipelineOptions from --beam_options, or DirectRunner with a worker process per core;
  Beam's own progress logging (and its workers') stays at warnings unless they say
  otherwise."""
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  args = (spec.split() if spec else
          ["--runner=DirectRunner", f"--direct_num_workers={os.cpu_count()}",
           "--direct_running_mode=multi_processing"])
  if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=WARNING")
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  return pipeline_options.PipelineOptions(args)


def write_random_access_copy(name, data_dir):
  from xmodal_jax.data import pipeline, random_access  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not name:
    raise app.UsageError("--random_access_copy needs --name (a built TFDS dataset)")
  try:
    builder = pipeline.get_builder(ml_collections.ConfigDict(dict(name=name,
                                                                  data_dir=data_dir)))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  for split in builder.info.splits:
    random_access.write_copy(builder, split)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS logs each step at INFO.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import encoding  # pylint: disable=g-import-not-at-top
  os.makedirs(FLAGS.data_dir, exist_ok=True)
  if FLAGS.random_access_copy:
    write_random_access_copy(FLAGS.name, FLAGS.data_dir)
    return
  try:
    builder = make_builder(FLAGS)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if builder.is_prepared():
    if not FLAGS.overwrite:
      print(f"{builder.data_dir} exists; pass --overwrite to rebuild it", file=sys.stderr)
      return
    shutil.rmtree(builder.data_dir)
    builder = make_builder(FLAGS)
  config = tfds.download.DownloadConfig(
      manual_dir=FLAGS.manual_dir,
      beam_options=beam_options(FLAGS.beam_options) if FLAGS.beam else None)
  try:
    builder.download_and_prepare(download_config=config)
  except encoding.BadRecord as e:
    sys.exit(f"error: --strict build stopped at a bad record: {e}")
  except Exception as e:  # pylint: disable=broad-except
    # A Beam worker's BadRecord reaches here wrapped in the runner's own error.
    found = re.search(r"BadRecord: (.*?)(?: \[while running .*)?$", str(e), re.M)
    if not found:
      raise
    sys.exit(f"error: --strict build stopped at a bad record: {found.group(1)}")


if __name__ == "__main__":
  app.run(main)
