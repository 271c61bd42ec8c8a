"""Pooling token features [B, L, W]: into one vector [B, W] (cls, mean or GPO), or into a few
local features [B, K, W] (runs of tokens, or a grid of patch cells) for LMIM."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POOLINGS = ("cls", "mean", "gpo")


def masked_mean(tokens, valid):
  weights = valid.astype(tokens.dtype)
  total = jnp.einsum("blw,bl->bw", tokens, weights)
  return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


def positional_encoding(length, dim):
  """Sinusoidal encodings of positions 0..length-1: float32[length, dim]."""
  position = np.arange(length)[:, None]
  frequency = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
  encoding = np.zeros((length, dim), np.float32)
  encoding[:, 0::2] = np.sin(position * frequency)
  encoding[:, 1::2] = np.cos(position * frequency)
  return encoding


def sort_descending(features, valid):
  """Sorts each feature dimension over the set, largest first; padding goes last as 0."""
  lowest = jnp.finfo(features.dtype).min
  masked = jnp.where(valid[..., None], features, lowest)
  ordered = -jnp.sort(-masked, axis=1)
  count = valid.sum(axis=1)
  keep = jnp.arange(features.shape[1])[None, :] < count[:, None]
  return jnp.where(keep[..., None], ordered, 0.0)


class GPO(nn.Module):
  """Generalized pooling operator (VSE-infinity): learned weights over sorted features.

  Weights depend only on position k and set size n: sinusoidal encodings of 0..n-1 go through
  a bidirectional GRU (outputs averaged), a bias-free linear score, softmax(score /
  temperature) over the n valid positions. Each feature dimension is sorted in descending
  order over the valid elements and the pooled value is sum_k weight_k * sorted_k, so GPO can
  learn mean, max, top-k or mixtures. `drop_rate` drops set elements at random in training
  (at least one kept) so that GPO sees many set sizes.
  """
  encoding_dim: int = 32
  hidden_dim: int = 32
  temperature: float = 0.1
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, features, valid, *, train):
    batch, length, _ = features.shape
    if train and self.drop_rate > 0:
      keep = jax.random.uniform(self.make_rng("dropout"), valid.shape) >= self.drop_rate
      first = jnp.argmax(valid, axis=1)  # Never drop every element.
      keep = keep | (jnp.arange(length)[None, :] == first[:, None])
      valid = valid & keep
      order = jnp.argsort(~valid, axis=1, stable=True)  # Survivors first, in order.
      features = jnp.take_along_axis(features, order[..., None], axis=1)
      valid = jnp.take_along_axis(valid, order, axis=1)
    lengths = valid.sum(axis=1)
    encoding = jnp.broadcast_to(positional_encoding(length, self.encoding_dim),
                                (batch, length, self.encoding_dim))
    rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(self.hidden_dim), name="forward"),
                           nn.RNN(nn.GRUCell(self.hidden_dim), name="backward"),
                           merge_fn=lambda a, b: (a + b) / 2, name="gru")
    hidden = rnn(encoding, seq_lengths=lengths)
    scores = nn.Dense(1, use_bias=False, name="score")(hidden)[..., 0]
    scores = jnp.where(valid, scores / self.temperature, -1e9)
    weights = jax.nn.softmax(scores, axis=1) * valid
    return jnp.einsum("bl,blw->bw", weights.astype(features.dtype),
                      sort_descending(features, valid)), weights


class Pool(nn.Module):
  """Pools tokens [B, L, W] into [B, W].

  `cls`: token 0; `mean`: mean of the valid tokens after the first `num_prefix_tokens` ([CLS]
  and the like); `gpo`: GPO over those. BERT-style inputs, whose [CLS] is a text token, pass
  num_prefix_tokens=0 so mean pooling covers every valid token as sentence-transformers does.
  """
  kind: str = "cls"
  gpo_drop_rate: float = 0.0
  num_prefix_tokens: int = 1

  @nn.compact
  def __call__(self, x, valid, *, train):
    if self.kind not in POOLINGS:
      raise ValueError(f"pooling={self.kind!r}: expected one of {POOLINGS}")
    if self.kind == "cls":
      return x[:, 0]
    tokens = x[:, self.num_prefix_tokens:]
    valid = (jnp.ones(tokens.shape[:2], bool) if valid is None
             else valid[:, self.num_prefix_tokens:].astype(bool))
    if self.kind == "mean":
      return masked_mean(tokens, valid)
    return GPO(drop_rate=self.gpo_drop_rate, name="gpo")(tokens, valid, train=train)[0]


def pool_locals(tokens, valid, max_locals):
  """[B, L, W] tokens -> at most `max_locals` local features: the valid-weighted mean over
  `max_locals` equal runs of positions (patches in raster order, frames, text tokens), valid
  where a run has a valid token. Shorter sequences are returned as they are."""
  length = tokens.shape[1]
  if length <= max_locals:
    return tokens, valid
  segment = jnp.minimum(jnp.arange(length) * max_locals // length, max_locals - 1)
  assign = (segment[None, :] == jnp.arange(max_locals)[:, None]) & valid[:, None, :]  # [B,K,L]
  weights = assign / jnp.maximum(assign.sum(-1, keepdims=True), 1)
  return jnp.einsum("bkl,blw->bkw", weights.astype(tokens.dtype), tokens), assign.any(-1)


def pool_grid(tokens, num_prefix, rows, cols, side):
  """Patch tokens [B, prefix + rows*cols, W] (raster order) -> the means over a side x side
  grid of cells (cell r covers patch rows r*rows//side .. (r+1)*rows//side - 1): [B, side^2,
  W], all valid. Grids smaller than `side` keep their patches."""
  patches = tokens[:, num_prefix:].reshape(tokens.shape[0], rows, cols, tokens.shape[-1])
  if rows <= side and cols <= side:
    out = patches.reshape(tokens.shape[0], rows * cols, -1)
    return out, jnp.ones(out.shape[:2], bool)

  def cells(n):
    assign = (jnp.arange(n)[None, :] * side // n) == jnp.arange(side)[:, None]  # [side, n]
    return assign / assign.sum(axis=1, keepdims=True)
  pooled = jnp.einsum("bhwc,sh,tw->bstc", patches, cells(rows).astype(tokens.dtype),
                      cells(cols).astype(tokens.dtype))
  out = pooled.reshape(tokens.shape[0], side * side, -1)
  return out, jnp.ones(out.shape[:2], bool)
