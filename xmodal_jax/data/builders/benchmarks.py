"""The standard retrieval benchmarks as TFDS builders over their published files.

None can be downloaded here: each reads a `manual_dir` holding the files as their
publishers distribute them (layouts in each class's docstring) and is built with

  python -m xmodal_jax.data.build --dataset=NAME --manual_dir=FILES --data_dir=DIR

Items carry the features of `records.RecordBuilder` (masks, first-occurrence flags). Split
names are TFDS's: train, validation, test. Captions of one item are one text value (a list),
expanded into separate queries at evaluation (docs/methods.md, "Retrieval metrics").
"""

import glob
import os

from xmodal_jax.data import records
from xmodal_jax.data.builders import classification, layout

_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def karpathy_records(manual_dir, json_name, image_dir_names):
  """{split: [(where, {id, split, image, text})]} from a Karpathy split JSON; "restval"
  joins train, as in the papers that report on these splits."""
  path = os.path.join(manual_dir, json_name)
  images = layout.read_json(path)["images"]
  image_dir = (layout.find_dir(manual_dir, image_dir_names, "image") if image_dir_names
               else manual_dir)
  splits = {}
  for i, entry in enumerate(images):
    split = _SPLITS.get(entry["split"])
    if split is None:
      raise ValueError(f"{path}: images[{i}] has split {entry['split']!r}; expected one of "
                       f"{sorted(_SPLITS)}")
    folder = os.path.join(image_dir, entry.get("filepath", ""))
    record = {"id": os.path.splitext(entry["filename"])[0], "split": split,
              "image": os.path.join(folder, entry["filename"]),
              "text": [s["raw"].strip() for s in entry["sentences"]]}
    splits.setdefault(split, []).append((f"{path}:images[{i}]", record))
  return splits


class CocoKarpathy(records.RecordBuilder):
  """COCO Captions (2014 images) with Karpathy's 113k/5k/5k split (113,287 train images
  with restval, 5,000 validation, 5,000 test; about 5 captions each).

  Files: the 2014 images from https://cocodataset.org/#download (train2014.zip,
  val2014.zip) and Karpathy's dataset_coco.json (caption_datasets.zip from
  https://cs.stanford.edu/people/karpathy/deepimagesent/). Layout of manual_dir:
    dataset_coco.json
    train2014/COCO_train2014_*.jpg
    val2014/COCO_val2014_*.jpg
  """
  MODALITIES = {"image": "image", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    return karpathy_records(dl_manager.manual_dir, "dataset_coco.json", None)


class Flickr30kKarpathy(records.RecordBuilder):
  """Flickr30K with Karpathy's 29k/1k/1k split (5 captions per image).

  Files: the images from https://shannon.cs.illinois.edu/DenotationGraph/ (a form gives
  flickr30k-images.tar.gz) and Karpathy's dataset_flickr30k.json (caption_datasets.zip,
  https://cs.stanford.edu/people/karpathy/deepimagesent/). Layout of manual_dir:
    dataset_flickr30k.json
    flickr30k-images/*.jpg
  """
  MODALITIES = {"image": "image", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    return karpathy_records(dl_manager.manual_dir, "dataset_flickr30k.json",
                            ("flickr30k-images", "images", "Images"))


_FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")


class Flickr8kKarpathy(records.RecordBuilder):
  """Flickr8k with Karpathy's 6k/1k/1k split (5 captions per image).

  Files: Flickr8k_Dataset.zip (the official archive unpacks to "Flicker8k_Dataset", sic)
  from the University of Illinois' request form, and Karpathy's dataset_flickr8k.json
  (caption_datasets.zip). Layout of manual_dir:
    dataset_flickr8k.json
    Flicker8k_Dataset/*.jpg      (or Flickr8k_Dataset/ or Images/)
  """
  MODALITIES = {"image": "image", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    return karpathy_records(dl_manager.manual_dir, "dataset_flickr8k.json",
                            _FLICKR8K_IMAGE_DIRS)


class Flickr8kAudio(records.RecordBuilder):
  """The Flickr8k Audio Caption Corpus (Harwath and Glass, 2015): 40,000 spoken captions,
  one per Flickr8k caption, with the image and the written caption; Karpathy's split.

  One example per spoken caption (id = the image), so an image appears up to 5 times in
  training and is counted once at evaluation (first_image). Files: flickr_audio.tar.gz from
  https://groups.csail.mit.edu/sls/downloads/flickraudio/ plus the Flickr8k files of
  `flickr8k_karpathy`. Layout of manual_dir:
    dataset_flickr8k.json
    Flicker8k_Dataset/*.jpg
    flickr_audio/wav2capt.txt    lines "<wav> <image file> #<caption index>"
    flickr_audio/wavs/*.wav
  """
  MODALITIES = {"image": "image", "audio": "audio", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    by_image = {}
    for split, items in karpathy_records(manual_dir, "dataset_flickr8k.json",
                                         _FLICKR8K_IMAGE_DIRS).items():
      for where, record in items:
        by_image[record["id"]] = (where, record)
    index = os.path.join(manual_dir, "flickr_audio", "wav2capt.txt")
    if not os.path.isfile(index):
      raise FileNotFoundError(f"{index}: missing (see the builder's docstring)")
    splits = {}
    with open(index, encoding="utf-8") as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("#"):
          raise ValueError(f"{index}:{line_number}: expected '<wav> <image> #<n>', got "
                           f"{line.strip()!r}")
        wav, image, caption_index = parts[0], parts[1], int(parts[2][1:])
        image_id = os.path.splitext(image)[0]
        if image_id not in by_image:
          raise ValueError(f"{index}:{line_number}: image {image} is not in "
                           "dataset_flickr8k.json")
        _, item = by_image[image_id]
        captions = item["text"]
        record = dict(item, audio=os.path.join(manual_dir, "flickr_audio", "wavs", wav),
                      text=captions[caption_index] if caption_index < len(captions) else "")
        splits.setdefault(item["split"], []).append((f"{index}:{line_number}", record))
    return splits


class Msrvtt(records.RecordBuilder):
  """MSR-VTT with the 9k training videos (all 20 captions each) and the 1k-A test set (one
  caption per video, Yu et al. 2018 "JSFusion"), as CLIP4Clip and most papers report.

  Files: the videos (MSRVTT.zip) and msrvtt_data.zip (MSRVTT_train.9k.csv,
  MSRVTT_JSFUSION_test.csv, MSRVTT_data.json), e.g. from CLIP4Clip's README
  (https://github.com/ArrowLuo/CLIP4Clip#data-preparing). Layout of manual_dir:
    MSRVTT_train.9k.csv          column video_id
    MSRVTT_JSFUSION_test.csv     columns key, vid_key, video_id, sentence
    MSRVTT_data.json             {"sentences": [{"video_id", "caption", ...}], ...}
    videos/all/video*.mp4        (or videos/ or MSRVTT_Videos/)
  """
  MODALITIES = {"video": "video", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    video_dir = layout.find_dir(manual_dir, ("videos/all", "videos", "MSRVTT_Videos"), "video")
    data_path = os.path.join(manual_dir, "MSRVTT_data.json")
    captions = {}
    for sentence in layout.read_json(data_path)["sentences"]:
      captions.setdefault(sentence["video_id"], []).append(sentence["caption"].strip())
    train_path = os.path.join(manual_dir, "MSRVTT_train.9k.csv")
    splits = {"train": [], "test": []}
    for line_number, row in layout.read_csv(train_path):
      video_id = row["video_id"]
      splits["train"].append((f"{train_path}:{line_number}", {
          "id": video_id, "split": "train",
          "video": os.path.join(video_dir, f"{video_id}.mp4"),
          "text": captions.get(video_id, [""])}))
    test_path = os.path.join(manual_dir, "MSRVTT_JSFUSION_test.csv")
    for line_number, row in layout.read_csv(test_path):
      video_id = row["video_id"]
      splits["test"].append((f"{test_path}:{line_number}", {
          "id": video_id, "split": "test",
          "video": os.path.join(video_dir, f"{video_id}.mp4"), "text": [row["sentence"]]}))
    return splits


_AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class Audiocaps(records.RecordBuilder):
  """AudioCaps (Kim et al. 2019): 10 s AudioSet clips with 1 (train) or 5 (val, test)
  captions; one item per clip.

  The CSVs are at https://github.com/cdjkim/audiocaps (dataset/{train,val,test}.csv,
  columns audiocap_id, youtube_id, start_time, caption). The audio must be fetched from
  YouTube by the user (many clips have gone; a missing file is reported as a bad record).
  Layout of manual_dir:
    train.csv  val.csv  test.csv
    audio/{train,val,test}/<youtube_id>.<wav|flac|ogg|mp3>   (a "Y" prefix or a
                                                              "_<start_time>" suffix is
                                                              also found)
  """
  MODALITIES = {"audio": "audio", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    splits = {}
    for csv_name, split in (("train", "train"), ("val", "validation"), ("test", "test")):
      path = os.path.join(manual_dir, f"{csv_name}.csv")
      clips = {}
      for line_number, row in layout.read_csv(path):
        youtube_id = row["youtube_id"]
        if youtube_id not in clips:
          clips[youtube_id] = (f"{path}:{line_number}", {
              "id": youtube_id, "split": split,
              "audio": _audiocaps_file(manual_dir, csv_name, youtube_id, row["start_time"]),
              "text": []})
        clips[youtube_id][1]["text"].append(row["caption"].strip())
      splits[split] = list(clips.values())
    return splits


def _audiocaps_file(manual_dir, csv_name, youtube_id, start_time):
  folder = os.path.join(manual_dir, "audio", csv_name)
  for stem in (youtube_id, f"Y{youtube_id}", f"{youtube_id}_{start_time}"):
    for extension in _AUDIO_EXTENSIONS:
      path = os.path.join(folder, stem + extension)
      if os.path.isfile(path):
        return path
  matches = sorted(glob.glob(os.path.join(glob.escape(folder), f"*{glob.escape(youtube_id)}*")))
  return matches[0] if matches else os.path.join(folder, youtube_id + ".wav")


class Clotho(records.RecordBuilder):
  """Clotho v2 (Drossos et al. 2020): 15-30 s Freesound clips with 5 captions each;
  development -> train, validation -> validation, evaluation -> test.

  Files: https://zenodo.org/records/4783391 (clotho_audio_{development,validation,
  evaluation}.7z and clotho_captions_*.csv). Layout of manual_dir:
    clotho_captions_development.csv    columns file_name, caption_1 ... caption_5
    clotho_captions_validation.csv
    clotho_captions_evaluation.csv
    development/*.wav  validation/*.wav  evaluation/*.wav
  """
  MODALITIES = {"audio": "audio", "text": "text"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    splits = {}
    for part, split in (("development", "train"), ("validation", "validation"),
                        ("evaluation", "test")):
      path = os.path.join(manual_dir, f"clotho_captions_{part}.csv")
      items = []
      for line_number, row in layout.read_csv(path):
        captions = [row[k].strip() for k in sorted(row) if k.startswith("caption_")]
        items.append((f"{path}:{line_number}", {
            "id": row["file_name"], "split": split,
            "audio": os.path.join(manual_dir, part, row["file_name"]), "text": captions}))
      splits[split] = items
    return splits


CUB_ATTRIBUTES = 312


class Cub200(records.RecordBuilder):
  """CUB-200-2011 (Wah et al., 2011): 11,788 photos of 200 bird species, each with the 10
  descriptions of Reed et al. (2016) and its species' 312 attributes (the share of its
  photos annotators marked with each, 0-1) as a class embedding: PCMC's image / text /
  class-embedding experiment. Split: the dataset's own train_test_split.txt (5,994 / 5,794
  images); "label" is the species ("Black footed Albatross"), for zero-shot classification.

  Files: CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) and Reed
  et al.'s cvpr2016_cub.tar.gz (https://github.com/reedscot/cvpr2016), whose text_c10/
  folder holds the descriptions. Layout of manual_dir:
    CUB_200_2011/images.txt                 "<image id> <class folder>/<file>.jpg"
    CUB_200_2011/image_class_labels.txt     "<image id> <class id>"
    CUB_200_2011/train_test_split.txt       "<image id> <1: train, 0: test>"
    CUB_200_2011/classes.txt                "<class id> <nnn.Class_Name>"
    CUB_200_2011/attributes/class_attribute_labels_continuous.txt   200 lines x 312 (0-100)
    CUB_200_2011/images/<class folder>/<file>.jpg
    text_c10/<class folder>/<file>.txt      10 descriptions, one per line (or text/)
  """
  MODALITIES = {"image": "image", "text": "text", "attributes": "features"}
  FEATURE_SHAPES = {"attributes": (CUB_ATTRIBUTES,)}
  LABELS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    root = os.path.join(manual_dir, "CUB_200_2011")
    text_dir = layout.find_dir(manual_dir, ("text_c10", "text"), "descriptions")
    table = lambda name, columns: layout.read_table(os.path.join(root, name), columns)
    class_names = {c: name.split(".", 1)[-1].replace("_", " ")
                   for _, (c, name) in table("classes.txt", 2)}
    attributes_path = os.path.join(root, "attributes", "class_attribute_labels_continuous.txt")
    attributes = {}
    for line_number, fields in layout.read_table(attributes_path, 1):
      values = fields[0].split()
      if len(values) != CUB_ATTRIBUTES:
        raise ValueError(f"{attributes_path}:{line_number}: expected {CUB_ATTRIBUTES} "
                         f"values, got {len(values)}")
      attributes[str(len(attributes) + 1)] = [float(x) / 100 for x in values]
    label_of = dict(fields for _, fields in table("image_class_labels.txt", 2))
    split_path = os.path.join(root, "train_test_split.txt")
    split_of = {i: flag for _, (i, flag) in table("train_test_split.txt", 2)}
    splits = {}
    images_path = os.path.join(root, "images.txt")
    for line_number, (image_id, relative) in table("images.txt", 2):
      where = f"{images_path}:{line_number}"
      if image_id not in label_of or split_of.get(image_id) not in ("0", "1"):
        raise ValueError(f"{where}: image {image_id} has no class in image_class_labels.txt "
                         f"or no 0/1 flag in {split_path}")
      label = label_of[image_id]
      record = {"id": os.path.splitext(os.path.basename(relative))[0],
                "split": "train" if split_of[image_id] == "1" else "test",
                "image": os.path.join(root, "images", relative),
                "text": _descriptions(text_dir, relative),
                "attributes": attributes.get(label), "label": class_names.get(label)}
      splits.setdefault(record["split"], []).append((where, record))
    return splits


def _descriptions(text_dir, image_relative):
  """The non-empty lines of an image's description file, or None when it has none."""
  path = os.path.join(text_dir, os.path.splitext(image_relative)[0] + ".txt")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()] or None


# --- Classification sets, for zero-shot evaluation (items with a "label") --------------------


ADAPTERS = {cls.name: cls for cls in (CocoKarpathy, Flickr30kKarpathy, Flickr8kKarpathy,
                                      Flickr8kAudio, Msrvtt, Audiocaps, Clotho, Cub200)}
ADAPTERS |= classification.ADAPTERS
