"""SigLIP's two towers (SiglipTextModel, SiglipVisionModel; a SiglipModel folder holds both,
with the sigmoid loss's scale and bias). SigLIP 2 folders (model_type siglip2) are not read."""

import numpy as np

from xmodal_jax.models import vision
from xmodal_jax.pretrained.families.clip import clip_block, clip_text_params, clip_text_tower
from xmodal_jax.pretrained.weights import activation, attention, conv, dense, layer_norm


def siglip_text_tower(config, overrides):
  """CLIP's text tower without its causal mask, pooled at the last position, with SigLIP's
  text head."""
  siglip = dict(causal=False, pooling="last",
                projection_size=getattr(config, "projection_size", config.hidden_size))
  return clip_text_tower(config, siglip | overrides)


def siglip_text_params(w, tower):
  return clip_text_params(w, tower) | {"head": dense(w, "head")}


def siglip_vision_tower(config, overrides):
  if not getattr(config, "vision_use_head", True):
    raise ValueError("SigLIP vision configs without the attention-pooling head "
                     "(vision_use_head=False) are not supported")
  kwargs = dict(
      width=config.hidden_size, num_layers=config.num_hidden_layers,
      num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      image_size=(config.image_size, config.image_size), patch_size=config.patch_size,
      num_channels=config.num_channels, num_prefix_tokens=0, patch_bias=True,
      pre_norm=False, final_norm="tokens", pooler="map", pooling="pooler",
      activation=activation(config), layer_norm_eps=config.layer_norm_eps,
      attention_dropout=config.attention_dropout)
  return vision.PatchTransformer(**(kwargs | overrides))


def siglip_vision_params(w, tower):
  """torch's nn.MultiheadAttention packs the pooling head's q, k and v in one matrix."""
  packed, packed_bias = w["head.attention.in_proj_weight"], w["head.attention.in_proj_bias"]
  width = packed.shape[1]
  split = {f"{n}.weight": packed[i * width:(i + 1) * width] for i, n in enumerate("qkv")}
  split |= {f"{n}.bias": packed_bias[i * width:(i + 1) * width] for i, n in enumerate("qkv")}
  split |= {"o.weight": w["head.attention.out_proj.weight"],
            "o.bias": w["head.attention.out_proj.bias"]}
  encoder = {f"block{i}": clip_block(w, i, tower.num_heads) for i in range(tower.num_layers)}
  encoder["ln_final"] = layer_norm(w, "post_layernorm")
  return {
      "patch_embedding": conv(w, "embeddings.patch_embedding", bias=True),
      "prefix_tokens": np.zeros((1, 0, tower.width), np.float32),
      "pos_embedding": w["embeddings.position_embedding.weight"][None],
      "encoder": encoder,
      "map_head": {"probe": w["head.probe"], "attn": attention(split, "q", "k", "v", "o",
                                                               tower.num_heads),
                   "ln": layer_norm(w, "head.layernorm"),
                   "mlp": {"fc1": dense(w, "head.mlp.fc1"), "fc2": dense(w, "head.mlp.fc2")}},
  }
