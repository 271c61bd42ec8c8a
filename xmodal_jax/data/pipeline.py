"""split -> per-host shard -> preprocess -> batch -> prefetch -> numpy batches.

Batches follow docs/architecture.md, "Batches": {modality: {input: array}, "_mask":
{modality: bool[B]}, "_id": int64[B]}.
"""

import os
import sys

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from xmodal_jax.data import mixture, preprocess, random_access, records
from xmodal_jax.data.builders import benchmarks  # noqa: F401  (registers the adapters)
from xmodal_jax.data.builders import digit_sequences

tf.config.set_visible_devices([], "GPU")  # tf.data only: keep accelerators for JAX.

# Datasets whose builder needs no download: built in place on first use.
EMBEDDED_BUILDERS = {"digit_sequences": digit_sequences.DigitSequences}


def get_builder(data_config, where="config.data"):
  """The TFDS builder `data_config` ({name, data_dir}, named `where` in errors) names,
  prepared; embedded datasets are built if missing."""
  data_dir = data_config.data_dir
  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
    if not tf.io.gfile.isdir(data_dir):
      raise FileNotFoundError(f"{where}.data_dir={data_config.data_dir!r}: no such folder")
  name = data_config.name
  if name in EMBEDDED_BUILDERS:
    builder = EMBEDDED_BUILDERS[name](data_dir=data_dir)
    if not builder.is_prepared():
      print(f"Building the embedded dataset {name!r} in {builder.data_dir} (once)...",
            file=sys.stderr, flush=True)
      builder.download_and_prepare()
      for split in builder.info.splits:
        random_access.write_copy(builder, split)
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"{where}.name={name!r}: no such TFDS dataset ({e})") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"{where}.name={name!r} is not prepared in {builder.data_dir}; build it first "
        f"(tfds build or python -m xmodal_jax.data.build) or set {where}.data_dir")
  return builder


def read_in_order(builder, split):
  """The examples of `split` (slices allowed) in order. TFDS reads TFRecord builds; its
  as_dataset does not read ArrayRecord ones, which the random-access reader reads instead."""
  if not random_access.is_array_record(builder):
    return builder.as_dataset(split=split, shuffle_files=False)
  reader = random_access.Reader(builder, split)
  return reader.dataset().map(builder.info.features.deserialize_example,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def check_modalities(config, builder, sample_rates=None, provided=None, where=None):
  """Every modality the dataset provides must name a feature it has, of a matching kind and
  (audio) the sample rate its tower takes (`sample_rates`: {modality: Hz or None}).
  `provided`: {modality: feature} of a mixture's source (default: every modality, its own
  feature), named in errors by `where` (default: config.modalities.<name>.feature)."""
  features = builder.info.features
  built = records.read_sidecar(builder.data_dir)
  built_kinds = built.get("modalities", {})
  if provided is None:
    provided = mixture.own_features(config.modalities)
  for name, feature in provided.items():
    modality, field = config.modalities[name], (where or f"config.modalities.{name}.feature")
    dataset = builder.name
    if feature not in features:
      raise ValueError(
          f"{field}={feature!r}: dataset {dataset!r} has no such feature; it has "
          f"{sorted(k for k in features.keys() if not k.startswith(('has_', 'first_')))}")
    kind = built_kinds.get(feature)
    if kind and kind != modality.kind:
      raise ValueError(f"config.modalities.{name}.kind={modality.kind!r}, but feature "
                       f"{feature!r} of {dataset!r} holds {kind}")
    shape = modality.shape if modality.kind == "features" else None
    if shape and tuple(shape) != tuple(features[feature].shape):
      raise ValueError(f"config.modalities.{name}.shape={tuple(shape)}, but feature "
                       f"{feature!r} of {dataset!r} has shape "
                       f"{tuple(features[feature].shape)}")
    rate = (sample_rates or {}).get(name)
    built_rate = built.get("options", {}).get("sample_rate")
    if kind == "audio" and rate and rate != built_rate:
      raise ValueError(f"config.model.towers.{name}.sample_rate={rate}, but "
                       f"{dataset!r} stores audio at {built_rate} Hz (rebuild it "
                       f"with --sample_rate={rate} or change the tower)")
  expanded = caption_lists(config, builder, provided)
  if len(expanded) > 1:
    raise ValueError(f"config.modalities: {expanded} all hold caption lists; evaluation "
                     "expands the captions of one text modality only")


def caption_lists(config, builder, provided=None):
  """Text modalities whose feature (in `provided`, default their own) holds a list of
  captions per item."""
  features = builder.info.features
  if provided is None:
    provided = mixture.own_features(config.modalities)
  return [name for name, feature in provided.items()
          if config.modalities[name].kind == "text"
          and isinstance(features[feature], tfds.features.Sequence)]


def expand_captions(ds, feature):
  """One example per caption of `feature` (at least one), marked by "_caption"."""
  def fn(example):
    count = tf.maximum(tf.shape(example[feature], out_type=tf.int64)[0], 1)
    return tf.data.Dataset.range(count).map(lambda i: example | {"_caption": i})
  return ds.flat_map(fn)


def example_fn(config, train, expanded=None, provided=None, missing_shapes=None,
               keys=False):
  """(index or None, stored example) -> the batch contract's example. Masks are the
  dataset's has_ flags; at evaluation also its first_ flags, and an item's other modalities
  count only with its first caption when `expanded` captions are separate examples.
  `provided`: {modality: feature} the dataset has (a mixture's source; default: every
  modality, its own feature); the others are prepared once from a missing value and masked
  (`missing_shapes`: {features modality: shape} of those). With `keys`, "_key" is the item's
  own key: the dataset's "key" feature (a manifest's id), else its "id" in decimal."""
  ops = {name: preprocess.get_op(name, m, train) for name, m in config.modalities.items()}
  second_views = second_view_modalities(config) if train else []
  if provided is None:
    provided = mixture.own_features(config.modalities)
  missing = {  # prepared once: an absent modality's inputs are the same in every row
      name: ops[name](tf.constant(preprocess.missing_value(
          m.kind, (missing_shapes or {}).get(name))), tf.zeros([2], tf.int64))
      for name, m in config.modalities.items() if name not in provided}

  def fn(index, example):
    out, masks, views = {}, {}, {}
    for i, (name, m) in enumerate(config.modalities.items()):
      seed = None if index is None else tf.stack(
          [tf.constant(config.seed * 7919 + i, tf.int64), tf.cast(index, tf.int64)])
      if name in missing:
        out[name], masks[name] = missing[name], tf.constant(False)
        if name in second_views:
          views[name] = missing[name]
        continue
      raw = example[provided[name]]
      mask = example.get(f"has_{provided[name]}", tf.constant(True))
      if "_caption" in example:
        if name == expanded:
          raw = tf.cond(tf.shape(raw)[0] > 0, lambda r=raw: r[example["_caption"]],
                        lambda: tf.constant(""))
        elif not train:
          mask &= tf.equal(example["_caption"], 0)
      if not train:
        mask &= example.get(f"first_{provided[name]}", tf.constant(True))
      out[name] = ops[name](raw, seed)
      masks[name] = mask
      if name in second_views:  # the same example, augmented with other random draws
        views[name] = ops[name](raw, seed + tf.constant([SECOND_VIEW_SEED, 0], tf.int64))
    out["_mask"] = masks
    out["_id"] = tf.cast(example["id"], tf.int64)
    if keys:
      out["_key"] = example["key"] if "key" in example else tf.strings.as_string(out["_id"])
    if views:
      out["_views"] = views
    return out
  # Graph code as written (tf.cond, no Python control flow on tensors): AutoGraph's rewrite
  # of it would cost 2 s of each input pipeline's start, every launcher's.
  return tf.autograph.experimental.do_not_convert(fn)


SECOND_VIEW_SEED = 104_729  # offsets the second view's draws from the first's


def second_view_modalities(config):
  """The modalities whose training examples come with a second augmented view (a modality's
  `second_view`), batch["_views"][m]: IMS's positive (losses/objectives.py)."""
  return [name for name, m in config.modalities.items() if m.second_view]


def tf_data_options(data_config):
  """The tf.data settings of config.data: `threads`, a private thread pool of that many
  threads for this input (0: tf.data's pool shared with the process), and `ram_budget_gb`,
  autotune's RAM budget (0: its default, half the host's RAM).
  Measured effect per pod variant: benchmarks/README.md, "Input throughput per host"."""
  options = tf.data.Options()
  if data_config.threads:
    options.threading.private_threadpool_size = int(data_config.threads)
  if data_config.ram_budget_gb:
    options.autotune.ram_budget = int(data_config.ram_budget_gb * 2**30)
  return options


def numpy_batches(config, ds):
  """Iterates `ds` as numpy, applying each modality's batch op (e.g. tokenization)."""
  ds = ds.with_options(tf_data_options(config.data))
  batch_ops = {name: preprocess.get_batch_op(name, m) for name, m in config.modalities.items()}
  batch_ops = {name: op for name, op in batch_ops.items() if op}
  for batch in ds.as_numpy_iterator():
    for name, op in batch_ops.items():
      batch[name] = op(batch[name])
      if name in batch.get("_views", {}):
        batch["_views"][name] = op(batch["_views"][name])
    yield batch


def host(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def per_host_batch_size(global_batch_size, process_count=None):
  _, count = host(None, process_count)
  if global_batch_size % count:
    raise ValueError(f"batch_size={global_batch_size} does not divide by the "
                     f"{count} processes")
  return global_batch_size // count


def random_access_reader(builder, split, process_count):
  """A random_access.Reader of `split`, its copy written first on one process."""
  if not random_access.has_copy(builder, split):
    if process_count > 1:
      raise FileNotFoundError(
          f"{builder.data_dir}: split {split!r} has no random-access copy; write it once "
          f"before a multi-process run: python -m xmodal_jax.data.build "
          f"--random_access_copy --name={builder.name} --data_dir=...")
    random_access.write_copy(builder, split)
  return random_access.Reader(builder, split)


def global_position(i, host_batch_size, global_batch_size, process_index):
  """The stream position of this process's i-th training example: process h of P holds the
  h-th 1/P of each global batch."""
  return ((i // host_batch_size) * global_batch_size + process_index * host_batch_size
          + i % host_batch_size)


def train_iterator(config, builder, *, start_step=0, process_index=None, process_count=None):
  """Endless shuffled batches of this process's share of each global batch, from step
  `start_step` on (docs/architecture.md, "Input position").

  Global batch s holds positions s*B .. (s+1)*B - 1 of one endless sequence, in which epoch e
  is a seeded permutation of the split; process h of P takes the h-th 1/P of each. Resuming
  at step s reads from position s*B directly, and the global batches are the same whatever
  the number of processes. Augmentation and caption sampling are seeded by the position.
  With `captions="expand"` (each caption a separate example) the split is read in order
  instead: see `_sequential_train_iterator`.
  """
  index, count = host(process_index, process_count)
  batch_size = per_host_batch_size(config.batch_size, count)
  expanded = [n for n in caption_lists(config, builder)
              if config.modalities[n].captions == "expand"]
  if expanded:
    return _sequential_train_iterator(config, builder, expanded[0], start_step, index, count)
  reader = random_access_reader(builder, config.data.train_split, count)
  size, seed = reader.size, config.seed

  def positions(step):  # this process's batch `step` -> (global, split position)[B]
    i = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    g = global_position(i, batch_size, config.batch_size, index)
    return g, index_shuffle(g % size, seed, g // size, size - 1)

  read = record_reader(reader, config.data.cache)
  prepare = prepare_rows([(builder, example_fn(config, True))])
  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // batch_size).map(
      lambda step: prepare(*read(*positions(step))), num_parallel_calls=tf.data.AUTOTUNE)
  return numpy_batches(config, ds.prefetch(tf.data.AUTOTUNE))


def prepare_rows(preparations):
  """[(builder, example_fn)] -> (g, serialized records, each row's preparation or None for
  the first)[n] -> the n examples as one batch: a while_loop per preparation writes its rows
  at their positions, one copy of the batch whatever the mix; not n tf.data elements, whose
  per-element cost bounded cached input (benchmarks/README.md, "Mixture input")."""
  prepares = [lambda g, record, b=b, f=f: f(g, b.info.features.deserialize_example(record))
              for b, f in preparations]
  spec = tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), tf.constant(b""))).map(
      prepares[0]).element_spec

  def prepare_batch(g, records, preparation_of_row=None):
    n = g.shape[0] or tf.shape(g)[0]  # static where known
    arrays = [tf.TensorArray(x.dtype, size=n, element_shape=x.shape) for x in tf.nest.flatten(spec)]
    for p, prepare in enumerate(prepares):
      rows = (tf.range(n) if preparation_of_row is None
              else tf.cast(tf.where(preparation_of_row == p)[:, 0], tf.int32))

      def write(j, arrays, rows=rows, prepare=prepare):
        example = tf.nest.flatten(prepare(g[rows[j]], records[rows[j]]))
        return j + 1, [array.write(rows[j], value) for array, value in zip(arrays, example)]
      _, arrays = tf.while_loop(lambda j, _, rows=rows: j < tf.size(rows), write,
                                (tf.constant(0), arrays))
    return tf.nest.pack_sequence_as(spec, [array.stack() for array in arrays])
  return prepare_batch


def index_shuffle(index, seed, stream, max_index):
  """tf.random.experimental.index_shuffle of int64 `index` (any shape) with seed
  (seed, stream) (`stream` and `max_index` of index's shape or scalars), batched: its
  wrapper pads a batch of seeds along the wrong axis, so the op is called directly with
  the same padding value, and results equal the scalar calls'."""
  shape = tf.shape(index)
  seeds = tf.stack([tf.fill(shape, tf.constant(498_247_692, tf.int64)),
                    tf.fill(shape, tf.constant(seed, tf.int64)),
                    tf.broadcast_to(tf.cast(stream, tf.int64), shape)], axis=-1)
  return tf.raw_ops.RandomIndexShuffle(
      index=index, seed=seeds, rounds=4,
      max_index=tf.broadcast_to(tf.cast(max_index, tf.int64), shape))


def record_reader(reader, cache):
  """(g, split positions)[n] -> (g, serialized records)[n] of a random_access.Reader: with
  `cache`, the split's records are held in memory and gathered in-graph."""
  if cache:
    records = tf.constant(reader.read(np.arange(reader.size)))
    return lambda g, positions: (g, tf.gather(records, positions))

  def read(g, positions):
    records = tf.numpy_function(reader.read, [positions], tf.string, stateful=False)
    return g, tf.ensure_shape(records, positions.shape)
  return read


def _sequential_train_iterator(config, builder, expanded, start_step, index, count):
  """Train batches for captions="expand" (the captions of text modality `expanded`, or None
  for none): this process's `tfds.even_splits` share, read in order through a shuffle
  buffer; resuming re-reads the `start_step` batches before it."""
  batch_size = per_host_batch_size(config.batch_size, count)
  split = tfds.even_splits(config.data.train_split, n=count, drop_remainder=True)[index]
  read_config = tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
  if random_access.is_array_record(builder):
    ds = read_in_order(builder, split)
  else:
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  if config.data.cache:
    ds = ds.cache()
  if expanded:
    ds = expand_captions(ds, config.modalities[expanded].feature)
  ds = ds.shuffle(config.data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
  if start_step:
    print(f"Resuming at step {start_step}: this split is read in order (captions=\"expand\"),"
          f" so the {start_step * batch_size} examples before it are read again",
          file=sys.stderr, flush=True)
  ds = ds.repeat().enumerate().skip(start_step * batch_size)
  ds = ds.map(example_fn(config, True, expanded), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return numpy_batches(config, ds)
