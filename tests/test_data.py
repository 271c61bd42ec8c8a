"""The embedded default dataset and the input pipeline."""

import collections

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from xmodal_jax import schema
from xmodal_jax.data import eval_input, pipeline
from xmodal_jax.data.builders import digit_sequences

import configs.audio_video_text as avt_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def splits(digit_data_dir):
  builder = digit_sequences.DigitSequences(data_dir=digit_data_dir)
  return {s: list(tfds.as_numpy(builder.as_dataset(split=s))) for s in ("train", "test")}


def test_split_sizes_and_unseen_test_sequences(splits):
  train = {tuple(x["digits"]) for x in splits["train"]}
  test = [tuple(x["digits"]) for x in splits["test"]]
  assert len(splits["train"]) == 9000 and len(test) == 1000
  assert len(set(test)) == len(test), "two test items share a sequence"
  assert not train & set(test), "a test sequence occurs in training"
  ids = [x["id"] for x in splits["train"] + splits["test"]]
  assert len(set(ids)) == len(ids)


def test_frames_are_real_handwriting_of_the_right_digit_and_unseen_in_training(splits):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  label_of = {np.round(img * 255 / 16).astype(np.uint8).tobytes(): int(label)
              for img, label in zip(digits.images, digits.target)}
  frames = collections.defaultdict(set)
  for split, items in splits.items():
    for x in items:
      for t, d in enumerate(x["digits"]):
        key = x["video"][t, :, :, 0].tobytes()
        assert label_of[key] == d
        frames[split].add(key)
  assert not frames["train"] & frames["test"], "a test frame's handwriting is in training"


def test_text_and_audio(splits):
  for x in splits["test"][:50]:
    assert x["text"].decode().split() == [digit_sequences.DIGIT_WORDS[d] for d in x["digits"]]
    assert x["audio"].shape == (digit_sequences.NUM_SAMPLES,) and x["audio"].dtype == np.int16
    slot = digit_sequences.NUM_SAMPLES // 4
    energy = [np.abs(x["audio"][t * slot:(t + 1) * slot].astype(np.float32)).max()
              for t in range(4)]
    assert min(energy) > 3000  # Every slot holds a spoken digit, not just noise.
  voices = collections.Counter(x["voice"].decode() for x in splits["train"])
  assert set(voices) == set(digit_sequences.VOICES)


def test_speak_places_each_digit_in_its_slot():
  rng = np.random.default_rng(0)
  clips = [np.sin(np.arange(800) * (d + 1) / 10).astype(np.float32) for d in range(10)]
  out = digit_sequences.speak([1, 2, 3, 4], clips, rng).astype(np.float32) / 32767
  slot = digit_sequences.NUM_SAMPLES // 4
  for t in range(4):
    part = out[t * slot:(t + 1) * slot]
    assert np.abs(part).max() > 0.4  # The clip's peak is scaled to 0.5..0.95.


def test_eval_iterator_visits_every_item_once_with_padding(digit_data_dir):
  config = avt_config.get_config("tiny")
  config.data.data_dir = digit_data_dir
  config.eval_batch_size = 300  # 1000 items: the last batch has 100 real rows.
  config = schema.fill_defaults(config)
  builder = pipeline.get_builder(config.data)
  batches = list(eval_input.eval_iterator(config, builder, "test"))
  assert [len(b["_id"]) for b in batches] == [300] * 4
  ids = np.concatenate([b["_id"] for b in batches])
  real = ids[ids >= 0]
  assert len(real) == 1000 and len(set(real.tolist())) == 1000
  last = batches[-1]
  assert last["_mask"]["audio"][:100].all() and not last["_mask"]["audio"][100:].any()
  assert last["text"]["input_ids"].shape == (300, 8)
  assert last["audio"]["waveform"].dtype == np.float32


def test_train_iterator_resumes_where_it_left_off(digit_data_dir):
  config = avt_config.get_config("tiny")
  config.data.data_dir = digit_data_dir
  config = schema.fill_defaults(config)
  builder = pipeline.get_builder(config.data)
  first = pipeline.train_iterator(config, builder)
  batches = [next(first) for _ in range(3)]
  resumed = next(pipeline.train_iterator(config, builder, start_step=2))
  # The whole batch, augmented inputs included, not only which items.
  jax.tree.map(np.testing.assert_array_equal, resumed, batches[2])
  assert not np.array_equal(batches[1]["_id"], batches[2]["_id"])


def test_missing_data_dir_is_named(tmp_path):
  data = ml_collections.ConfigDict(dict(name="digit_sequences",
                                        data_dir=str(tmp_path / "nowhere")))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pipeline.get_builder(data)


def test_a_dataset_not_built_yet_is_checked_without_warnings(tmp_path, caplog):
  """The first run on a machine asks whether the embedded dataset is built; TFDS's warning
  that its version folder has no dataset_info.json is not shown (that is the question)."""
  with caplog.at_level("WARNING"):
    assert not digit_sequences.DigitSequences(data_dir=str(tmp_path)).is_prepared()
  assert not [r.getMessage() for r in caplog.records if r.levelno >= 30]


def test_first_positions_find_each_items_first_record():
  """items.FirstPositions against a plain scan: each id's first position among the records
  given, None for an id with none."""
  from xmodal_jax.data import items  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 500, size=2_000)
  having = np.flatnonzero(rng.random(2_000) < 0.3)  # the records that hold some modality
  first = items.FirstPositions(ids[having], having)
  expected = {}
  for position in having:
    expected.setdefault(int(ids[position]), int(position))
  for item in range(-1, 501):
    assert first.get(item) == expected.get(item), item
    assert (item in first) == (item in expected)
