"""ViT (ViTModel) and the Audio Spectrogram Transformer, which shares its blocks."""

import numpy as np

from xmodal_jax.models import audio, vision
from xmodal_jax.pretrained.weights import (activation, block, conv, dense,
                                           feature_extractor_options, layer_norm)

# Older transformers wrote ViT/AST blocks under these names; transformers 5 writes the right.
LEGACY_VIT_NAMES = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
]


def vit_block(w, i, num_heads):
  name = f"layers.{i}."
  return block(w, num_heads, {
      "attn": [name + f"attention.{n}_proj" for n in ("q", "k", "v", "o")],
      "ln_attn": name + "layernorm_before", "fc1": name + "mlp.fc1", "fc2": name + "mlp.fc2",
      "ln_mlp": name + "layernorm_after"})


def vit_common(config):
  return dict(width=config.hidden_size, num_layers=config.num_hidden_layers,
              num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
              patch_size=config.patch_size, activation=activation(config),
              layer_norm_eps=config.layer_norm_eps, dropout=config.hidden_dropout_prob,
              attention_dropout=config.attention_probs_dropout_prob)


def vit_tower(config, overrides, weights):
  size = config.image_size
  kwargs = vit_common(config) | dict(
      image_size=(size, size) if isinstance(size, int) else tuple(size),
      num_channels=config.num_channels)
  if "pooler.dense.weight" not in weights:  # Saved with add_pooling_layer=False.
    kwargs["pooling"] = "cls"
  return vision.PatchTransformer(**(kwargs | overrides))


def vit_params(w, tower, prefix_names=("embeddings.cls_token",)):
  encoder = {f"block{i}": vit_block(w, i, tower.num_heads) for i in range(tower.num_layers)}
  encoder["ln_final"] = layer_norm(w, "layernorm")
  params = {
      "patch_embedding": conv(w, "embeddings.patch_embeddings.projection", bias=True),
      "prefix_tokens": np.concatenate([w[n] for n in prefix_names], axis=1),
      "pos_embedding": w["embeddings.position_embeddings"],
      "encoder": encoder,
  }
  if tower.pooling == "pooler" and tower.pooler == "dense_tanh":
    params["pooler"] = dense(w, "pooler.dense")
  return params


def ast_tower(config, overrides, path):
  kwargs = vit_common(config) | dict(
      num_mels=config.num_mel_bins, max_frames=config.max_length,
      patch_stride=(config.frequency_stride, config.time_stride))
  features = feature_extractor_options(path)
  kwargs.update(sample_rate=features.get("sampling_rate", 16000),
                mean=features.get("mean", -4.2677393), std=features.get("std", 4.5689974))
  return audio.SpectrogramTransformer(**(kwargs | overrides))


def ast_params(w, tower):
  return vit_params(w, tower, ("embeddings.cls_token", "embeddings.distillation_token"))
