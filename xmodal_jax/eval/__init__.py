"""Retrieval evaluation."""

from xmodal_jax.eval.retrieval import retrieval_metrics  # noqa: F401
