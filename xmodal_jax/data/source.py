"""A config's dataset as the layers above read it: training and evaluation batches, the batch's
shapes, item labels and texts, and raw queries prepared as evaluation prepares examples.

train/ and eval/ never import data/: the experiment (xmodal_jax/experiment.py) opens a
Source and hands it to them, so they stay free of TensorFlow.
"""

import functools
import os

import jax
import ml_collections
import numpy as np

from xmodal_jax.data import (encoding, eval_input, items, media, mixed_input, mixture,
                             pipeline, preprocess, records)

# The slice of the config the input pipeline reads.
INPUT_KEYS = ("seed", "batch_size", "eval_batch_size", "data", "modalities")


def input_config(config):
  """The input pipeline's slice of a resolved config."""
  return ml_collections.ConfigDict({key: config[key] for key in INPUT_KEYS})


def tower_sample_rates(model_config):
  """{modality: Hz} of the towers that state the audio rate they take."""
  return {m: tower.get("sample_rate") for m, tower in model_config.towers.items()}


@functools.lru_cache(maxsize=None)
def _item_labels(builder, split, feature):
  if feature not in builder.info.features:
    raise ValueError(f"{builder.data_dir}: no {feature!r} feature to classify by (manifests "
                     "give it as \"label\")")
  labels = {}
  for example in pipeline.read_in_order(builder, split).as_numpy_iterator():
    labels.setdefault(int(example["id"]), example[feature].decode("utf-8"))
  return labels


def abstract_batch(config, batch_size, builder=None):
  """jax.ShapeDtypeStructs of a batch of `batch_size` as the pipeline makes it, from each
  modality's preprocessing of a missing value: nothing is read, so a train step can be
  compiled for a dataset that is not on this machine. Features modalities take their shape
  from `builder`'s dataset."""
  batch, masks = {}, {}
  for name, m in config.modalities.items():
    shape = None
    if m.kind == "features":
      if builder is None and not m.shape:
        raise ValueError(f"config.modalities.{name}: a features modality takes its shape "
                         "from its `shape` or the dataset, and neither is available")
      shape = tuple(m.shape or builder.info.features[m.feature].shape)
    if m.kind == "text" and not m.tokenizer:  # compiling without data: the text op's shapes
      one = {k: np.zeros((1, m.max_length), np.int32) for k in ("input_ids", "attention_mask")}
    else:
      one = preprocess.preprocess_one(name, m, preprocess.missing_value(m.kind, shape))
    batch[name] = {k: (batch_size,) + v.shape[1:] + (v.dtype,) for k, v in one.items()}
    masks[name] = (batch_size, np.bool_)
  batch |= {"_mask": masks, "_id": (batch_size, np.int64)}
  if config.data.sources:
    batch["_source"] = (batch_size, len(mixture.active(config.data)), np.bool_)
  views = pipeline.second_view_modalities(config)
  if views:
    batch["_views"] = {name: batch[name] for name in views}
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[:-1], jax.dtypes.canonicalize_dtype(
      s[-1])), batch, is_leaf=lambda x: isinstance(x, tuple))


class Source:
  """A prepared dataset (`builder`) read as `config` (the input slice) says; builder None: a
  dataset that is not here (shapes only, for compiling ahead of time)."""

  def __init__(self, config, builder=None, sample_rates=None, mixed=()):
    self.config, self.builder = config, builder
    self.sample_rates = dict(sample_rates or {})
    self.mixed = list(mixed)  # [(builder, split, {modality: feature})] of a mixture
    self._items = {}

  @property
  def mixture_names(self):
    """The names of the sources training mixes, in the order of batch["_source"] ([]: one
    dataset)."""
    return list(mixture.active(self.config.data)) if self.config.data.sources else []

  @classmethod
  def open(cls, config, sample_rates=None):
    """The dataset `config.data` names (built if embedded) and the sources of a mixture,
    checked against the modalities."""
    builder = pipeline.get_builder(config.data)
    pipeline.check_modalities(config, builder, sample_rates)
    mixed = []
    for name, options in mixture.active(config.data).items():
      where = f"config.data.sources.{name}"
      source_builder = pipeline.get_builder(options, where)
      provided = mixture.features(options, config.modalities)
      pipeline.check_modalities(config, source_builder, sample_rates, provided,
                                where=f"{where}.features")
      try:
        source_builder.info.splits[options.split]
      except (KeyError, ValueError) as e:
        raise ValueError(f"{where}.split={options.split!r}: {options.name!r} has the splits "
                         f"{sorted(source_builder.info.splits)}") from e
      mixed.append((source_builder, options.split, provided))
    return cls(config, builder, sample_rates, mixed)

  def for_dataset(self, data_config, provided):
    """A Source reading the modalities of `provided` ({modality: feature}) of another
    dataset `data_config` ({name, data_dir} as config.data takes them), for evaluation."""
    config = self.config.copy_and_resolve_references()
    config.data.update({k: v for k, v in data_config.items() if k in ("name", "data_dir")})
    config.data.sources = {}
    modalities = {}
    for name, feature in provided.items():
      modalities[name] = config.modalities[name]
      modalities[name].feature = feature
    config.modalities = modalities
    return Source.open(config, {m: self.sample_rates.get(m) for m in provided})

  def train_batches(self, start_step=0):
    if self.mixed:
      return mixed_input.train_iterator(self.config, self.mixed, start_step=start_step)
    return pipeline.train_iterator(self.config, self.builder, start_step=start_step)

  def eval_batches(self, split, ids=None, keys=False, start_batch=0):
    return eval_input.eval_iterator(self.config, self.builder, split, ids=ids, keys=keys,
                                    start_batch=start_batch)

  def eval_batch_count(self, split):
    return eval_input.eval_batch_count(self.config, self.builder, split)

  def abstract_batch(self, rows):
    return abstract_batch(self.config, rows, self.builder)

  def item_labels(self, split, feature):
    """{item id: class name} of a split's `feature` ("" where an item has none); read once
    per builder and split."""
    return _item_labels(self.builder, split, feature)

  def items(self, split):
    """The ItemReader (data/items.py) of `split`: items' captions and media by id."""
    if split not in self._items:
      self._items[split] = items.ItemReader(self.builder, split, self.config.modalities,
                                            self.audio_rate)
    return self._items[split]

  def item_texts(self, split, ids):
    """{id: [captions]} for `ids` when the dataset has a text feature, else {}."""
    return self.items(split).captions(ids)

  @staticmethod
  def prepare(modality, options, raw):
    """One raw value as a dataset feature holds it -> the tower's inputs, batch of 1."""
    return preprocess.preprocess_one(modality, options, raw)

  def audio_rate(self, name):
    """The sample rate audio modality `name` takes: its tower's, else the dataset's build
    rate (queries are resampled to it; stored audio is at it)."""
    built = records.read_sidecar(self.builder.data_dir).get("options", {})
    rate = self.sample_rates.get(name) or built.get("sample_rate")
    if not rate:
      raise ValueError(f"neither config.model.towers.{name}.sample_rate nor the dataset "
                       "says which sample rate the model takes")
    return rate

  def read_value(self, name, value):
    """The raw value, as the dataset feature holds it, of modality `name`'s query `value`:
    a text, or a file (its path, or its bytes). ValueError where a file does not decode."""
    modality = self.config.modalities[name]
    if modality.kind == "text":
      if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty text")
      return value
    if isinstance(value, str) and not os.path.exists(value):
      raise FileNotFoundError(f"{value}: no such file")
    if modality.kind == "audio":
      return media.decode_audio(value, self.audio_rate(name))
    if modality.kind == "image":
      try:
        return encoding.encode_image(value, "query", "query", None)
      except encoding.BadRecord as e:
        raise ValueError(e.reason) from e
    if modality.kind == "video":
      return media.read_video(value, (modality.num_frames, modality.frame_size,
                                      modality.frame_size, modality.channels))
    raise ValueError(f"{name!r} is a {modality.kind} modality: queries are texts, audio, "
                     "image or video files")
