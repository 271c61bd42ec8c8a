"""Each supported family's converters: config.json -> our tower, and its tensors -> the
tower's params (BERT-like, CLIP's two towers, ViT, AST, wav2vec 2.0 and HuBERT, Whisper's
encoder). CONVERTERS is the table `hf.convert` dispatches on."""

import numpy as np

from xmodal_jax.models import audio, speech, text, vision
from xmodal_jax.pretrained.weights import (activation, block, conv, conv1d,
                                           dense, embedding, feature_extractor_options,
                                           layer_norm)

SPEECH_FAMILIES = ("wav2vec2", "hubert")

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
def bert_tower(config, model_type, overrides):
  if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
    raise ValueError(f"position_embedding_type={config.position_embedding_type!r}: only "
                     "absolute positions are supported")
  kwargs = dict(
      vocab_size=config.vocab_size, width=config.hidden_size,
      num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
      mlp_dim=config.intermediate_size, max_positions=config.max_position_embeddings,
      type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id or 0,
      positions_after_padding_id=model_type != "bert", activation=activation(config),
      layer_norm_eps=config.layer_norm_eps, dropout=config.hidden_dropout_prob,
      attention_dropout=config.attention_probs_dropout_prob)
  return text.BertTextEncoder(**(kwargs | overrides))


def bert_params(w, tower):
  params = {
      "word_embeddings": embedding(w, "embeddings.word_embeddings.weight"),
      "position_embeddings": embedding(w, "embeddings.position_embeddings.weight"),
      "token_type_embeddings": embedding(w, "embeddings.token_type_embeddings.weight"),
      "embeddings_ln": layer_norm(w, "embeddings.LayerNorm"),
      "encoder": {f"block{i}": block(w, tower.num_heads, {
          "attn": [f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")]
                  + [f"encoder.layer.{i}.attention.output.dense"],
          "ln_attn": f"encoder.layer.{i}.attention.output.LayerNorm",
          "fc1": f"encoder.layer.{i}.intermediate.dense",
          "fc2": f"encoder.layer.{i}.output.dense",
          "ln_mlp": f"encoder.layer.{i}.output.LayerNorm"}) for i in range(tower.num_layers)},
  }
  if tower.pooling == "pooler":
    params["pooler"] = dense(w, "pooler.dense")
  return params


# --- CLIP ------------------------------------------------------------------------------------


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


# --- ViT and AST -----------------------------------------------------------------------------


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


# --- wav2vec 2.0 and HuBERT ------------------------------------------------------------------



def speech_tower(config, overrides, path):
  unsupported = {name: getattr(config, name) for name, ok in (
      ("add_adapter", False), ("conv_pos_batch_norm", False),
      ("use_weighted_layer_sum", False)) if getattr(config, name, ok) != ok}
  if unsupported:
    raise ValueError(f"{path}: {unsupported} is not supported (expected the standard encoder)")
  if config.feat_extract_norm not in speech.FEATURE_NORMS:
    raise ValueError(f"{path}: feat_extract_norm={config.feat_extract_norm!r}: expected one "
                     f"of {speech.FEATURE_NORMS}")
  features = feature_extractor_options(path)
  kwargs = dict(
      width=config.hidden_size, num_layers=config.num_hidden_layers,
      num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      sample_rate=features.get("sampling_rate", 16000),
      normalize=features.get("do_normalize", True), conv_channels=tuple(config.conv_dim),
      conv_kernels=tuple(config.conv_kernel), conv_strides=tuple(config.conv_stride),
      conv_bias=config.conv_bias, feature_norm=config.feat_extract_norm,
      feature_activation=config.feat_extract_activation,
      feature_projection_norm=getattr(config, "feat_proj_layer_norm", True),
      pos_conv_kernel=config.num_conv_pos_embeddings,
      pos_conv_groups=config.num_conv_pos_embedding_groups,
      stable_layer_norm=config.do_stable_layer_norm, mask_time_prob=config.mask_time_prob,
      mask_time_length=config.mask_time_length, activation=activation(config),
      layer_norm_eps=config.layer_norm_eps, dropout=config.hidden_dropout,
      attention_dropout=config.attention_dropout)
  return speech.SpeechTransformer(**(kwargs | overrides))


def weight_normed_conv(w, name):
  """A weight-normalized Conv1d (over dim 2, as torch's weight_norm(dim=2)) as the plain
  kernel [K, in / groups, out] it computes, g * v / |v|. Newer torch saves g and v as
  parametrizations.weight.original0/1, older as weight_g/weight_v."""
  if name + ".weight_g" in w:
    g, v = w[name + ".weight_g"], w[name + ".weight_v"]
  else:
    g = w[name + ".parametrizations.weight.original0"]
    v = w[name + ".parametrizations.weight.original1"]
  weight = g * v / np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
  return {"kernel": weight.astype(np.float32).transpose(2, 1, 0), "bias": w[name + ".bias"]}


def speech_params(w, tower):
  convs = {}
  for i in range(len(tower.conv_channels)):
    name = f"feature_extractor.conv_layers.{i}."
    convs[f"conv{i}"] = conv1d(w, name + "conv", tower.conv_bias)
    if tower.feature_norm == "layer" or i == 0:
      convs[f"norm{i}"] = layer_norm(w, name + "layer_norm")
  encoder = {f"block{i}": block(w, tower.num_heads, {
      "attn": [f"encoder.layers.{i}.attention.{n}_proj" for n in ("q", "k", "v", "out")],
      "ln_attn": f"encoder.layers.{i}.layer_norm",
      "fc1": f"encoder.layers.{i}.feed_forward.intermediate_dense",
      "fc2": f"encoder.layers.{i}.feed_forward.output_dense",
      "ln_mlp": f"encoder.layers.{i}.final_layer_norm"}) for i in range(tower.num_layers)}
  params = {"feature_encoder": convs,
            "feature_projection": dense(w, "feature_projection.projection"),
            "pos_conv": weight_normed_conv(w, "encoder.pos_conv_embed.conv"),
            "encoder": encoder}
  if tower.feature_projection_norm:
    params["feature_ln"] = layer_norm(w, "feature_projection.layer_norm")
  if tower.stable_layer_norm:
    encoder["ln_final"] = layer_norm(w, "encoder.layer_norm")
  else:
    params["ln_pre"] = layer_norm(w, "encoder.layer_norm")
  if tower.mask_time_prob > 0:
    params["masked_spec_embed"] = w["masked_spec_embed"]
  return params


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


# --- Entry point -----------------------------------------------------------------------------


def token_example(tower):
  del tower
  return {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}


def pixel_example(tower):
  return {"pixels": np.zeros((1,) + tower.input_size() + (tower.num_channels,), np.float32)}


# model_type -> (tower(config, overrides, path, weights), params(weights, tower), an example
# input for the tower's init).
CONVERTERS = {
    **{family: (lambda c, o, p, w, family=family: bert_tower(c, family, o), bert_params,
                token_example) for family in ("bert", "roberta", "xlm-roberta")},
    "clip_text_model": (lambda c, o, p, w: clip_text_tower(c, o), clip_text_params,
                        token_example),
    "clip_vision_model": (lambda c, o, p, w: clip_vision_tower(c, o), clip_vision_params,
                          pixel_example),
    "vit": (lambda c, o, p, w: vit_tower(c, o, w), vit_params, pixel_example),
    "audio-spectrogram-transformer": (
        lambda c, o, p, w: ast_tower(c, o, p), ast_params,
        lambda t: {"spectrogram": np.zeros((1, t.max_frames, t.num_mels), np.float32)}),
    **{family: (lambda c, o, p, w: speech_tower(c, o, p), speech_params,
                lambda t: {"waveform": np.zeros((1, t.sample_rate), np.float32)})
       for family in SPEECH_FAMILIES},
    "whisper": (lambda c, o, p, w: whisper_tower(c, o), whisper_params,
                lambda t: {"spectrogram": np.zeros((1, 2 * t.max_positions, t.num_mels),
                                                   np.float32)}),
}
