"""xmodal_jax: one embedding space shared by any number of modalities."""

import logging
import os

__version__ = "0.1.0"


def _order_cpu_collectives():
  """Turns off XLA:CPU's concurrency-optimized scheduler unless XLA_FLAGS sets it. With it,
  simulated CPU devices can start two independent collectives in different orders and wait
  on each other for ever (seen with gradient caching under FSDP: XLA aborts after 40 s).
  Only the CPU backend reads the flag; it must be set before JAX starts a backend."""
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()


_order_cpu_collectives()


def _skip_keras():
  """TensorFlow here only reads data, but its import loads Keras 3 eagerly, and Keras loads
  scikit-learn: 2 s of every process's start (a launcher's 8). Asking TensorFlow for the
  legacy Keras package, which is not installed, makes it skip that load; tf.keras is then
  unavailable. A value the user set is kept. Must run before TensorFlow is imported."""
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


_skip_keras()


class _DropMessage(logging.Filter):
  """Drops a library's log records that contain `text`."""

  def __init__(self, text):
    super().__init__()
    self.text = text

  def filter(self, record):
    return self.text not in record.getMessage()


# Messages about the libraries' own code, nothing a user can act on: TFDS's decoder of
# bytes-encoded tensors (our audio and features) reads its own deprecated property; TFDS
# warns that a dataset's version folder has no dataset_info.json when asked whether a
# dataset not built yet is prepared (the first run on a machine, before "Building the
# embedded dataset"); and transformers announces at import that it has no PyTorch, which
# only its models need (we use its tokenizers and configs).
logging.getLogger("absl").addFilter(_DropMessage("FeatureConnector.dtype` is deprecated"))
logging.getLogger("absl").addFilter(_DropMessage("has no dataset_info.json"))
logging.getLogger("transformers").addFilter(_DropMessage("PyTorch was not found"))
