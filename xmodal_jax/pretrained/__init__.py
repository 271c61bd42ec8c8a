"""Pretrained checkpoints: Hugging Face model folders as our towers."""

from xmodal_jax.pretrained.hf import load_hf
