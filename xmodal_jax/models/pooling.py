"""Pooling a set of token features [B, L, W] into one vector [B, W]."""

import jax.numpy as jnp

POOLINGS = ("cls", "mean")


def pool(x, valid, kind):
  """`cls`: the first token; `mean`: the mean over valid tokens, [CLS] excluded."""
  if kind == "cls":
    return x[:, 0]
  if kind == "mean":
    tokens = x[:, 1:]
    weights = (jnp.ones(tokens.shape[:2], x.dtype) if valid is None
               else valid[:, 1:].astype(x.dtype))
    total = jnp.einsum("blw,bl->bw", tokens, weights)
    return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
  raise ValueError(f"pooling={kind!r}: expected one of {POOLINGS}")
