"""Text: token embeddings through a transformer, padding masked out."""


import flax.linen as nn

from xmodal_jax.models import transformer


class TextTransformer(transformer.TrunkOptions, kw_only=True):
  """{"input_ids": int[B, L], "attention_mask": int[B, L]} -> TokenEncoder features [B, W]."""
  vocab_size: int
  width: int

  @nn.compact
  def __call__(self, inputs, *, train):
    tokens = nn.Embed(self.vocab_size, self.width, name="token_embedding")(inputs["input_ids"])
    return self.trunk()(tokens, inputs["attention_mask"].astype(bool), train=train)
