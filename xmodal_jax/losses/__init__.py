"""Pure loss functions of embeddings, shard-aware through parallel/streaming.py."""

from xmodal_jax.losses.contrastive import contrastive_loss, modality_pairs  # noqa: F401
from xmodal_jax.losses.regression import similarity_regression_loss  # noqa: F401
