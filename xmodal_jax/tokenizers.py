"""Tokenizers by name or folder, without TensorFlow: the text towers' vocabulary sizes and the
input pipeline's text ops read them from here."""

import functools
import os

# Tokenizers shipped with the package, by name; any other value is a Hugging Face folder.
SHIPPED = {"digit_words": os.path.join(os.path.dirname(__file__), "data", "builders",
                                       "digit_sequences_assets", "tokenizer")}


@functools.lru_cache(maxsize=None)
def load(name_or_path):
  """A `transformers` tokenizer from a shipped name or a local Hugging Face folder."""
  import transformers  # pylint: disable=g-import-not-at-top
  path = SHIPPED.get(name_or_path, name_or_path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"tokenizer {name_or_path!r}: no such folder (expected a Hugging Face tokenizer folder "
        f"or one of {sorted(SHIPPED)})")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
