"""Manifests and media a careless or hostile user might hand the builder: bytes that are not
UTF-8, text that cannot be stored, a split of only bad records, an id in two splits, paths
out of the manifest's folder, audio headers that lie and audio that never ends."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import fixtures

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
# pylint: disable=g-import-not-at-top,wrong-import-position
from xmodal_jax.data import encoding, manifest, media, records


def write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write((json.dumps(line) if isinstance(line, dict) else line).encode("utf-8")
              if not isinstance(line, bytes) else line)
      f.write(b"\n")


def build(tmp_path, lines, modalities, name="bounds", beam=False, **options):
  """The built manifest builder (its bad_records kept)."""
  path = tmp_path / "items.jsonl"
  write_lines(path, lines)
  builder = records.manifest_builder(name, str(path), modalities,
                                     options=encoding.BuildOptions(**options),
                                     data_dir=str(tmp_path / "tfds"), beam=beam)
  builder.download_and_prepare()
  return builder


def stored_keys(builder, split):
  return sorted(ex["key"].decode() for ex in builder.as_dataset(split=split).as_numpy_iterator())


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
  path = tmp_path / "items.jsonl"
  write_lines(path, [{"id": 1, "split": "train", "caption": "fine"},
                     b'{"id": 2, "split": "train", "caption": "caf\xe9"}'])
  with pytest.raises(ValueError, match=r"items.jsonl:2: not UTF-8 \(byte 0xe9 at byte 44"):
    manifest.read_manifest(str(path))


def test_text_that_cannot_be_stored_is_a_bad_record_naming_its_line(tmp_path):
  builder = build(tmp_path, [
      {"id": "a", "split": "train", "caption": "fine"},
      '{"id": "b", "split": "train", "caption": ["fine", "lone \\ud800 surrogate"]}',
      '{"id": "c\\udfff", "split": "train", "caption": "fine"}',
      {"id": "d", "split": "train", "caption": "also fine"}], {"caption": "text"})
  bad = {b["source"].rsplit(":", 1)[1]: b for b in builder.bad_records}
  assert sorted(bad) == ["2", "3"]
  assert bad["2"]["id"] == "b" and bad["2"]["file"] == "caption[1]"
  assert bad["2"]["reason"] == ("cannot be stored as UTF-8 (surrogates not allowed at "
                                "character 5: '\\ud800')")
  assert bad["3"]["file"] == "id" and "surrogates not allowed" in bad["3"]["reason"]
  assert stored_keys(builder, "train") == ["a", "d"]


@pytest.mark.parametrize("beam", [False, True], ids=["one_process", "beam"])
def test_a_split_of_only_bad_records_stops_the_build_and_keeps_the_report(tmp_path, beam):
  with pytest.raises(ValueError, match=r"split 'test': all 2 of its records are bad; the "
                     r"report lists why: .*/bounds/bad_records.jsonl"):
    build(tmp_path, [{"id": 1, "split": "train", "caption": "fine"},
                     {"id": 2, "split": "test", "caption": " "},
                     {"id": 3, "split": "test", "caption": ""}], {"caption": "text"},
          beam=beam)
  with open(tmp_path / "tfds" / "bounds" / records.REPORT_FILE) as f:
    report = [json.loads(line) for line in f]
  assert [(r["id"], r["split"], r["reason"]) for r in report] == [
      (2, "test", "empty caption"), (3, "test", "empty caption")]
  assert not os.path.exists(tmp_path / "tfds" / "bounds" / "1.0.0" / "dataset_info.json")
  assert not [p for p in os.listdir(tmp_path / "tfds") if "beam" in p]  # no temporary folder


def test_an_id_in_two_splits_stays_in_the_split_of_its_first_line(tmp_path):
  """Line 2 puts item "a" in test; line 3 uses "a" again in train, whose first line (1) comes
  before: the item stays in test and line 3 is the bad record, naming line 2."""
  builder = build(tmp_path, [{"id": "x", "split": "train", "caption": "one"},
                             {"id": "a", "split": "test", "caption": "two"},
                             {"id": "a", "split": "train", "caption": "three"}],
                  {"caption": "text"})
  assert stored_keys(builder, "test") == ["a"] and stored_keys(builder, "train") == ["x"]
  (bad,) = builder.bad_records
  assert bad["source"].endswith("items.jsonl:3") and bad["split"] == "train"
  assert bad["reason"].startswith("the id's first record is in split 'test' (")
  assert "items.jsonl:2)" in bad["reason"]


def test_media_paths_stay_in_the_manifests_folder_unless_told(tmp_path):
  root = tmp_path / "data"
  outside = tmp_path / "outside"
  fixtures.write_jpeg(str(root / "in.jpg"), 0)
  fixtures.write_jpeg(str(outside / "secret.jpg"), 1)
  os.symlink(outside, root / "link")
  lines = [{"id": "in", "split": "train", "photo": "in.jpg"},
           {"id": "dotdot", "split": "train", "photo": "../outside/secret.jpg"},
           {"id": "symlink", "split": "train", "photo": "link/secret.jpg"},
           {"id": "absolute", "split": "train", "photo": str(outside / "secret.jpg")}]
  write_lines(root / "items.jsonl", lines)

  def built(name, **options):
    builder = records.manifest_builder(name, str(root / "items.jsonl"), {"photo": "image"},
                                       options=encoding.BuildOptions(**options),
                                       data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    return builder
  confined = built("confined")
  reasons = {b["id"]: b["reason"] for b in confined.bad_records}
  assert sorted(reasons) == ["dotdot", "symlink"]
  assert "'../outside/secret.jpg' leads outside the manifest's folder" in reasons["dotdot"]
  assert "--noconfine" in reasons["symlink"]
  assert stored_keys(confined, "train") == ["absolute", "in"]
  assert stored_keys(built("unconfined", confine=False), "train") == [
      "absolute", "dotdot", "in", "symlink"]


def test_tar_shard_paths_stay_in_the_manifests_folder_unless_told(tmp_path):
  from xmodal_jax.data import webdataset  # pylint: disable=g-import-not-at-top
  root, outside = tmp_path / "data", tmp_path / "outside"
  root.mkdir()
  outside.mkdir()
  webdataset.write_shard(str(outside / "shard-0.tar"), [("x", {"txt": b"a caption"})])
  os.symlink(outside, root / "link")
  for pattern in ("../outside/shard-{0..0}.tar", "link/shard-0.tar"):
    write_lines(root / "items.jsonl", [{"split": "train", "tar": pattern, "caption": "txt"}])
    with pytest.raises(ValueError, match=r"items.jsonl:1: shard '(\.\./outside|link)/shard-0"
                       r"\.tar' leads outside the manifest's folder .*--noconfine"):
      records.manifest_builder("shards", str(root / "items.jsonl"), {"caption": "text"},
                               data_dir=str(tmp_path / "tfds"))
  builder = records.manifest_builder(
      "shards", str(root / "items.jsonl"), {"caption": "text"},
      options=encoding.BuildOptions(confine=False), data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  assert stored_keys(builder, "train") == ["x"]


def write_wav_header_rate(path, samples, rate):
  import wave  # pylint: disable=g-import-not-at-top
  with wave.open(str(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(np.zeros(samples, "<i2").tobytes())


def test_audio_with_a_lying_header_or_no_end_is_refused(tmp_path):
  write_wav_header_rate(tmp_path / "one_hz.wav", 8000, 1)  # 16 KB saying "8000 seconds"
  fixtures.write_wav(str(tmp_path / "long.wav"), 0, seconds=2.0, rate=16_000)
  fixtures.write_wav(str(tmp_path / "short.wav"), 1, seconds=0.5, rate=16_000)
  builder = build(tmp_path, [{"id": "one_hz", "split": "train", "speech": "one_hz.wav"},
                             {"id": "long", "split": "train", "speech": "long.wav"},
                             {"id": "short", "split": "train", "speech": "short.wav"}],
                  {"speech": "audio"}, max_audio_seconds=1.0)
  reasons = {b["id"]: b["reason"] for b in builder.bad_records}
  assert "the audio stream says 1 samples a second; expected at least 1000" in reasons["one_hz"]
  assert "longer than 1 s (decoding stopped there)" in reasons["long"]
  assert stored_keys(builder, "train") == ["short"]
  # A query goes through the same decoder, with a default bound.
  with pytest.raises(ValueError, match="says 1 samples a second"):
    media.decode_audio(str(tmp_path / "one_hz.wav"), 16_000)
  assert media.MAX_AUDIO_SECONDS == 600


def test_image_sizes_read_from_headers_match_decoding(tmp_path):
  pil = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(0)
  for fmt, shape in (("JPEG", (37, 53)), ("PNG", (41, 29)), ("GIF", (17, 64)),
                     ("BMP", (33, 18))):
    path = tmp_path / f"x.{fmt.lower()}"
    pil.fromarray(rng.integers(0, 255, shape + (3,), dtype=np.uint8)).save(path, format=fmt)
    data = path.read_bytes()
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False).shape[:2]
    assert media.image_size(data) == tuple(decoded) == shape, fmt
  assert media.image_size(b"RIFF....WEBPVP8 ") is None


def test_images_and_videos_over_their_bounds_are_bad_records(tmp_path):
  fixtures.write_jpeg(str(tmp_path / "small.jpg"), 0, size=(16, 16))
  fixtures.write_jpeg(str(tmp_path / "big.jpg"), 1, size=(24, 32))
  frames = np.zeros((10, 16, 16, 3), np.uint8)
  fixtures.write_mp4(str(tmp_path / "ten.mp4"), frames)
  fixtures.write_mp4(str(tmp_path / "wide.mp4"), np.zeros((2, 16, 32, 3), np.uint8))
  builder = build(tmp_path, [{"id": "small", "split": "train", "photo": "small.jpg"},
                             {"id": "big", "split": "train", "photo": "big.jpg"},
                             {"id": "ten", "split": "train", "clip": "ten.mp4"},
                             {"id": "wide", "split": "train", "clip": "wide.mp4"}],
                  {"photo": "image", "clip": "video"}, max_pixels=500, max_video_frames=5,
                  video_frames=2)
  reasons = {b["id"]: b["reason"] for b in builder.bad_records}
  assert reasons["big"] == "32x24 pixels, over the 500-pixel bound (decoding refused)"
  assert reasons["ten"].endswith("ten.mp4: more than 5 frames, the bound (decoding refused))")
  assert "32x16 pixels, over the 500-pixel bound" in reasons["wide"]
  assert stored_keys(builder, "train") == ["small"]


def test_a_damaged_shard_is_named_and_leaves_no_partial_copy(tmp_path):
  from xmodal_jax.data import random_access  # pylint: disable=g-import-not-at-top
  builder = build(tmp_path, [{"id": i, "split": "train", "caption": f"caption {i}"}
                             for i in range(50)], {"caption": "text"})
  (shard,) = [i.filename for i in builder.info.splits["train"].file_instructions]
  shutil.rmtree(os.path.join(os.path.dirname(shard), random_access.FOLDER))
  with open(shard, "r+b") as f:
    f.seek(300)
    f.write(b"\xff" * 16)
  with pytest.raises(ValueError, match=re.escape(shard) + ": .*corrupted record at .*the "
                     "shard is damaged"):
    random_access.write_copy(builder, "train")
  assert os.listdir(os.path.join(os.path.dirname(shard), random_access.FOLDER)) == []
