"""The JSONL manifest builder, bad records, per-modality preprocessing, host sharding and
evaluation order of record datasets, and training the default config on one."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import fixtures
from conftest import REPO

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
# pylint: disable=g-import-not-at-top,wrong-import-position
from xmodal_jax import schema
from xmodal_jax.data import eval_input, manifest, media, pipeline, preprocess, records
from xmodal_jax.data.builders import digit_sequences


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """A manifest of 6 good items (photo, speech, captions; one without speech, one with
  two records) and three bad ones: a corrupt image, a missing audio file, an empty caption."""
  root = tmp_path_factory.mktemp("mixed")
  items = []
  for i in range(6):
    fixtures.write_jpeg(str(root / "media" / f"p{i}.jpg"), i)
    fixtures.write_wav(str(root / "media" / f"s{i}.wav"), i, seconds=0.3, rate=16_000)
    items.append({"id": f"item{i}", "split": "train" if i < 3 else "test",
                  "photo": f"media/p{i}.jpg", "speech": str(root / "media" / f"s{i}.wav"),
                  "caption": [f"caption {i} one", f"caption {i} two"]})
  del items[4]["speech"]
  items.append({"id": "item5", "split": "test", "speech": "media/s0.wav",
                "caption": "a third record of item5"})
  (root / "media" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  items.insert(1, {"id": "bad_image", "split": "train", "photo": "media/corrupt.jpg",
                   "caption": "fine"})
  items.insert(4, {"id": "bad_audio", "split": "test", "speech": "media/missing.wav",
                   "caption": "fine"})
  items.insert(6, {"id": "bad_caption", "split": "test", "photo": "media/p0.jpg",
                   "caption": "   "})
  fixtures.write_manifest(root / "items.jsonl", items)
  return root


MIXED_FLAGS = ("--modalities=photo:image,speech:audio,caption:text", "--name=mixed")


@pytest.fixture(scope="module")
def mixed_build(mixed, tmp_path_factory):
  """(data_dir, stderr) of the single-process build of `mixed`."""
  data_dir = str(tmp_path_factory.mktemp("mixed_build"))
  proc = fixtures.build_cli(f"--manifest={mixed / 'items.jsonl'}", *MIXED_FLAGS,
                            f"--data_dir={data_dir}")
  return data_dir, proc.stderr


def read_report(data_dir, name):
  with open(os.path.join(data_dir, name, "1.0.0", records.REPORT_FILE), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def read_examples(data_dir, name):
  """{split: [example as plain Python]} of a built dataset (TFRecord or ArrayRecord), in a
  canonical order (by the example's content)."""
  builder = tfds.builder(name, data_dir=data_dir)
  out = {}
  for split in builder.info.splits:
    examples = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ex.items()}
                for ex in pipeline.read_in_order(builder, split).as_numpy_iterator()]
    out[split] = sorted(examples, key=repr)
  return out


def test_bad_records_are_reported_and_the_rest_is_readable(mixed_build, tmp_path):
  data_dir, stderr = mixed_build
  assert "3 bad records skipped" in stderr
  bad = read_report(data_dir, "mixed")
  assert [(b["id"], os.path.basename(b["file"]), b["source"].rsplit(":", 1)[1]) for b in bad] \
      == [("bad_image", "corrupt.jpg", "2"), ("bad_audio", "missing.wav", "5"),
          ("bad_caption", "caption", "7")]
  assert bad[0]["reason"].startswith("cannot decode image")
  assert bad[1]["reason"] == "missing audio file"
  assert bad[2]["reason"] == "empty caption"
  for b in bad:
    assert f"skipped item {b['id']!r}" in stderr

  builder = tfds.builder("mixed", data_dir=data_dir)
  got = {}
  for split in ("train", "test"):
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      got.setdefault(ex["key"].decode(), []).append((split, ex))
  assert sorted(got) == [f"item{i}" for i in range(6)]
  assert {k: [s for s, _ in v] for k, v in got.items()}["item5"] == ["test", "test"]
  (_, item4), = got["item4"]
  assert not item4["has_speech"] and item4["has_photo"] and len(item4["speech"]) == 0
  (_, item0), = got["item0"]
  np.testing.assert_array_equal(item0["speech"], fixtures.write_wav(
      str(tmp_path / "again.wav"), 0, seconds=0.3, rate=16_000))
  assert [c.decode() for c in item0["caption"]] == ["caption 0 one", "caption 0 two"]
  # item5's two records hold two different recordings... of which only one is item5's own
  # first, and the same photo is not repeated: first_ flags mark distinct values.
  flags = sorted((bool(ex["has_photo"]), bool(ex["first_speech"])) for _, ex in got["item5"])
  assert flags == [(False, True), (True, True)]


def test_a_manifest_and_its_media_on_another_filesystem_build_the_same(mixed, mixed_build,
                                                                       tmp_path):
  """The manifest, its media and a tar shard under TensorFlow's in-memory ram:// scheme (as
  they would be in a bucket): the build reads them through tf.io.gfile and gives the same
  examples and the same bad records as the build from local files."""
  from xmodal_jax.data import webdataset  # pylint: disable=g-import-not-at-top
  remote = "ram://bucket/mixed"
  lines = []
  for line in open(mixed / "items.jsonl", encoding="utf-8"):
    item = json.loads(line)
    if isinstance(item.get("speech"), str) and os.path.isabs(item["speech"]):
      item["speech"] = os.path.relpath(item["speech"], mixed)  # relative to the manifest
    lines.append(item)
  for folder, _, files in os.walk(mixed / "media"):
    for name in files:
      tf.io.gfile.makedirs(f"{remote}/media")
      tf.io.gfile.GFile(f"{remote}/media/{name}", "wb").write(
          open(os.path.join(folder, name), "rb").read())
  # item2's record moves into a shard (key item2, members .jpg/.wav/.txt).
  (item2,) = [item for item in lines if item["id"] == "item2"]
  lines.remove(item2)
  webdataset.write_shard(f"{remote}/shard.tar", [("item2", {
      "jpg": open(mixed / item2["photo"], "rb").read(),
      "wav": open(mixed / item2["speech"], "rb").read(),
      "json": json.dumps(item2["caption"]).encode()})])
  lines.insert(3, {"split": "train", "tar": "shard.tar", "photo": "jpg", "speech": "wav",
                   "caption": "json"})
  with tf.io.gfile.GFile(f"{remote}/items.jsonl", "w") as f:
    f.write("".join(json.dumps(item) + "\n" for item in lines))
  builder = records.manifest_builder(
      "mixed", f"{remote}/items.jsonl",
      manifest.parse_modalities("photo:image,speech:audio,caption:text"),
      data_dir=str(tmp_path))
  builder.download_and_prepare()
  data_dir, _ = mixed_build
  assert read_examples(str(tmp_path), "mixed") == read_examples(data_dir, "mixed")
  local, moved = read_report(data_dir, "mixed"), read_report(str(tmp_path), "mixed")
  assert [(b["id"], b["reason"]) for b in moved] == [(b["id"], b["reason"]) for b in local]
  assert moved[0]["file"] == f"{remote}/media/corrupt.jpg"


@pytest.mark.slow
def test_beam_build_gives_the_same_examples_and_report(mixed, mixed_build, tmp_path):
  """--beam on DirectRunner with 2 workers (threads here, which keeps the suite in its
  budget; benchmarks/build.py runs worker processes): the same examples field by field
  (first_ flags included) and the same bad-record list as the single-process build."""
  data_dir, _ = mixed_build
  proc = fixtures.build_cli(f"--manifest={mixed / 'items.jsonl'}", *MIXED_FLAGS,
                            f"--data_dir={tmp_path}", "--beam",
                            "--beam_options=--runner=DirectRunner --direct_num_workers=2 "
                            "--direct_running_mode=multi_threading")
  assert "3 bad records skipped" in proc.stderr
  assert "INFO" not in proc.stderr.replace("INFO:__main__:Logging handler created", "")
  single, beam = read_examples(data_dir, "mixed"), read_examples(str(tmp_path), "mixed")
  assert {s: len(v) for s, v in beam.items()} == {"train": 3, "test": 4}
  assert beam == single
  assert read_report(str(tmp_path), "mixed") == read_report(data_dir, "mixed")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # its temp files
  strict = fixtures.build_cli(f"--manifest={mixed / 'items.jsonl'}", *MIXED_FLAGS,
                              f"--data_dir={tmp_path / 'strict'}", "--beam", "--strict",
                              "--beam_options=--runner=DirectRunner", check=False)
  assert strict.returncode
  last = strict.stderr.strip().splitlines()[-1]  # workers may meet any bad record first
  assert re.fullmatch(r"error: --strict build stopped at a bad record: item "
                      r"'bad_(image|audio|caption)': .*", last)
  assert os.listdir(tmp_path / "strict") == ["downloads"] or not [
      p for p in os.listdir(tmp_path / "strict") if p.startswith(".")]


@pytest.mark.slow
def test_strict_build_fails_naming_the_first_bad_record(mixed, tmp_path):
  proc = fixtures.build_cli(f"--manifest={mixed / 'items.jsonl'}",
                            "--modalities=photo:image,speech:audio,caption:text", "--name=mixed",
                            f"--data_dir={tmp_path}", "--strict", check=False)
  assert proc.returncode
  assert "item 'bad_image'" in proc.stderr and "corrupt.jpg" in proc.stderr
  assert not os.path.exists(tmp_path / "mixed" / "1.0.0" / "dataset_info.json")


def test_manifest_errors_name_line_key_and_type(tmp_path):
  path = tmp_path / "items.jsonl"
  path.write_text('{"id": "a", "split": "train", "caption": "x"}\n\n{"id": "b", "split":\n')
  with pytest.raises(ValueError, match=r"items.jsonl:3: not valid JSON"):
    manifest.read_manifest(str(path))
  path.write_text('{"id": "a", "split": "train", "caption": "x"}\n["not", "an object"]\n')
  with pytest.raises(ValueError, match=r"items.jsonl:2: expected a JSON object"):
    manifest.read_manifest(str(path))
  with pytest.raises(ValueError, match="--modalities: modality 'x' has kind 'photo'"):
    manifest.parse_modalities("x:photo")
  np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float64).reshape(2, 3))
  np.save(tmp_path / "f.npy", np.zeros((3, 2)))
  fixtures.write_manifest(path, [
      {"id": "a", "split": "train", "caption": "fine", "feat": "a.npy"},
      {"id": "b", "split": "train", "caption": "fine", "sound": "b.wav"},
      {"id": "c", "split": "train", "caption": 7},
      {"id": "d", "split": "train", "caption": ["one", 2]},
      {"id": "e", "split": "train", "caption": "x", "photo": 3},
      {"id": "f", "split": "train", "caption": "x", "feat": "f.npy"},
      {"id": "g", "split": "train", "caption": "no features"},
      # A file that exists but fails to read (EIO): an OSError, not a crashed build.
      {"id": "h", "split": "train", "caption": "x", "photo": "/proc/self/mem"}])
  builder = records.manifest_builder(
      "errors", str(path), manifest.parse_modalities("caption:text,photo:image,feat:features"),
      data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  reasons = {b["id"]: b["reason"] for b in builder.bad_records}
  assert reasons["b"].startswith("unknown modality key(s) ['sound']")
  assert reasons["c"] == "expected a string or a list of strings, got int 7"
  assert reasons["d"].startswith("expected a string or a list of strings, got list")
  assert reasons["e"] == "expected a file path (string), got int 3"
  assert reasons["f"].startswith("features of shape (3, 2); this dataset's are (2, 3)")
  assert reasons["h"].startswith("OSError: [Errno 5]")
  assert sorted(reasons) == ["b", "c", "d", "e", "f", "h"]
  stored = {ex["key"].decode(): ex for ex in builder.as_dataset(split="train").as_numpy_iterator()}
  np.testing.assert_array_equal(stored["a"]["feat"], np.arange(6).reshape(2, 3))
  assert stored["a"]["has_feat"] and not stored["g"]["has_feat"]


def test_integer_and_string_ids_are_not_merged(tmp_path):
  path = tmp_path / "items.jsonl"
  fixtures.write_manifest(path, [{"id": 7, "split": "train", "caption": "an integer id"},
                                 {"id": 8, "split": "train", "caption": "another"},
                                 {"id": "7", "split": "train", "caption": "a string id"}])
  builder = records.manifest_builder("ids", str(path), {"caption": "text"},
                                     data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"mix integers \(.*items.jsonl:1: 7\) and strings "
                     r"\(.*items.jsonl:3: '7'\)"):
    builder.download_and_prepare()


def test_a_split_name_that_would_leave_the_data_dir_is_refused(tmp_path):
  """A split becomes part of file names: one with a path in it stops the build at its line,
  before anything is written."""
  path = tmp_path / "items.jsonl"
  fixtures.write_manifest(path, [
      {"id": 1, "split": "train", "caption": "fine"},
      {"id": 2, "split": "x/../../../escaped/pwn", "caption": "hostile"}])
  with pytest.raises(ValueError, match=r"items.jsonl:2: \"split\": 'x/../../../escaped/pwn': "
                     "expected ASCII letters, digits and _"):
    records.manifest_builder("splits", str(path), {"caption": "text"},
                             data_dir=str(tmp_path / "tfds")).download_and_prepare()
  assert sorted(os.listdir(tmp_path)) == ["items.jsonl"]


def test_dataset_names_stay_apart_from_tfds_builders(tmp_path):
  """A manifest named as a registered dataset would be read with that dataset's code: refused.
  Our adapters' names collide with none of TFDS's (no "already registered" traceback when
  TFDS loads its own)."""
  path = tmp_path / "items.jsonl"
  fixtures.write_manifest(path, [{"id": 1, "split": "train", "caption": "a clip"}])
  for name in ("webvid", "ucf101", "audiocaps"):
    with pytest.raises(ValueError, match=f"--name='{name}' is a registered TFDS dataset"):
      records.manifest_builder(name, str(path), {"caption": "text"},
                               data_dir=str(tmp_path / "tfds"))
  loaded = subprocess.run(
      [sys.executable, "-c", "import tensorflow_datasets as tfds; "
       "import xmodal_jax.data.pipeline; tfds.list_builders(with_community_datasets=False)"],
      cwd=REPO, capture_output=True, text=True, check=True)
  assert "already registered" not in loaded.stderr, loaded.stderr[-2000:]


def test_audio_formats_decode_to_the_same_signal(tmp_path):
  """wav is exact; flac is lossless; mp3 and Opus (.ogg) keep the waveform up to codec
  delay and loss; all resampled to the asked rate."""
  samples = fixtures.write_wav(str(tmp_path / "a.wav"), 3, seconds=0.5, rate=16_000)
  np.testing.assert_array_equal(media.decode_audio(str(tmp_path / "a.wav"), 16_000), samples)
  for codec, ext in [("flac", "flac"), ("mp3", "mp3"), ("libopus", "ogg")]:
    fixtures.write_audio(str(tmp_path / f"a.{ext}"), samples, 16_000, codec)
    x = media.decode_audio(str(tmp_path / f"a.{ext}"), 16_000).astype(np.float64)
    if codec == "flac":
      np.testing.assert_array_equal(x, samples)
    n = min(len(x), len(samples))
    corr = np.correlate(x[:n], samples[:n].astype(np.float64), "full")
    best = corr.max() / (np.linalg.norm(x[:n]) * np.linalg.norm(samples[:n]))
    assert best > 0.9, (codec, best)
  assert len(media.decode_audio(str(tmp_path / "a.flac"), 8_000)) == 4_000
  (tmp_path / "bad.mp3").write_bytes(b"garbage" * 100)
  with pytest.raises(ValueError, match="bad.mp3: cannot decode audio"):
    media.decode_audio(str(tmp_path / "bad.mp3"), 8_000)


def _modality(**kw):
  return schema.modality(dict(feature="x", **kw))


def test_image_preprocessing_known_answers():
  """Eval: shorter side to `size`, centre crop, CLIP normalization. A 24 x 48 PNG, left half
  red and right half blue, becomes 16 x 16 with 8 red then 8 blue columns."""
  pixels = np.zeros((24, 48, 3), np.uint8)
  pixels[:, :24, 0] = 255
  pixels[:, 24:, 2] = 255
  png = tf.io.encode_png(pixels).numpy()
  config = _modality(kind="image", image_size=16)
  out = preprocess.get_op("image", config, train=False)(tf.constant(png), None)["pixels"]
  mean = np.array([0.48145466, 0.4578275, 0.40821073])  # CLIP's
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  red, blue = (np.array([1, 0, 0]) - mean) / std, (np.array([0, 0, 1]) - mean) / std
  np.testing.assert_allclose(out[:, :7], np.broadcast_to(red, (16, 7, 3)), atol=1e-5)
  np.testing.assert_allclose(out[:, 9:], np.broadcast_to(blue, (16, 7, 3)), atol=1e-5)
  train_op = preprocess.get_op("image", config, train=True)
  seed = tf.constant([1, 2], tf.int64)
  a, b = (train_op(tf.constant(png), seed)["pixels"].numpy() for _ in range(2))
  np.testing.assert_array_equal(a, b)  # the seed decides the crop and the flip
  crops = {train_op(tf.constant(png), tf.constant([1, s], tf.int64))["pixels"].numpy().tobytes()
           for s in range(8)}
  assert len(crops) > 4
  missing = preprocess.get_op("image", config, train=False)(tf.constant(b""), None)["pixels"]
  assert missing.shape == (16, 16, 3)


def test_frame_sampling_matches_segment_rule():
  for count in (1, 5, 8, 31):
    np.testing.assert_array_equal(preprocess.frame_indices(count, 8).numpy(),
                                  media.sample_indices(count, 8))
    for s in range(5):
      picked = preprocess.frame_indices(count, 8, tf.constant([s, 1], tf.int64)).numpy()
      segments = np.arange(8) * count / 8
      assert np.all(picked >= np.minimum(np.floor(segments), count - 1))
      assert np.all(picked <= np.minimum(np.ceil(segments + count / 8) - 1, count - 1)), picked


@pytest.fixture(scope="module")
def digit_records(tmp_path_factory):
  root = tmp_path_factory.mktemp("digits")
  items = fixtures.digit_manifest(root)
  data_dir = str(root / "tfds")
  fixtures.build_cli(f"--manifest={root / 'items.jsonl'}", *fixtures.DIGIT_FLAGS,
                     f"--data_dir={data_dir}")
  return data_dir, items


def digit_config(data_dir):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.data.name = "digit_records"
  config.data.data_dir = data_dir
  return schema.fill_defaults(config)


def _all_frames(path):
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_sampled_frames_are_the_same_whether_or_not_the_container_counts_them(tmp_path):
  frames = np.zeros([31, 48, 64, 3], np.uint8)
  for i in range(31):  # frame i: a bar at column 2i, so frames are told apart after coding
    frames[i, :, 2 * i:2 * i + 2] = 255
  for ext in ("mp4", "mkv"):
    fixtures.write_mp4(str(tmp_path / f"clip.{ext}"), frames)
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(tmp_path / "clip.mkv")) as container:
    assert container.streams.video[0].frames == 0  # MKV: no count in the header
  for ext in ("mp4", "mkv"):
    path = str(tmp_path / f"clip.{ext}")
    reference = _all_frames(path)[media.sample_indices(31, 8)]
    np.testing.assert_array_equal(media.decode_video(path, 8), reference)
    assert np.argmax(media.decode_video(path, 8)[:, 0, :, 0], 1).tolist() == [
        2 * i for i in media.sample_indices(31, 8)]


def test_video_decoding_memory_does_not_grow_with_the_clip(tmp_path):
  """A 24 s 720p MKV (no frame count in the container): every frame kept would be 660 MB."""
  path = str(tmp_path / "long.mkv")
  base = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), np.uint8)
  fixtures.write_mp4(path, (np.roll(base, 8 * i, 1) for i in range(240)), fps=10,
                     options={"preset": "ultrafast"}.items())
  # VmHWM: this process's peak RSS (ru_maxrss would carry over pytest's across the exec).
  script = ("from xmodal_jax.data import media; "
            f"x = media.decode_video({path!r}, 8); assert x.shape == (8, 720, 1280, 3); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, check=True)
  peak_mb = int(out.stdout.split()[-1]) / 1024
  assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"


def test_random_access_copy_reads_what_tfds_reads_in_order(digit_records):
  from xmodal_jax.data import random_access  # pylint: disable=g-import-not-at-top
  builder = pipeline.get_builder(digit_config(digit_records[0]).data)
  for split in ("train", "train[5:33]", "test"):
    reference = [ex["key"] for ex in builder.as_dataset(
        split=split, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1)).as_numpy_iterator()]
    reader = random_access.Reader(builder, split)
    positions = np.random.default_rng(0).permutation(reader.size)
    got = [builder.info.features.deserialize_example(r)["key"].numpy()
           for r in reader.read(positions)]
    assert reader.size == len(reference)
    assert got == [reference[p] for p in positions]


def test_hosts_split_each_global_batch_and_every_epoch_is_a_permutation(digit_records):
  data_dir, items = digit_records
  config = digit_config(data_dir)
  config.batch_size = 8
  builder = pipeline.get_builder(config.data)
  assert not config.data.cache  # the hosts read per batch, the single process from memory
  cached = config.copy_and_resolve_references()
  cached.data.cache = True
  single = pipeline.train_iterator(cached, builder)
  hosts = [pipeline.train_iterator(config, builder, process_index=i, process_count=2)
           for i in range(2)]
  ids = []
  for _ in range(10):  # two epochs of the 40 training items
    whole, halves = next(single), [next(h) for h in hosts]
    # Process h's batch is the h-th half of the one-process global batch, augmentation
    # included: the global batches depend neither on the number of processes nor on
    # where the records are read from.
    jax.tree.map(lambda a, b0, b1: np.testing.assert_array_equal(a, np.concatenate([b0, b1])),
                 whole, *halves)
    ids.extend(whole["_id"].tolist())
  assert sorted(ids[:40]) == sorted(ids[40:]) == list(range(40))
  assert ids[:40] != ids[40:]  # each epoch has its own order

  seen, batch_counts = [], []
  for index in range(2):
    batches = list(eval_input.eval_iterator(config, builder, "test", process_index=index,
                                          process_count=2))
    batch_counts.append(len(batches))
    for batch in batches:
      assert len(batch["_id"]) == config.eval_batch_size // 2
      seen.extend(batch["_id"][batch["_id"] >= 0].tolist())
  assert batch_counts[0] == batch_counts[1]
  assert sorted(seen) == list(range(40, 50))  # every test item exactly once


def test_decoded_video_and_audio_match_the_items(digit_records):
  """Frames come back from MP4 -> JPEG -> pipeline within codec loss; audio exactly."""
  data_dir, _ = digit_records
  config = digit_config(data_dir)
  builder = pipeline.get_builder(config.data)
  batch = next(eval_input.eval_iterator(config, builder, "test"))
  train, test = digit_sequences.split_sequences(0, 1000)
  del train
  pools = digit_sequences.split_handwriting(0)
  spoken = digit_sequences.load_spoken_digits()
  expected = {key: ex for key, ex in digit_sequences.make_items(test[:10], pools["test"],
                                                                spoken, 1, 5000)}
  for row, item_id in enumerate(batch["_id"][:10]):
    ex = expected[5000 + int(item_id) - 40]  # ids number the manifest's items: test 40..49
    frames = (batch["video"]["frames"][row] + 1) * 127.5
    assert np.abs(frames - ex["video"]).mean() < 6, np.abs(frames - ex["video"]).mean()
    np.testing.assert_allclose(batch["audio"]["waveform"][row] * 32768.0, ex["audio"])


def test_caption_lists_are_expanded_at_evaluation(mixed, tmp_path):
  """Every caption is one query; each photo and recording enters the gallery once."""
  builder = records.manifest_builder(
      "mixed_eval", str(mixed / "items.jsonl"),
      manifest.parse_modalities("photo:image,speech:audio,caption:text"),
      data_dir=str(tmp_path))
  builder.download_and_prepare()
  config = ml_collections.ConfigDict(dict(
      seed=0, eval_batch_size=8,
      data=schema.defaults().data.to_dict() | dict(name="mixed_eval", data_dir=str(tmp_path)),
      modalities={name: schema.modality(options) for name, options in dict(
          photo=dict(kind="image", feature="photo", image_size=16),
          speech=dict(kind="audio", feature="speech", num_samples=4000),
          caption=dict(kind="text", feature="caption", tokenizer="digit_words",
                       max_length=8)).items()}))
  batches = list(eval_input.eval_iterator(config, builder, "test"))
  masks = {m: np.concatenate([b["_mask"][m] for b in batches]) for m in config.modalities}
  ids = np.concatenate([b["_id"] for b in batches])
  # test split: item3, item4 (no speech), item5 (photo + 2 captions) and item5 again
  # (speech s0 + 1 caption): 2 + 2 + 2 + 1 = 7 captions.
  assert masks["caption"].sum() == 7
  assert masks["photo"].sum() == 3 and masks["speech"].sum() == 3
  # Ids number the manifest's items in order, skipped ones included (so they do not shift
  # when a record goes bad): item3 = 5, item4 = 7, item5 = 8.
  assert sorted(ids[masks["photo"]].tolist()) == [5, 7, 8]
  assert len(ids[ids >= 0]) == 7


@pytest.mark.slow
def test_webdataset_shards_build_to_array_record_and_train(digit_records, tmp_path):
  """The digit items as webdataset tar shards (key = id; .wav, .mp4, .txt members), built
  as ArrayRecord: every example equals the TFRecord build of the same items as loose files;
  a corrupt member is reported, not dropped; and changing config.data.name is all it takes
  for the tiny default to train and evaluate on the build (40 train, 10 test items), zero-shot
  classification of audio by each item's first digit (its "label") included."""
  from xmodal_jax.data import webdataset  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  data_dir, items = digit_records
  root = os.path.dirname(data_dir)
  samples = {"train": [], "test": []}
  for item in items:
    files = {ext: open(os.path.join(root, item[m]), "rb").read()
             for m, ext in (("audio", "wav"), ("video", "mp4"))}
    samples[item["split"]].append((item["id"], files | {"txt": item["text"].encode(),
                                                        "cls": item["label"].encode()}))
  # The last sample: a truncated recording (its id comes after every good one's).
  samples["test"].append(("corrupt", {"wav": b"RIFF\x00\x00", "txt": b"one two"}))
  os.makedirs(tmp_path / "shards")
  half = len(samples["train"]) // 2
  for name, part in (("train-000", samples["train"][:half]),
                     ("train-001", samples["train"][half:]), ("test-000", samples["test"])):
    webdataset.write_shard(str(tmp_path / "shards" / f"{name}.tar"), part)
  fields = {"audio": "wav", "video": "mp4", "text": "txt", "label": "cls"}
  fixtures.write_manifest(tmp_path / "shards.jsonl", [
      {"split": "train", "tar": "shards/train-{000..001}.tar"} | fields,
      {"split": "test", "tar": "shards/test-000.tar"} | fields])
  built = str(tmp_path / "built")
  proc = fixtures.build_cli(f"--manifest={tmp_path / 'shards.jsonl'}", *fixtures.DIGIT_FLAGS,
                            f"--data_dir={built}", "--file_format=array_record")
  assert "1 bad records skipped" in proc.stderr
  (bad,) = read_report(built, "digit_records")
  assert bad["id"] == "corrupt" and bad["file"].endswith("test-000.tar:corrupt.wav")
  assert bad["reason"].startswith("cannot decode audio")
  assert not os.path.exists(os.path.join(built, "digit_records", "1.0.0", "random_access"))
  assert read_examples(built, "digit_records") == read_examples(data_dir, "digit_records")
  config = digit_config(built)
  zeroshot = dict(type="zeroshot", every=6, modality="audio", templates=("{}", "{} and more"))
  config.evals.zeroshot = zeroshot
  # The same items from the other build, as another dataset (ESC-50 after training on pairs).
  config.evals.zeroshot_elsewhere = zeroshot | dict(
      data=dict(name="digit_records", data_dir=data_dir, split="test"), prefix="loose")
  metrics = experiment_lib.train(config, str(tmp_path / "run"))
  assert metrics["test/audio->text/chance_R@1"] == pytest.approx(10.0)
  assert "test/audio->text/R@1" in open(tmp_path / "run" / "metrics.jsonl").read()
  # Zero-shot through the train loop's evaluators: the test items' first digits as classes.
  classes = {item["label"] for item in items if item["split"] == "test"}
  assert metrics["test/zeroshot/audio/chance_top1"] == pytest.approx(100 / len(classes))
  for name in ("top1", "top5", "mean_per_class_recall"):
    assert 0 <= metrics[f"test/zeroshot/audio/{name}"] <= 100
    assert metrics[f"loose/zeroshot/audio/{name}"] == pytest.approx(
        metrics[f"test/zeroshot/audio/{name}"])


def test_shard_names_expand_and_members_split_at_the_first_dot():
  from xmodal_jax.data import webdataset  # pylint: disable=g-import-not-at-top
  assert webdataset.expand_braces("s/a-{08..11}.tar") == [
      "s/a-08.tar", "s/a-09.tar", "s/a-10.tar", "s/a-11.tar"]
  assert webdataset.expand_braces("{1..2}-{0..1}.tar") == ["1-0.tar", "1-1.tar", "2-0.tar",
                                                           "2-1.tar"]
  assert webdataset.expand_braces("plain.tar") == ["plain.tar"]
  with pytest.raises(ValueError, match="empty"):
    webdataset.expand_braces("a-{3..1}.tar")
  assert webdataset.split_name("dir/x.y/000123.seg.flac") == ("dir/x.y/000123", "seg.flac")
  assert webdataset.split_name("k.txt") == ("k", "txt")


def test_random_access_to_an_array_record_build_in_a_bucket_says_to_mount_it():
  """ArrayRecord's reader opens local files only; a TFRecord build in a bucket is read by
  position through an offset index (test_remote_storage.py)."""
  from xmodal_jax.data import random_access  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  builder = types.SimpleNamespace(
      data_dir="gs://bucket/tfds/mydata/1.0.0",
      info=types.SimpleNamespace(file_format=types.SimpleNamespace(value="array_record")))
  with pytest.raises(ValueError, match=r"gs://bucket/tfds/mydata/1.0.0: .*mount the bucket"):
    random_access.has_copy(builder, "train")


def test_export_rows_carry_manifest_ids_and_nothing_is_gathered(digit_records, tmp_path,
                                                                  monkeypatch):
  """An export of the manifest-built test split (a fresh model, 3 shards): each row's key is
  its manifest id (slashes and non-ASCII kept), rows in the dataset's order as TFDS reads
  it; float16 rows have cosine
  >= 0.9995 with float32 ones; and no embedding goes through a gather across processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import embed, export  # pylint: disable=g-import-not-at-top
  data_dir, items = digit_records
  config = digit_config(data_dir)
  config.eval_batch_size = 4
  assembly = experiment.assemble(config, jax.devices()[:1])
  params = experiment.fresh_state(assembly).params
  embedder = embed.Embedder(assembly.source, assembly.model, assembly.mesh)
  gathered = []
  real_gather = multihost_utils.process_allgather
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x, **kw: (
      gathered.append(jax.tree.map(lambda a: np.asarray(a).dtype, x)), real_gather(x, **kw))[1])
  exports = {}
  for dtype in export.DTYPES:
    out = str(tmp_path / dtype)
    signature = {"split": "test", "step": 0, "workdir": "w", "dataset": "digit_records"}
    export.write_shards(out, embedder, params, "test", signature=signature, shard_rows=4,
                        dtype=dtype, log=lambda _: None)
    export.finish(out, signature, dtype)
    exports[dtype] = export.read_export(out)
  assert gathered and all(np.issubdtype(d, np.integer) for g in gathered
                          for d in jax.tree.leaves(g))
  full, half = exports["float32"], exports["float16"]
  assert [s["rows"] for s in full.meta["shards"]] == [4, 4, 2]
  read = [(int(ex["id"]), ex["key"].decode("utf-8")) for ex in pipeline.get_builder(
      config.data).as_dataset(split="test", shuffle_files=False).as_numpy_iterator()]
  assert list(zip(full.ids().tolist(), full.keys().tolist())) == read
  assert half.keys().tolist() == full.keys().tolist()
  assert sorted(full.keys()) == sorted(i["id"] for i in items if i["split"] == "test")
  assert full.keys()[0].startswith("clips/naïve/seq")
  for m in ("audio", "video", "text"):
    a, b = full.embeddings(m), half.embeddings(m)
    assert next(half.shard_embeddings(m))[1].dtype == np.float16
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.9995, (m, cosine.min())
