"""xmodal_jax: one embedding space shared by any number of modalities."""

__version__ = "0.1.0"
