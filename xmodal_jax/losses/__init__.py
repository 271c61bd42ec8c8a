"""Pure loss functions of embeddings."""

from xmodal_jax.losses.contrastive import contrastive_loss, modality_pairs  # noqa: F401
