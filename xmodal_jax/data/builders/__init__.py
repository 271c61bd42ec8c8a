"""TFDS builders: the embedded default dataset and adapters for real datasets."""
