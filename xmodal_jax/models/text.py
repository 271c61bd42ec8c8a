"""Text towers: a small from-scratch transformer, the BERT family, and CLIP's text transformer.

Each maps {"input_ids": int[B, L], "attention_mask": int[B, L]} to `transformer.tower_output`.
"""

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models import transformer


class TextTransformer(transformer.TrunkOptions, kw_only=True):
  """Token embeddings -> TokenEncoder (own [CLS], learned positions, pre-LN)."""
  vocab_size: int
  width: int

  @nn.compact
  def __call__(self, inputs, *, train):
    tokens = nn.Embed(self.vocab_size, self.width, name="token_embedding")(inputs["input_ids"])
    return self.trunk()(tokens, inputs["attention_mask"].astype(bool), train=train)


def embed(num, width, name):
  return nn.Embed(num, width, embedding_init=nn.initializers.normal(0.02), name=name)


class BertTextEncoder(transformer.TrunkOptions, kw_only=True):
  """BERT, RoBERTa and MiniLM as Hugging Face's BertModel / RobertaModel compute them.

  Word + position + token-type embeddings, LayerNorm, post-LN blocks. `pooling="pooler"`
  is BERT's pooled output (tanh(Dense([CLS]))); "mean" averages every valid token, [CLS] and
  [SEP] included (sentence-transformers' mean pooling); "cls" and "gpo" as elsewhere.
  RoBERTa numbers positions from pad_token_id + 1 over non-pad tokens
  (`positions_after_padding_id=True`).
  """
  vocab_size: int
  width: int
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  positions_after_padding_id: bool = False
  layer_norm_eps: float = 1e-12
  pooling: str = "pooler"

  @nn.compact
  def __call__(self, inputs, *, train):
    ids = inputs["input_ids"]
    valid = inputs["attention_mask"].astype(bool)
    if self.positions_after_padding_id:
      not_pad = (ids != self.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
    else:
      positions = jnp.arange(ids.shape[1])[None]
    token_types = inputs.get("token_type_ids", jnp.zeros_like(ids))
    x = (embed(self.vocab_size, self.width, "word_embeddings")(ids)
         + embed(self.max_positions, self.width, "position_embeddings")(positions)
         + embed(self.type_vocab_size, self.width, "token_type_embeddings")(token_types))
    x = nn.LayerNorm(self.layer_norm_eps, name="embeddings_ln")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x).astype(self.dtype)
    x = self.encoder(norm="post", final_norm=False)(x, valid, train=train)
    if self.pooling == "pooler":
      pooled = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name="pooler")(x[:, 0]))
    else:
      pooled = self.pool(x, valid, train=train, num_prefix_tokens=0)
    return transformer.tower_output(pooled, x, valid)


class CausalTextEncoder(transformer.TrunkOptions, kw_only=True):
  """CLIP's text transformer as Hugging Face's CLIPTextModel computes it, and SigLIP's.

  Token + position embeddings, causal pre-LN blocks, a final LayerNorm. `pooling="eos"` takes
  the end-of-text token: the first `eos_token_id` in each sequence, or (old CLIP configs with
  eos_token_id=2) the highest token id, as transformers does. SigLIP's (SiglipTextModel):
  `causal=False`, `pooling="last"` (the last position, padding or not) and its Dense head
  `projection_size` wide on the pooled vector.
  """
  vocab_size: int
  width: int
  max_positions: int = 77
  eos_token_id: int = 2
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pooling: str = "eos"
  causal: bool = True
  projection_size: int = 0  # > 0: a Dense "head" on the pooled vector (SigLIP)

  @nn.compact
  def __call__(self, inputs, *, train):
    ids = inputs["input_ids"]
    valid = inputs["attention_mask"].astype(bool)
    x = (embed(self.vocab_size, self.width, "token_embedding")(ids)
         + embed(self.max_positions, self.width, "position_embedding")(
             jnp.arange(ids.shape[1])[None]))
    x = nn.Dropout(self.dropout, deterministic=not train)(x).astype(self.dtype)
    x = self.encoder(causal=self.causal)(x, valid, train=train)
    if self.pooling == "eos":
      end = ids if self.eos_token_id == 2 else (ids == self.eos_token_id).astype(jnp.int32)
      pooled = jnp.take_along_axis(x, jnp.argmax(end, axis=1)[:, None, None], axis=1)[:, 0]
    elif self.pooling == "last":
      pooled = x[:, -1]
    else:
      pooled = self.pool(x, valid, train=train, num_prefix_tokens=0)
    if self.projection_size:
      pooled = nn.Dense(self.projection_size, dtype=self.dtype, name="head")(pooled)
    return transformer.tower_output(pooled, x, valid)
