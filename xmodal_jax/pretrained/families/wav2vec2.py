"""wav2vec 2.0 and HuBERT (the same encoder; raw waveforms in)."""

import numpy as np

from xmodal_jax.models import speech
from xmodal_jax.pretrained.weights import (activation, block, conv1d, dense,
                                           feature_extractor_options, layer_norm)


SPEECH_FAMILIES = ("wav2vec2", "hubert")


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


POS_CONV = "encoder.pos_conv_embed.conv"
# Newer torch's names for weight_norm's magnitude g and direction v.
WEIGHT_NORM_PARTS = ("parametrizations.weight.original0", "parametrizations.weight.original1")


def _norm(v):
  """|v| over dims 0 and 1 (torch's weight_norm(dim=2)), in float64, shape [1, 1, K]."""
  return np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))


def weight_normed_conv(w, name):
  """A weight-normalized Conv1d (over dim 2, as torch's weight_norm(dim=2)) as the plain
  kernel [K, in / groups, out] it computes, g * v / |v|. Newer torch saves g and v as
  parametrizations.weight.original0/1, older as weight_g/weight_v; a plain `weight` (weight
  norm removed) is taken as it is."""
  if name + ".weight" in w:
    return {"kernel": w[name + ".weight"].transpose(2, 1, 0), "bias": w[name + ".bias"]}
  if name + ".weight_g" in w:
    g, v = w[name + ".weight_g"], w[name + ".weight_v"]
  else:
    g, v = (w[f"{name}.{part}"] for part in WEIGHT_NORM_PARTS)
  weight = g * v / _norm(v)
  return {"kernel": weight.astype(np.float32).transpose(2, 1, 0), "bias": w[name + ".bias"]}


def plain_weight_shapes(shapes, name=POS_CONV):
  """A checkpoint's {name: shape} with weight_norm's g and v of `name` (where it has them)
  as the one plain `{name}.weight` they compute, what to_hf traces the converter on; and
  whether it had them (then weight_norm_parts turns the tensors back)."""
  g, v = (f"{name}.{part}" for part in WEIGHT_NORM_PARTS)
  if v not in shapes:
    return shapes, False
  shapes = {k: s for k, s in shapes.items() if k != g}
  shapes[name + ".weight"] = shapes.pop(v)
  return shapes, True


def weight_norm_parts(tensors, name=POS_CONV):
  """The inverse of plain_weight_shapes on tensors: the plain `{name}.weight` [out, in /
  groups, K] split into g = |weight| (over dims 0 and 1) and v = weight; loading computes
  g * v / |v|, the weight to within float32 rounding."""
  tensors = dict(tensors)
  weight = tensors.pop(name + ".weight")
  tensors[f"{name}.{WEIGHT_NORM_PARTS[0]}"] = _norm(weight).astype(np.float32)
  tensors[f"{name}.{WEIGHT_NORM_PARTS[1]}"] = weight
  return tensors


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
            "pos_conv": weight_normed_conv(w, POS_CONV),
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
