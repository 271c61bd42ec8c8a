"""CLIP's two towers (CLIPTextModel, CLIPVisionModel; a CLIPModel folder holds both)."""

from xmodal_jax.models import text, vision
from xmodal_jax.pretrained.weights import activation, block, conv, embedding, layer_norm


def clip_block(w, i, num_heads):
  name = f"encoder.layers.{i}."
  return block(w, num_heads, {
      "attn": [name + f"self_attn.{n}_proj" for n in ("q", "k", "v", "out")],
      "ln_attn": name + "layer_norm1", "fc1": name + "mlp.fc1", "fc2": name + "mlp.fc2",
      "ln_mlp": name + "layer_norm2"})


def clip_text_tower(config, overrides):
  kwargs = dict(
      vocab_size=config.vocab_size, width=config.hidden_size,
      num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
      mlp_dim=config.intermediate_size, max_positions=config.max_position_embeddings,
      eos_token_id=config.eos_token_id, activation=activation(config),
      layer_norm_eps=config.layer_norm_eps, dropout=getattr(config, "dropout", 0.0) or 0.0,
      attention_dropout=config.attention_dropout)
  return text.CausalTextEncoder(**(kwargs | overrides))


def clip_text_params(w, tower):
  encoder = {f"block{i}": clip_block(w, i, tower.num_heads) for i in range(tower.num_layers)}
  encoder["ln_final"] = layer_norm(w, "final_layer_norm")
  return {"token_embedding": embedding(w, "embeddings.token_embedding.weight"),
          "position_embedding": embedding(w, "embeddings.position_embedding.weight"),
          "encoder": encoder}


def clip_vision_tower(config, overrides):
  kwargs = dict(
      width=config.hidden_size, num_layers=config.num_hidden_layers,
      num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      image_size=(config.image_size, config.image_size), patch_size=config.patch_size,
      num_channels=config.num_channels, patch_bias=False, pre_norm=True, final_norm="pooled",
      pooler="cls", activation=activation(config), layer_norm_eps=config.layer_norm_eps,
      dropout=getattr(config, "dropout", 0.0) or 0.0,
      attention_dropout=config.attention_dropout)
  return vision.PatchTransformer(**(kwargs | overrides))


def clip_vision_params(w, tower):
  width = tower.width
  return {
      "patch_embedding": conv(w, "embeddings.patch_embedding", bias=False),
      "prefix_tokens": w["embeddings.class_embedding"].reshape(1, 1, width),
      "pos_embedding": w["embeddings.position_embedding.weight"][None],
      "ln_pre": layer_norm(w, "pre_layrnorm"),
      "encoder": {f"block{i}": clip_block(w, i, tower.num_heads)
                  for i in range(tower.num_layers)},
      "ln_post": layer_norm(w, "post_layernorm"),
  }
