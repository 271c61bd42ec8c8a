"""The embedded default dataset: 4-digit sequences as video, speech and text.

Every item is one sequence of four digits shown three ways:
  video: four 8x8 frames, one real handwritten digit each (scikit-learn's `load_digits`);
  audio: the four digits spoken by one of five real voices (Asterisk prompts, see
         `digit_sequences_assets/audio/README.md`), time-stretched, scaled and noised;
  text:  the digit words, e.g. "seven one four two".
Test sequences never occur in training, and test frames come from handwriting samples that
training never sees. Everything is made offline from files shipped with the package or its
dependencies, in seconds.
"""

import os
import wave

import numpy as np
import tensorflow_datasets as tfds

SEQUENCE_LENGTH = 4
SAMPLE_RATE = 8000
SLOT_SECONDS = 0.8  # every trimmed recording is shorter than this
NUM_SAMPLES = int(SEQUENCE_LENGTH * SLOT_SECONDS * SAMPLE_RATE)
VOICES = ("en", "es", "fr", "it", "ru")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ASSETS_DIR = os.path.join(os.path.dirname(__file__), "digit_sequences_assets")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")


def read_wav(path):
  """Returns (float32 samples in [-1, 1], sample rate) of a 16-bit PCM mono wav file."""
  with wave.open(path, "rb") as f:
    if f.getsampwidth() != 2 or f.getnchannels() != 1:
      raise ValueError(f"{path}: expected 16-bit mono PCM, got {8 * f.getsampwidth()}-bit "
                       f"with {f.getnchannels()} channels")
    samples = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    return samples.astype(np.float32) / 32768.0, f.getframerate()


def trim_silence(x, threshold=0.05, pad=160):
  """Cuts leading and trailing samples quieter than `threshold` x the peak, keeping `pad`."""
  loud = np.nonzero(np.abs(x) > threshold * np.abs(x).max())[0]
  return x[max(loud[0] - pad, 0):loud[-1] + pad + 1]


def load_spoken_digits(assets_dir=ASSETS_DIR):
  """Returns {voice: [10 trimmed float32 recordings, digit 0..9]}."""
  spoken = {}
  for voice in VOICES:
    clips = []
    for digit in range(10):
      path = os.path.join(assets_dir, "audio", voice, f"{digit}.wav")
      x, rate = read_wav(path)
      if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz, got {rate}")
      clips.append(trim_silence(x))
    spoken[voice] = clips
  return spoken


def split_handwriting(seed, train_fraction=0.7):
  """Splits scikit-learn's handwritten digits per class into disjoint train/test pools.

  Returns {"train"|"test": [10 uint8 arrays [N_d, 8, 8]]}, pixel values scaled to 0..255.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  rng = np.random.default_rng(seed)
  pools = {"train": [], "test": []}
  for d in range(10):
    idx = rng.permutation(np.nonzero(digits.target == d)[0])
    cut = int(round(train_fraction * len(idx)))
    pools["train"].append(images[idx[:cut]])
    pools["test"].append(images[idx[cut:]])
  return pools


def split_sequences(seed, num_test):
  """Splits all 10^4 digit sequences into disjoint (train, test) int arrays [N, 4]."""
  rng = np.random.default_rng(seed)
  codes = rng.permutation(10 ** SEQUENCE_LENGTH)
  powers = 10 ** np.arange(SEQUENCE_LENGTH - 1, -1, -1)
  sequences = (codes[:, None] // powers) % 10
  return sequences[num_test:], sequences[:num_test]


def stretch(x, factor):
  """Resamples `x` to len(x) / factor samples by linear interpolation (factor > 1: faster)."""
  n = max(int(round(len(x) / factor)), 2)
  return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)


def speak(digits, clips, rng):
  """Concatenates one voice's recordings of `digits` into fixed slots: int16[NUM_SAMPLES]."""
  slot = NUM_SAMPLES // SEQUENCE_LENGTH
  out = np.zeros(NUM_SAMPLES, np.float32)
  for t, d in enumerate(digits):
    clip = stretch(clips[d], rng.uniform(0.9, 1.1))[:slot]
    clip = clip * (rng.uniform(0.5, 0.95) / np.abs(clip).max())
    start = t * slot + rng.integers(0, slot - len(clip) + 1)
    out[start:start + len(clip)] = clip
  signal_rms = np.sqrt(np.mean(out ** 2))
  snr_db = rng.uniform(15.0, 30.0)
  out += rng.normal(0.0, signal_rms * 10 ** (-snr_db / 20), NUM_SAMPLES).astype(np.float32)
  return np.round(np.clip(out, -1.0, 1.0) * 32767).astype(np.int16)


def make_items(sequences, images, spoken, seed, first_id):
  """Yields (key, example) for each sequence, drawing frames from `images` pools."""
  rng = np.random.default_rng(seed)
  for i, digits in enumerate(sequences):
    voice = VOICES[rng.integers(len(VOICES))]
    frames = np.stack([images[d][rng.integers(len(images[d]))] for d in digits])
    item_id = first_id + i
    yield item_id, {
        "id": item_id,
        "digits": digits.astype(np.int64),
        "video": frames[..., None],
        "audio": speak(digits, spoken[voice], rng),
        "text": " ".join(DIGIT_WORDS[d] for d in digits),
        "voice": voice,
    }


class DigitSequences(tfds.core.GeneratorBasedBuilder):
  """4-digit sequences as handwritten-digit video, spoken audio and digit-word text."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  NUM_TEST = 1000
  SEED = 20261122

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "digits": tfds.features.Tensor(shape=(SEQUENCE_LENGTH,), dtype=np.int64),
            # Raw bytes: TFDS writes int tensors element by element otherwise (10x slower).
            "video": tfds.features.Tensor(shape=(SEQUENCE_LENGTH, 8, 8, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "audio": tfds.features.Tensor(shape=(NUM_SAMPLES,), dtype=np.int16,  # SAMPLE_RATE Hz
                                          encoding=tfds.features.Encoding.BYTES),
            "text": tfds.features.Text(),
            "voice": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://github.com/xmodal-jax/xmodal_jax",
        license="Audio: CC-BY-SA-3.0 / CC-BY-3.0 (see digit_sequences_assets/audio); "
                "images: scikit-learn's digits (BSD-3-Clause)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything ships with the package: nothing is downloaded.
    train_seqs, test_seqs = split_sequences(self.SEED, self.NUM_TEST)
    pools = split_handwriting(self.SEED)
    spoken = load_spoken_digits()
    return {
        "train": make_items(train_seqs, pools["train"], spoken, self.SEED + 1, first_id=0),
        "test": make_items(test_seqs, pools["test"], spoken, self.SEED + 2,
                           first_id=len(train_seqs)),
    }

  def _generate_examples(self, *args, **kwargs):  # Generators come from _split_generators.
    raise NotImplementedError
