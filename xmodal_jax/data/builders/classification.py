"""Classification sets as TFDS builders over their published files, for zero-shot
classification: ESC-50 (audio), UCF101 (video, split 1) and any folder-of-classes image set
(ImageNet's included). Each item has a `label`. Built like the retrieval benchmarks:

  python -m xmodal_jax.data.build --dataset=NAME --manual_dir=FILES --data_dir=DIR
"""

import os
import re

from xmodal_jax.data import records
from xmodal_jax.data.builders import layout


class Esc50(records.RecordBuilder):
  """ESC-50 (Piczak, 2015): 2,000 five-second environmental recordings in 50 classes ("dog",
  "chirping birds", ...), all in one split, "test": zero-shot classification (CLAP,
  AudioCLIP, ImageBind) reports accuracy over all 2,000 clips. The label is the category
  with "_" as a space.

  Files: https://github.com/karolpiczak/ESC-50 (the repository's archive). Layout of
  manual_dir:
    meta/esc50.csv     columns filename, fold, target, category, ...
    audio/*.wav
  (or the same under ESC-50-master/)
  """
  MODALITIES = {"audio": "audio"}
  LABELS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def base_dir(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    nested = os.path.join(manual_dir, "ESC-50-master")
    return nested if os.path.isdir(nested) else manual_dir

  def split_records(self, dl_manager):
    root = self.base_dir(dl_manager)
    path = os.path.join(root, "meta", "esc50.csv")
    return {"test": [(f"{path}:{line_number}", {
        "id": os.path.splitext(row["filename"])[0], "split": "test",
        "audio": os.path.join(root, "audio", row["filename"]),
        "label": row["category"].replace("_", " ")}) for line_number, row in layout.read_csv(path)]}


def _words(camel_case):
  """"ApplyEyeMakeup" -> "Apply Eye Makeup" (UCF-101's class names)."""
  return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", camel_case)


class Ucf101Split1(records.RecordBuilder):
  """UCF-101 (Soomro et al., 2012): 13,320 YouTube action clips in 101 classes; train/test
  split 1 of the official three (9,537 / 3,783 clips), as zero-shot video classification
  usually reports. The label is the class name in words ("Apply Eye Makeup").

  Files: UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip from
  https://www.crcv.ucf.edu/data/UCF101.php. Layout of manual_dir:
    UCF-101/<ClassName>/v_<ClassName>_gNN_cNN.avi
    ucfTrainTestlist/classInd.txt      "<index> <ClassName>"
    ucfTrainTestlist/trainlist01.txt   "<ClassName>/<clip>.avi <index>"
    ucfTrainTestlist/testlist01.txt    "<ClassName>/<clip>.avi"
  """
  MODALITIES = {"video": "video"}
  LABELS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    lists = os.path.join(manual_dir, "ucfTrainTestlist")
    classes = {name for _, (_, name) in layout.read_table(os.path.join(lists, "classInd.txt"), 2)}
    splits = {}
    for list_name, split, columns in (("trainlist01.txt", "train", 2),
                                      ("testlist01.txt", "test", 1)):
      path = os.path.join(lists, list_name)
      items = []
      for line_number, fields in layout.read_table(path, columns):
        relative = fields[0].split()[0] if columns == 1 else fields[0]
        class_name = relative.split("/")[0]
        if class_name not in classes:
          raise ValueError(f"{path}:{line_number}: class {class_name!r} is not in "
                           "classInd.txt")
        items.append((f"{path}:{line_number}", {
            "id": os.path.splitext(os.path.basename(relative))[0], "split": split,
            "video": os.path.join(manual_dir, "UCF-101", relative),
            "label": _words(class_name)}))
      splits[split] = items
    return splits


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_FOLDER_SPLITS = {"train": "train", "val": "validation", "validation": "validation",
                  "test": "test"}


class ImageFolder(records.RecordBuilder):
  """Any image classification set as a folder per split of a folder per class (ImageNet's
  ILSVRC/Data/CLS-LOC layout once val is sorted into class folders, Caltech-101, Food-101,
  ...). A class's name is its folder's, or the first name given for that folder in
  classes.txt / LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" -> "tench").
  Layout of manual_dir:
    train/<class folder>/<image>.{jpg,jpeg,png,bmp,webp}
    val/<class folder>/...       (or validation/; test/ too)
    classes.txt                  optional: "<class folder> <name>[, other names]" per line
  """
  MODALITIES = {"image": "image"}
  LABELS = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def split_records(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    names = {}
    for mapping in ("classes.txt", "LOC_synset_mapping.txt"):
      path = os.path.join(manual_dir, mapping)
      if os.path.isfile(path):
        names = {folder: name.split(",")[0].strip()
                 for _, (folder, name) in layout.read_table(path, 2)}
        break
    splits = {}
    for folder, split in sorted(_FOLDER_SPLITS.items()):
      split_dir = os.path.join(manual_dir, folder)
      if not os.path.isdir(split_dir):
        continue
      items = splits.setdefault(split, [])
      for class_folder in sorted(os.listdir(split_dir)):
        class_dir = os.path.join(split_dir, class_folder)
        if not os.path.isdir(class_dir):
          continue
        for file in sorted(os.listdir(class_dir)):
          if os.path.splitext(file)[1].lower() in _IMAGE_EXTENSIONS:
            items.append((os.path.join(class_dir, file), {
                "id": f"{folder}/{class_folder}/{os.path.splitext(file)[0]}",
                "split": split, "image": os.path.join(class_dir, file),
                "label": names.get(class_folder, class_folder)}))
    if not splits:
      raise FileNotFoundError(f"{manual_dir}: no split folder (expected some of "
                              f"{sorted(_FOLDER_SPLITS)}, each a folder per class)")
    return splits


ADAPTERS = {cls.name: cls for cls in (Esc50, Ucf101Split1, ImageFolder)}
