"""Whisper's encoder (WhisperModel / WhisperForConditionalGeneration folders, and the
encoder saved alone, as to_hf writes it)."""

from xmodal_jax.models import speech
from xmodal_jax.pretrained.weights import activation, block, conv1d, layer_norm

# transformers' encoder-only model (not exported at the top level), whose folders name its
# tensors without the "encoder." that the whole model's carry.
ENCODER_ONLY = "WhisperEncoder"
MODEL_MODULE = "transformers.models.whisper.modeling_whisper"
ENCODER_PREFIX = "encoder."


def whisper_tower(config, overrides):
  kwargs = dict(
      width=config.d_model, num_layers=config.encoder_layers,
      num_heads=config.encoder_attention_heads, mlp_dim=config.encoder_ffn_dim,
      num_mels=config.num_mel_bins, max_positions=config.max_source_positions,
      max_frames=2 * config.max_source_positions,
      activation=activation(config, "activation_function"),
      dropout=config.dropout, attention_dropout=config.attention_dropout)
  return speech.WhisperEncoder(**(kwargs | overrides))


def whisper_params(w, tower):
  encoder = {f"block{i}": block(w, tower.num_heads, {
      "attn": [f"encoder.layers.{i}.self_attn.{n}_proj" for n in ("q", "k", "v", "out")],
      "ln_attn": f"encoder.layers.{i}.self_attn_layer_norm",
      "fc1": f"encoder.layers.{i}.fc1", "fc2": f"encoder.layers.{i}.fc2",
      "ln_mlp": f"encoder.layers.{i}.final_layer_norm"}) for i in range(tower.num_layers)}
  encoder["ln_final"] = layer_norm(w, "encoder.layer_norm")
  return {"conv1": conv1d(w, "encoder.conv1"), "conv2": conv1d(w, "encoder.conv2"),
          "pos_embedding": w["encoder.embed_positions.weight"], "encoder": encoder}
