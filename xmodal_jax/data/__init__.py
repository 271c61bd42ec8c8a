"""tf.data/TFDS input pipelines. The only package that imports tensorflow."""

import logging


class _TfdsOwnDtypeWarning(logging.Filter):
  """Drops TFDS's "`FeatureConnector.dtype` is deprecated" warning: TFDS's own decoder of
  bytes-encoded tensors (tensor_feature.py, the audio and features of our datasets) reads
  that property, so the warning is about TFDS's code and nothing a user can change."""

  def filter(self, record):
    return "FeatureConnector.dtype` is deprecated" not in record.getMessage()


logging.getLogger("absl").addFilter(_TfdsOwnDtypeWarning())
