"""The multi-modal model: one tower + projection head per modality, a shared logit scale."""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import audio, text, vision

# Towers by the name a config gives them; each maps {input name: array} -> features [B, W].
TOWERS = {
    "audio_transformer": audio.AudioTransformer,
    "video_transformer": vision.VideoTransformer,
    "text_transformer": text.TextTransformer,
}


def l2_normalize(x, eps=1e-6):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class MultiModalModel(nn.Module):
  """{modality: inputs} -> {modality: float32[B, embed_dim] L2-normalized embeddings}.

  Modalities absent from the batch are skipped. Also owns `logit_scale`, stored as its log
  (initialized to log(1/0.07) as in CLIP) and, if `logit_bias_init` is set, the sigmoid
  loss's `logit_bias` (SigLIP: -10); callers read them from the params.
  """
  towers: Mapping[str, nn.Module]
  embed_dim: int
  logit_scale_init: float = float(np.log(1 / 0.07))
  logit_bias_init: Optional[float] = None
  dtype: Any = jnp.float32

  def setup(self):
    self.heads = {m: nn.Dense(self.embed_dim, dtype=self.dtype) for m in self.towers}
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(self.logit_scale_init), ())
    if self.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.initializers.constant(self.logit_bias_init), ())

  def __call__(self, batch, *, train):
    embeddings = {}
    for modality, tower in self.towers.items():
      if modality in batch:
        features = tower(batch[modality], train=train)
        embeddings[modality] = l2_normalize(self.heads[modality](features).astype(jnp.float32))
    return embeddings


def build_model(model_config, vocab_sizes=None):
  """Builds MultiModalModel from `config.model`: {towers: {modality: {name, **kwargs}}}.

  `vocab_sizes` ({modality: int}) fills text towers' vocab_size from their tokenizers.
  """
  towers = {}
  for modality, tower_config in model_config.towers.items():
    kwargs = dict(tower_config)
    name = kwargs.pop("name")
    if name not in TOWERS:
      raise ValueError(f"config.model.towers.{modality}.name={name!r}: expected one of "
                       f"{sorted(TOWERS)}")
    if "dtype" in kwargs:
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if vocab_sizes and modality in vocab_sizes:
      kwargs["vocab_size"] = vocab_sizes[modality]
    try:
      towers[modality] = TOWERS[name](**kwargs)
    except TypeError as e:
      raise ValueError(f"config.model.towers.{modality}: {e}") from e
  return MultiModalModel(
      towers=towers, embed_dim=model_config.embed_dim,
      logit_scale_init=model_config.get("logit_scale_init", float(np.log(1 / 0.07))),
      logit_bias_init=model_config.get("logit_bias_init", None))
