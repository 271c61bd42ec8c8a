"""The records -> examples step of `records.RecordBuilder` as an Apache Beam pipeline.

Each split's plan (one line per record: position, source, record, int id, and the split and
source of its id's first record) is written to a temporary folder beside the dataset and read
by the pipeline, so the launching process hands the workers a file, not millions of records.
Workers run the same `encoding.Encoder` as the single-process build; bad records go to a side
output, written as JSON lines and gathered into the report in plan order after the pipeline.
The first_m flags need every good record of the split: the smallest position of each (id,
modality, value) marker is found with a combine and joined back to its example.
"""

import json
import os

import apache_beam as beam
import tensorflow as tf

from xmodal_jax.data import encoding

BAD_FILE = "bad_records"


class _Encode(beam.DoFn):
  """A plan line -> (position, (where, example, markers)), or (tagged "bad") a report line."""

  def __init__(self, encoder, split):
    super().__init__()
    self.encoder, self.split = encoder, split

  def process(self, line):
    position, where, record, number, home = json.loads(line)
    try:
      example, markers = self.encoder(where, record, number, home, self.split)
    except encoding.BadRecord as e:
      if self.encoder.options.strict:
        raise
      entry = encoding.bad_record_entry(e, where, self.split)
      yield beam.pvalue.TaggedOutput("bad", json.dumps([position, entry]))
      return
    yield position, (where, example, markers)


def _first_markers(item):
  position, (_, _, markers) = item
  return [(marker, (position, name)) for name, marker in markers.items()]


def _with_first_flags(item, modalities):
  _, groups = item
  (where, example, _), = groups["example"]
  firsts = set(groups["first"])
  for name in modalities:
    example[f"first_{name}"] = name in firsts
  return where, example


@beam.ptransform_fn
def _examples(root, encoder, split, plan_file, bad_prefix):
  encoded = (root
             | "ReadPlan" >> beam.io.ReadFromText(plan_file)
             | "Reshuffle" >> beam.Reshuffle()
             | "Encode" >> beam.ParDo(_Encode(encoder, split)).with_outputs("bad",
                                                                            main="good"))
  _ = encoded.bad | "WriteBad" >> beam.io.WriteToText(bad_prefix, file_name_suffix=".jsonl")
  first = (encoded.good
           | "Markers" >> beam.FlatMap(_first_markers)
           | "FirstOfEach" >> beam.CombinePerKey(min)
           | "ByPosition" >> beam.Map(lambda kv: kv[1]))
  return ({"example": encoded.good, "first": first}
          | "Join" >> beam.CoGroupByKey()
          | "SetFlags" >> beam.Map(_with_first_flags, list(encoder.modalities)))


def examples(encoder, split, plan, temp_dir):
  """The Beam transform yielding (key, example) for `plan` ([(where, record, int id, home
  split)]) of `split`, as RecordBuilder's single-process build yields them."""
  tf.io.gfile.makedirs(temp_dir)
  order = len(tf.io.gfile.glob(os.path.join(temp_dir, "plan-*.jsonl")))
  plan_file = os.path.join(temp_dir, f"plan-{order:03d}-{split}.jsonl")
  with tf.io.gfile.GFile(plan_file, "w") as f:
    for position, (where, record, number, home) in enumerate(plan):
      f.write(json.dumps([position, where, record, number, home]) + "\n")
  bad_prefix = os.path.join(temp_dir, f"{BAD_FILE}-{order:03d}-{split}")
  return f"Build{split}" >> _examples(encoder, split, plan_file, bad_prefix)


def collect_bad_records(temp_dir):
  """The bad-record report of a finished pipeline, splits in plan order, each in record
  order (as the single-process build lists them); removes the temporary folder."""
  report = []
  for plan_file in sorted(tf.io.gfile.glob(os.path.join(temp_dir, "plan-*.jsonl"))):
    prefix = os.path.basename(plan_file)[len("plan-"):-len(".jsonl")]
    lines = []
    for path in tf.io.gfile.glob(os.path.join(temp_dir, f"{BAD_FILE}-{prefix}*")):
      with tf.io.gfile.GFile(path) as f:
        lines.extend(json.loads(line) for line in f if line.strip())
    report.extend(entry for _, entry in sorted(lines, key=lambda pair: pair[0]))
  tf.io.gfile.rmtree(temp_dir)
  return report
