"""Pretrained checkpoints: Hugging Face model folders as our towers."""

from xmodal_jax.pretrained.hf import Loader, load_hf  # noqa: F401
