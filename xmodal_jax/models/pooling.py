"""Pooling a set of token features [B, L, W] into one vector [B, W]: cls, mean or GPO."""

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
