"""Pure loss functions of embeddings, shard-aware through parallel/streaming.py, and the
table of training objectives by name (objectives.py)."""

from xmodal_jax.losses.contrastive import contrastive_loss  # noqa: F401
from xmodal_jax.losses.pairs import modality_pairs  # noqa: F401
from xmodal_jax.losses.regression import similarity_regression_loss  # noqa: F401
