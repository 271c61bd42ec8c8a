"""Each benchmark adapter builds from tiny files in its published layout (written here) and
reads back the right counts, ids, captions and splits."""

import concurrent.futures
import csv
import json
import os
import re

import jax
import numpy as np
import pytest

import fixtures
from conftest import run_launcher, run_train

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
from xmodal_jax import schema  # pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from xmodal_jax.data import encoding, records
from xmodal_jax.data.builders import benchmarks  # pylint: disable=g-import-not-at-top,wrong-import-position


def build(name, manual_dir, data_dir, **options):
  builder = benchmarks.ADAPTERS[name](options=encoding.BuildOptions(**options),
                                      data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return read_back(builder)


def read_back(builder):
  """{split: {key: example}} with captions decoded."""
  out = {}
  for split in builder.info.splits:
    items = {}
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      if "text" in ex:
        ex["text"] = [c.decode() for c in ex["text"]]
      items.setdefault(ex["key"].decode(), []).append(ex)
    out[split] = items
  return out


def karpathy_json(path, entries, dataset):
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"dataset": dataset, "images": entries}, f)


def karpathy_entry(filename, split, captions, i, **extra):
  return {"filename": filename, "split": split, "imgid": i, "sentids": list(range(len(captions))),
          "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": j}
                        for j, c in enumerate(captions)], **extra}


def write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_coco_karpathy(tmp_path):
  manual = tmp_path / "coco"
  entries = []
  for i, (folder, split) in enumerate([("val2014", "test"), ("train2014", "train"),
                                       ("val2014", "restval"), ("val2014", "val")]):
    name = f"COCO_{folder}_{i:012d}.jpg"
    fixtures.write_jpeg(str(manual / folder / name), i)
    entries.append(karpathy_entry(name, split, [f"a photo {i} ", f"caption {i} b"], i,
                                  filepath=folder, cocoid=i))
  karpathy_json(manual / "dataset_coco.json", entries, "coco")
  out = build("coco_karpathy", manual, tmp_path / "tfds")
  assert {s: sorted(v) for s, v in out.items()} == {
      "train": ["COCO_train2014_000000000001", "COCO_val2014_000000000002"],  # + restval
      "validation": ["COCO_val2014_000000000003"], "test": ["COCO_val2014_000000000000"]}
  (ex,), = out["test"].values()
  assert ex["text"] == ["a photo 0", "caption 0 b"]
  with open(manual / "val2014" / "COCO_val2014_000000000000.jpg", "rb") as f:
    assert ex["image"] == f.read()  # the file's bytes, decoded in the pipeline


@pytest.mark.parametrize("name,json_name,image_dir", [
    ("flickr30k_karpathy", "dataset_flickr30k.json", "flickr30k-images"),
    ("flickr8k_karpathy", "dataset_flickr8k.json", "Flicker8k_Dataset")])
def test_flickr_karpathy(tmp_path, name, json_name, image_dir):
  manual = tmp_path / "files"
  splits = ["train", "train", "val", "test", "test"]
  entries = []
  for i, split in enumerate(splits):
    fixtures.write_jpeg(str(manual / image_dir / f"{1000 + i}_x.jpg"), i)
    entries.append(karpathy_entry(f"{1000 + i}_x.jpg", split,
                                  [f"caption {i}.{j}" for j in range(5)], i))
  karpathy_json(manual / json_name, entries, name)
  out = build(name, manual, tmp_path / "tfds")
  assert {s: sorted(v) for s, v in out.items()} == {
      "train": ["1000_x", "1001_x"], "validation": ["1002_x"], "test": ["1003_x", "1004_x"]}
  (ex,) = out["test"]["1004_x"]
  assert ex["text"] == [f"caption 4.{j}" for j in range(5)]
  assert ex["has_image"] and ex["first_image"] and ex["has_text"]


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_flickr8k_audio(manual, images=6, spoken=2):
  """Flickr8k + Flickr8k Audio in their layout: `images` images (the first half train, then
  one validation, the rest test), 5 captions each (digit words), `spoken` spoken captions
  per training image and 5 per test image."""
  entries, lines = [], []
  for i in range(images):
    split = "train" if i < images // 2 else "val" if i == images // 2 else "test"
    image = f"{2000 + i}_y.jpg"
    fixtures.write_jpeg(str(manual / "Flicker8k_Dataset" / image), i)
    entries.append(karpathy_entry(image, split, [f"{DIGITS[i % 10]} {DIGITS[j]}"
                                                 for j in range(5)], i))
    for j in range(5 if split == "test" else spoken):
      wav = f"{2000 + i}_y_{j}.wav"
      fixtures.write_wav(str(manual / "flickr_audio" / "wavs" / wav), 10 * i + j,
                         seconds=0.25, rate=16_000)
      lines.append(f"{wav} {image} #{j}\n")
  karpathy_json(manual / "dataset_flickr8k.json", entries, "flickr8k")
  (manual / "flickr_audio" / "wav2capt.txt").write_text("".join(lines))


def test_flickr8k_audio(tmp_path):
  manual = tmp_path / "files"
  write_flickr8k_audio(manual, images=3)
  out = build("flickr8k_audio", manual, tmp_path / "tfds", sample_rate=8_000)
  assert {s: {k: len(v) for k, v in items.items()} for s, items in out.items()} == {
      "train": {"2000_y": 2}, "validation": {"2001_y": 2}, "test": {"2002_y": 5}}
  test = out["test"]["2002_y"]
  assert sorted(ex["text"] for ex in test) == sorted([f"two {DIGITS[j]}"] for j in range(5))
  assert all(len(ex["audio"]) == 2_000 for ex in test)  # 0.25 s resampled to 8 kHz
  # The image is stored with every spoken caption but counted once at evaluation.
  assert sum(ex["first_image"] for ex in test) == 1
  assert all(ex["first_audio"] and ex["first_text"] for ex in test)


def write_cub(manual, per_class=3, classes=("001.Black_footed_Albatross", "002.Laysan_Albatross",
                                            "003.Sooty_Albatross")):
  """CUB-200-2011 and Reed et al.'s text_c10 in their layout: `per_class` photos per class
  (the first of each is a test photo), 10 descriptions each, 312 attributes per class;
  returns the attribute matrix (0-100)."""
  root = manual / "CUB_200_2011"
  images, labels, split, attributes = [], [], [], []
  for c, folder in enumerate(classes, 1):
    for k in range(per_class):
      image_id = len(images) + 1
      relative = f"{folder}/{folder.split('.')[1]}_{k:04d}_{image_id}.jpg"
      fixtures.write_jpeg(str(root / "images" / relative), image_id)
      images.append(f"{image_id} {relative}")
      labels.append(f"{image_id} {c}")
      split.append(f"{image_id} {int(k > 0)}")
      text = manual / "text_c10" / relative.replace(".jpg", ".txt")
      text.parent.mkdir(parents=True, exist_ok=True)
      text.write_text("".join(f"{DIGITS[c]} {DIGITS[j]}\n" for j in range(10)))
    attributes.append(np.random.default_rng(c).uniform(0, 100, 312).round(2))
  (root / "attributes").mkdir(parents=True)
  for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                      ("train_test_split.txt", split),
                      ("classes.txt", [f"{c} {f}" for c, f in enumerate(classes, 1)]),
                      ("attributes/class_attribute_labels_continuous.txt",
                       [" ".join(f"{x:.2f}" for x in row) for row in attributes])):
    (root / name).write_text("\n".join(lines) + "\n")
  return np.array(attributes)


def test_cub200(tmp_path):
  manual = tmp_path / "files"
  attributes = write_cub(manual)
  out = build("cub200", manual, tmp_path / "tfds")
  assert {s: sorted(items) for s, items in out.items()} == {
      "train": sorted(f"{n}_{k:04d}_{3 * c + k + 1}" for c, n in enumerate(
          ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]) for k in (1, 2)),
      "test": ["Black_footed_Albatross_0000_1", "Laysan_Albatross_0000_4",
               "Sooty_Albatross_0000_7"]}
  [ex] = out["test"]["Laysan_Albatross_0000_4"]
  assert ex["label"].decode() == "Laysan Albatross"
  assert ex["text"] == [f"two {DIGITS[j]}" for j in range(10)]
  np.testing.assert_allclose(ex["attributes"], attributes[1] / 100, rtol=1e-6)
  assert ex["has_image"] and ex["has_text"] and ex["has_attributes"]


@pytest.mark.slow
def test_pcmc_paper_configs_train_on_files_in_the_real_layouts(tmp_path):
  """configs/flickr8k.py:tiny and configs/cub.py:tiny train and evaluate every pair and
  fused query (CUB's attributes by species, and zero-shot species from the photos) on
  builds of small files in the Flickr8k Audio and CUB layouts; the full configs validate."""
  from configs import cub, flickr8k  # pylint: disable=g-import-not-at-top
  for config in (flickr8k.get_config(""), flickr8k.get_config("regression"),
                 cub.get_config(""), cub.get_config("regression")):
    schema.resolve(config, jax.device_count())

  write_flickr8k_audio(tmp_path / "flickr8k")
  build("flickr8k_audio", tmp_path / "flickr8k", tmp_path / "tfds")
  write_cub(tmp_path / "cub", per_class=4)
  build("cub200", tmp_path / "cub", tmp_path / "tfds")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two compiles in parallel
    list(pool.map(lambda name: run_train([
        f"--config=configs/{name}.py:tiny", f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--workdir={tmp_path / name}"], devices=1), ("flickr8k", "cub")))
  for name in ("flickr8k", "cub"):
    last = last_of(tmp_path / name)
    assert last["step"] == 4
    modalities = ("image", "text", "audio" if name == "flickr8k" else "attributes")
    for query in modalities:
      for gallery in set(modalities) - {query}:
        assert f"test/{query}->{gallery}/R@1" in last
    fused = "audio+image->text" if name == "flickr8k" else "attributes+image->text"
    assert f"test/{fused}/R@1" in last
  # Flickr8k: 2 test images, each with 5 spoken and written captions, counted once.
  assert last_of(tmp_path / "flickr8k")["test/text->image/chance_R@1"] == pytest.approx(50.0)
  cub_last = last_of(tmp_path / "cub")
  assert cub_last["test/image->attributes/chance_R@1"] == pytest.approx(100 / 3)
  assert cub_last["test/zeroshot/image/chance_top1"] == pytest.approx(100 / 3)


def last_of(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]


def test_esc50(tmp_path):
  root = tmp_path / "files" / "ESC-50-master"  # as the repository's archive unpacks
  rows = []
  for i, (category, fold) in enumerate([("dog", 1), ("chirping_birds", 1), ("dog", 3)]):
    filename = f"{fold}-{100 + i}-A-{i}.wav"
    fixtures.write_wav(str(root / "audio" / filename), i, seconds=0.2, rate=44_100)
    rows.append([filename, fold, i, category, "True", 100 + i, "A"])
  write_csv(str(root / "meta" / "esc50.csv"),
            ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
  out = build("esc50", tmp_path / "files", tmp_path / "tfds")
  assert list(out) == ["test"]
  labels = {key: ex["label"].decode() for key, [ex] in out["test"].items()}
  assert labels == {"1-100-A-0": "dog", "1-101-A-1": "chirping birds", "3-102-A-2": "dog"}
  assert len(out["test"]["1-100-A-0"][0]["audio"]) == 3_200  # 0.2 s at 16 kHz


def test_ucf101_split1(tmp_path):
  manual = tmp_path / "files"
  lists = manual / "ucfTrainTestlist"
  lists.mkdir(parents=True)
  (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
  train, test = [], []
  for name, index in (("ApplyEyeMakeup", 1), ("YoYo", 2)):
    for group in (1, 8):
      clip = f"{name}/v_{name}_g{group:02d}_c01.avi"
      frames = np.full((4, 16, 16, 3), 40 * index + group, np.uint8)
      fixtures.write_mp4(str(manual / "UCF-101" / clip), frames)
      (test if group == 1 else train).append(clip + (f" {index}" if group == 8 else ""))
  (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
  (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
  out = build("ucf101_split1", manual, tmp_path / "tfds", video_frames=2, frame_size=16)
  assert {s: sorted(items) for s, items in out.items()} == {
      "train": ["v_ApplyEyeMakeup_g08_c01", "v_YoYo_g08_c01"],
      "test": ["v_ApplyEyeMakeup_g01_c01", "v_YoYo_g01_c01"]}
  [ex] = out["test"]["v_ApplyEyeMakeup_g01_c01"]
  assert ex["label"].decode() == "Apply Eye Makeup" and len(ex["video"]) == 2


def test_image_folder(tmp_path):
  manual = tmp_path / "files"
  for split, count in (("train", 2), ("val", 1)):
    for folder in ("n01440764", "n01443537"):
      for k in range(count):
        fixtures.write_jpeg(str(manual / split / folder / f"{folder}_{k}.JPEG"), k)
  (manual / "LOC_synset_mapping.txt").write_text(
      "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
  out = build("image_folder", manual, tmp_path / "tfds")
  assert {s: len(items) for s, items in out.items()} == {"train": 4, "validation": 2}
  assert {ex["label"].decode() for [ex] in out["validation"].values()} == {"tench", "goldfish"}
  [ex] = out["validation"]["val/n01443537/n01443537_0"]
  assert ex["label"].decode() == "goldfish" and ex["has_image"]


def test_msrvtt(tmp_path):
  manual = tmp_path / "msrvtt"
  rng = np.random.default_rng(0)
  for i in range(4):
    fixtures.write_mp4(str(manual / "videos" / "all" / f"video{i}.mp4"),
                       rng.integers(0, 256, (12, 16, 24, 3), dtype=np.uint8))
  write_csv(manual / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"]])
  write_csv(manual / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
            [["ret0", "msr7", "video2", "a test sentence"],
             ["ret1", "msr8", "video3", "another one"]])
  sentences = [{"video_id": f"video{i}", "caption": f"video {i} caption {j}", "sen_id": 3 * i + j}
               for i in range(4) for j in range(3)]
  with open(manual / "MSRVTT_data.json", "w", encoding="utf-8") as f:
    json.dump({"videos": [{"video_id": f"video{i}"} for i in range(4)],
               "sentences": sentences}, f)
  out = build("msrvtt", manual, tmp_path / "tfds", video_frames=4, frame_size=8)
  assert {s: sorted(v) for s, v in out.items()} == {"train": ["video0", "video1"],
                                                     "test": ["video2", "video3"]}
  (train,) = out["train"]["video1"]
  assert train["text"] == [f"video 1 caption {j}" for j in range(3)]  # every caption
  (test,) = out["test"]["video2"]
  assert test["text"] == ["a test sentence"]  # 1k-A: the one JSFusion sentence
  frames = np.stack([tf.io.decode_jpeg(f).numpy()
                     for f in test["video"]])
  assert frames.shape == (4, 8, 12, 3)  # 4 frames, shorter side 8


def test_audiocaps(tmp_path):
  manual = tmp_path / "audiocaps"
  header = ["audiocap_id", "youtube_id", "start_time", "caption"]
  write_csv(manual / "train.csv", header, [[1, "abc", 30, "a dog barks"],
                                           [2, "def", 0, "rain falls"]])
  write_csv(manual / "val.csv", header, [[3 + j, "ghi", 10, f"val caption {j}"]
                                         for j in range(5)])
  write_csv(manual / "test.csv", header, [[9 + j, "jkl", 20, f"test caption {j}"]
                                          for j in range(5)] + [[20, "gone", 0, "missing"]])
  samples = fixtures.write_wav(str(manual / "audio" / "train" / "abc.wav"), 1, rate=16_000)
  fixtures.write_audio(str(manual / "audio" / "train" / "Ydef.flac"), samples, 16_000, "flac")
  fixtures.write_audio(str(manual / "audio" / "val" / "ghi.mp3"), samples, 16_000, "mp3")
  fixtures.write_audio(str(manual / "audio" / "test" / "jkl_20.ogg"), samples, 16_000,
                       "libopus")
  out = build("audiocaps", manual, tmp_path / "tfds")
  assert {s: sorted(v) for s, v in out.items()} == {
      "train": ["abc", "def"], "validation": ["ghi"], "test": ["jkl"]}
  (test,) = out["test"]["jkl"]
  assert test["text"] == [f"test caption {j}" for j in range(5)]
  np.testing.assert_array_equal(out["train"]["abc"][0]["audio"], samples)  # wav: exact
  for split, key in [("train", "def"), ("validation", "ghi"), ("test", "jkl")]:
    audio = out[split][key][0]["audio"].astype(np.float64)
    assert abs(len(audio) - len(samples)) < 200
    n = min(len(audio), len(samples))
    lag = np.argmax(np.correlate(audio[:n], samples[:n].astype(np.float64), "full")) - n + 1
    assert abs(lag) < 1200, (split, lag)  # codecs delay; the waveform is the same tone
  bad = [json.loads(line) for line in
         open(os.path.join(tmp_path / "tfds", "audiocaps", "1.0.0", records.REPORT_FILE))]
  assert [(b["id"], b["reason"]) for b in bad] == [("gone", "missing audio file")]


def test_clotho(tmp_path):
  manual = tmp_path / "clotho"
  for part, names in [("development", ["a.wav", "b.wav"]), ("validation", ["c.wav"]),
                      ("evaluation", ["d e.wav"])]:
    rows = []
    for k, name in enumerate(names):
      fixtures.write_wav(str(manual / part / name), k, seconds=0.2, rate=44_100)
      rows.append([name] + [f"{name} caption {j}" for j in range(1, 6)])
    write_csv(manual / f"clotho_captions_{part}.csv",
              ["file_name"] + [f"caption_{j}" for j in range(1, 6)], rows)
  out = build("clotho", manual, tmp_path / "tfds")
  assert {s: sorted(v) for s, v in out.items()} == {
      "train": ["a.wav", "b.wav"], "validation": ["c.wav"], "test": ["d e.wav"]}
  (ex,) = out["test"]["d e.wav"]
  assert ex["text"] == [f"d e.wav caption {j}" for j in range(1, 6)]
  assert len(ex["audio"]) == 3_200  # 0.2 s of 44.1 kHz resampled to 16 kHz


@pytest.mark.slow
def test_image_text_align_fuse_trains_on_flickr30k_files(tmp_path):
  """configs/image_text.py:align_fuse (tiny towers: patches pooled to a grid for LMIM, a
  fusion encoder re-ranking) trains and evaluates on a flickr30k_karpathy build; its export
  is searched with an image file, re-ranked."""
  manual = tmp_path / "files"
  entries = []
  for i in range(12):
    fixtures.write_jpeg(str(manual / "flickr30k-images" / f"{i}.jpg"), i, size=(48, 64))
    entries.append(karpathy_entry(f"{i}.jpg", "train" if i < 8 else "test",
                                  [f"one two {i % 10}", f"three {i % 10}"], i))
  karpathy_json(manual / "dataset_flickr30k.json", entries, "flickr30k")
  data_dir = tmp_path / "tfds"
  build("flickr30k_karpathy", manual, data_dir)
  run_train(["--config=configs/image_text.py:tiny,flickr30k,align_fuse",
             f"--config.data.data_dir={data_dir}",
             "--config.modalities.text.tokenizer=digit_words",
             f"--workdir={tmp_path / 'run'}"], devices=1)
  last = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")][-1]
  assert last["step"] == 4 and "test/image->text/R@1" in last
  assert "test/image->text (rerank)/R@1" in last and "test/text->image (rerank)/R@1" in last
  # 4 test images x 2 captions: each image enters the gallery once (chance 1/4), every
  # caption is in the other gallery (chance 1 positive of 8 = 2/8 for R@1 of an image).
  assert last["test/text->image/chance_R@1"] == pytest.approx(25.0)
  assert last["test/image->text/chance_R@1"] == pytest.approx(25.0)

  # An image file as a search query, its top 4 captions re-ranked by the matching head.
  args = ["--config=configs/image_text.py:tiny,flickr30k,align_fuse",
          f"--config.data.data_dir={data_dir}", "--config.modalities.text.tokenizer=digit_words",
          f"--workdir={tmp_path / 'run'}"]
  launch = lambda name, *extra: run_launcher(name, [*args, *extra]).stdout
  launch("export.py", f"--out={tmp_path / 'export'}")
  printed = launch("search.py", f"--export={tmp_path / 'export'}", "--gallery=text",
                   f"--query-image={manual / 'flickr30k-images' / '9.jpg'}", "--rerank=4")
  first, reranked = printed.split("re-ranked by the matching head of text:image (top 5)")
  result_row = re.compile(r"\s+\d+\. \S+  score ")
  assert len([l for l in reranked.splitlines() if result_row.match(l)]) == 5
  # Each row shows its own caption: the 8 test captions, each once across the top 5 (+ 5).
  shown = [l.split("  ")[-1] for l in first.splitlines() if result_row.match(l)]
  assert len(set(shown)) == len(shown) == 5

  # The candidates' tokens, recomputed from just their items, equal a full pass's (the n-th
  # caption row of an item maps to its n-th caption).
  from configs import image_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import query  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = image_text.get_config("tiny,flickr30k,align_fuse")
  config.data.data_dir = str(data_dir)
  config.modalities.text.tokenizer = "digit_words"
  experiment = experiment_lib.setup(config, str(tmp_path / "run"), require_checkpoint=True)
  split, params = config.data.eval_split, experiment.state.params
  embedded = experiment.embedder.split(params, split, tokens=("text",))
  masks, ids, tokens = embedded.masks, embedded.ids, embedded.tokens
  rows = np.flatnonzero(masks["text"] & np.isin(ids, ids[masks["text"]][[1, -1]]))
  assert len(rows) == 4  # Two items, both captions of each.
  found = query.gallery_tokens(experiment.embedder, params, split, "text", rows[::-1], ids,
                               masks["text"])
  for row in rows:
    np.testing.assert_allclose(found[row][0], tokens["text"]["tokens"][row], atol=1e-5)
    np.testing.assert_array_equal(found[row][1], tokens["text"]["valid"][row])


def test_pcmc_paper_full_configs_count_the_published_parameters(tmp_path):
  """The full configs' models from folders holding only the published architectures'
  config.json (CLIP ViT-B/32, wav2vec 2.0 base), no weights: CLIP's 151,277,313 parameters
  (towers, both projections, logit scale; ours adds the heads' zero biases, 2 x 512), the
  wav2vec 2.0 base model's 94,371,712 less the 128 gains of its weight-normed positional
  convolution (folded into the kernel here) and its 768 x 512 head; CUB's attributes MLP
  312 -> 1024 -> 1024 -> 512 and its 512 x 512 head."""
  transformers = pytest.importorskip("transformers")
  from configs import cub, flickr8k  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment  # pylint: disable=g-import-not-at-top
  transformers.CLIPConfig().save_pretrained(tmp_path / "clip")
  transformers.Wav2Vec2Config().save_pretrained(tmp_path / "wav2vec2")
  clip_params = 151_277_313 + 2 * 512
  expected = {
      "flickr8k": clip_params + 94_371_712 - 128 + 768 * 512 + 512,
      "cub": clip_params + (312 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 512 + 512)
             + (512 * 512 + 512)}
  for name, module in (("flickr8k", flickr8k), ("cub", cub)):
    config = module.get_config("")
    schema.resolve(config, jax.device_count())
    for modality, tower in config.model.towers.items():
      if tower.name == "pretrained":
        tower.path = str(tmp_path / ("wav2vec2" if modality == "audio" else "clip"))
    config.modalities.text.tokenizer = "digit_words"  # pretrained towers keep their vocab
    state = experiment.assemble(config, read_data=False).abstract_state
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(f"configs/{name}.py: {count:,} parameters")
    assert count == expected[name], name
