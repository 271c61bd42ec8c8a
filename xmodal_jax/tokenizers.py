"""Tokenizers by name or folder, without TensorFlow: the text towers' vocabulary sizes and the
input pipeline's text ops read them from here."""

import functools
import json
import os

# Tokenizers shipped with the package, by name; any other value is a Hugging Face folder.
SHIPPED = {"digit_words": os.path.join(os.path.dirname(__file__), "data", "builders",
                                       "digit_sequences_assets", "tokenizer")}


# tokenizer_config.json's class of a plain tokenizer.json, which needs no model code.
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


@functools.lru_cache(maxsize=None)
def load(name_or_path):
  """A `transformers` tokenizer from a shipped name or a local Hugging Face folder. A folder
  whose config names the generic class is read by that class: AutoTokenizer would import
  the model configuration code, and with it PyTorch where installed (2 s a process)."""
  import transformers  # pylint: disable=g-import-not-at-top
  path = SHIPPED.get(name_or_path, name_or_path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"tokenizer {name_or_path!r}: no such folder (expected a Hugging Face tokenizer folder "
        f"or one of {sorted(SHIPPED)})")
  config_path = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      if json.load(f).get("tokenizer_class") in GENERIC_CLASSES:
        return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve(config, *, required=True):
  """Each text modality without a `tokenizer` takes its pretrained tower's folder (a Hugging
  Face model folder holds its tokenizer). Unless `required` (compiling without data needs
  only the vocabulary size), a tower that states its vocab_size may go without one."""
  for name, modality in config.modalities.items():
    if modality.kind != "text" or modality.tokenizer:
      continue
    tower = config.model.towers[name]
    if tower.get("name") == "pretrained":
      modality.tokenizer = tower.path
    elif required or not tower.get("vocab_size"):
      raise ValueError(f"config.modalities.{name}.tokenizer is unset and its tower is not "
                       "pretrained: name a tokenizer (a shipped name or a Hugging Face folder)")
