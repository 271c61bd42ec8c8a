"""Hugging Face model folders -> our Linen towers and their params, without a hub.

`load_hf(path)` reads config.json (through `transformers.AutoConfig`) and the weights
(model.safetensors, sharded safetensors, or pytorch_model.bin when torch is installed),
picks the family's tower, and converts each tensor to our parameter layout. Every
parameter the tower needs must come from the folder; weights the tower has no place for
(task heads such as a masked-LM head) are listed in a warning, never dropped unsaid.
"""

import json
import logging
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import audio, speech, text, vision

FAMILIES = ("bert", "roberta", "xlm-roberta", "vit", "clip", "clip_text_model",
            "clip_vision_model", "audio-spectrogram-transformer", "wav2vec2", "hubert",
            "whisper")
SPEECH_FAMILIES = ("wav2vec2", "hubert")
CLIP_PARTS = ("text", "vision")

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
# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


def read_weights(path):
  """{name: float32 ndarray} from a model folder's safetensors (one or sharded) or torch bin."""
  names = os.listdir(path)
  if "model.safetensors.index.json" in names:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif "model.safetensors" in names:
    files = ["model.safetensors"]
  elif "pytorch_model.bin" in names:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path}: has only pytorch_model.bin, and reading it needs torch "
                        "(pip install torch), or save the model as safetensors") from e
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu",
                       weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"{path}: no weights (expected model.safetensors, "
                            "model.safetensors.index.json or pytorch_model.bin)")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  weights = {}
  for name in files:
    with safe_open(os.path.join(path, name), framework="flax") as f:
      for key in f.keys():
        weights[key] = np.asarray(f.get_tensor(key), np.float32)
  return weights


class Weights:
  """A checkpoint's tensors by canonical name; remembers which ones were taken."""

  def __init__(self, tensors, path):
    self.tensors, self.path, self.used = tensors, path, set()

  def __contains__(self, name):
    return name in self.tensors

  def __getitem__(self, name):
    if name not in self.tensors:
      raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}, which the "
                     "tower needs")
    self.used.add(name)
    return self.tensors[name]

  def unused(self):
    return sorted(k for k in self.tensors if k not in self.used and not IGNORED.search(k))


def canonical_names(tensors, prefixes, renames=()):
  """Strips a model's prefix (e.g. "bert."), renames gamma/beta and then by `renames`."""
  out = {}
  for name, value in tensors.items():
    for prefix in prefixes:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    for pattern, replacement in renames:
      name = re.sub(pattern, replacement, name)
    out[name] = value
  return out


def dense(w, name):
  return {"kernel": w[name + ".weight"].T, "bias": w[name + ".bias"]}


def layer_norm(w, name):
  return {"scale": w[name + ".weight"], "bias": w[name + ".bias"]}


def attention(w, q, k, v, o, num_heads):
  """Linear q/k/v/out weights [out, in] -> Flax MultiHeadDotProductAttention params."""
  def qkv(name):
    weight = w[name + ".weight"]
    bias = w[name + ".bias"] if name + ".bias" in w else np.zeros(weight.shape[0], np.float32)
    heads = (num_heads, weight.shape[0] // num_heads)
    return {"kernel": weight.T.reshape((weight.shape[1],) + heads), "bias": bias.reshape(heads)}
  out = w[o + ".weight"]
  return {"query": qkv(q), "key": qkv(k), "value": qkv(v),
          "out": {"kernel": out.T.reshape(num_heads, -1, out.shape[0]),
                  "bias": w[o + ".bias"]}}


def block(w, num_heads, names):
  """One encoder block; `names` maps our sub-layer names to the checkpoint's."""
  return {
      "attn": attention(w, *names["attn"], num_heads),
      "ln_attn": layer_norm(w, names["ln_attn"]),
      "ln_mlp": layer_norm(w, names["ln_mlp"]),
      "mlp": {"fc1": dense(w, names["fc1"]), "fc2": dense(w, names["fc2"])},
  }


def embedding(w, name):
  return {"embedding": w[name]}


def conv(w, name, bias):
  kernel = {"kernel": w[name + ".weight"].transpose(2, 3, 1, 0)}
  return kernel | ({"bias": w[name + ".bias"]} if bias else {})


def activation(config, field="hidden_act"):
  """The config's activation (its `field`), checked against the ones the blocks have."""
  act = getattr(config, field)
  if not isinstance(act, str) or act not in text.transformer.ACTIVATIONS:
    raise ValueError(f"{field}={act!r} is not supported (expected one of "
                     f"{sorted(text.transformer.ACTIVATIONS)})")
  return act

def feature_extractor_options(path):
  """preprocessor_config.json's fields (the processor's), or {} when the folder has none."""
  name = os.path.join(path, "preprocessor_config.json")
  if not os.path.exists(name):
    return {}
  with open(name) as f:
    return json.load(f)


def conv1d(w, name, bias=True):
  """A torch Conv1d's weight [out, in, K] (and bias) as Flax nn.Conv params [K, in, out]."""
  kernel = {"kernel": w[name + ".weight"].transpose(2, 1, 0)}
  return kernel | ({"bias": w[name + ".bias"]} if bias else {})


# --- BERT / RoBERTa / MiniLM -----------------------------------------------------------------


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


class HFModule(nn.Module):
  """A tower called as transformers calls the model: inputs by their Hugging Face names
  (input_ids, attention_mask, token_type_ids; pixel_values and input_values channels-last),
  outputs {"last_hidden_state", "pooler_output"}. Shares the tower's params (same tree)."""
  tower: nn.Module

  def setup(self):
    nn.share_scope(self, self.tower)

  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None,
               pixel_values=None, input_values=None, input_features=None, *, train=False):
    if input_ids is not None:
      inputs = {"input_ids": input_ids, "attention_mask": (
          np.ones(np.shape(input_ids), np.int32) if attention_mask is None else attention_mask)}
      if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    elif pixel_values is not None:
      inputs = {"pixels": pixel_values}
    elif input_values is not None:
      inputs = {self.tower.INPUT_VALUES: input_values}
    elif input_features is not None:  # Whisper's log-mel [B, mels, frames]
      inputs = {"spectrogram": jnp.swapaxes(input_features, 1, 2)}
    else:
      raise ValueError("expected input_ids, pixel_values, input_values or input_features")
    out = self.tower(inputs, train=train)
    return {"last_hidden_state": out["tokens"], "pooler_output": out["pooled"]}


def load_hf(path, part=None, **overrides):
  """A local Hugging Face model folder -> (HFModule, float32 params).

  `module.apply({"params": params}, **inputs)` takes the tokenizer's or feature extractor's
  arrays by name and returns last_hidden_state and pooler_output; `module.tower` is the
  tower itself (the same params) for `MultiModalModel`.

  Families: BERT, RoBERTa, XLM-R and MiniLM (BertModel layout), ViT, CLIP (a CLIPModel
  folder needs part="text" or "vision"; CLIPTextModel / CLIPVisionModel folders need none),
  the Audio Spectrogram Transformer, wav2vec 2.0 and HuBERT (their input_values are raw
  waveforms, standardized on device when the folder's processor does so) and Whisper's
  encoder (input_features as its feature extractor gives them, [B, mels, frames]; the
  decoder's tensors are listed as not loaded). `overrides` replace the tower's options (dtype,
  remat, dropout, pooling, ...). Nothing is fetched from a hub.
  """
  check_folder(path)
  return convert(path, lambda: read_weights(path), part, overrides)


def check_folder(path):
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pretrained model folder {path!r} does not exist")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path}: no config.json, so not a Hugging Face model folder")


def convert(path, read_tensors, part, overrides, shapes_only=False):
  """load_hf with the folder's tensors from `read_tensors()`, called once the config has
  been checked. With `shapes_only`, the tower as the folder's config.json describes it and
  no params (nothing else is read; a ViT's optional pooler is taken as absent)."""
  import transformers  # pylint: disable=g-import-not-at-top
  overrides = dict(overrides)
  config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
  model_type = config.model_type
  if model_type not in FAMILIES:
    raise ValueError(f"{path}: model_type={model_type!r} is not supported; supported: "
                     f"{FAMILIES}")
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if model_type == "clip":
    if part not in CLIP_PARTS:
      raise ValueError(f"{path}: a CLIP model folder holds two towers; pass part='text' or "
                       f"part='vision' (got {part!r})")
    model_type = f"clip_{part}_model"
    config = getattr(config, f"{part}_config")
    prefixes = (f"{part}_model.",)
  elif part is not None:
    raise ValueError(f"{path}: part={part!r} only applies to CLIP model folders")
  elif model_type == "whisper":  # WhisperForConditionalGeneration nests the model in "model."
    prefixes = ("model.",)
  else:
    prefixes = ("bert.", "roberta.", "vit.", "audio_spectrogram_transformer.", "text_model.",
                "vision_model.", "wav2vec2.", "hubert.")
  renames = LEGACY_VIT_NAMES if model_type in ("vit", "audio-spectrogram-transformer") else ()
  w = Weights({} if shapes_only else canonical_names(read_tensors(), prefixes, renames), path)

  tower_fn, params_fn, example_fn = CONVERTERS[model_type]
  tower = tower_fn(config, overrides, path, w)
  if shapes_only:
    return HFModule(tower), None
  params = params_fn(w, tower)
  check_fits(tower, params, example_fn(tower), path)
  unused = w.unused()
  if unused:
    logging.warning("%s: %d tensors have no place in the %s tower and were not loaded: %s",
                    path, len(unused), type(tower).__name__, ", ".join(unused[:20])
                    + (" ..." if len(unused) > 20 else ""))
  return HFModule(tower), jax.tree.map(lambda x: np.asarray(x, np.float32), params)


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


def projection(path, tensors, part, embed_dim):
  """CLIP's projection of `part` ("text" or "vision") from a CLIPModel folder's `tensors`, as
  params of our head (Dense [W, P] with a zero bias), and its logit scale (stored as the
  log, as ours): the model starts from CLIP's joint space. `embed_dim` must be CLIP's
  projection_dim."""
  name = {"text": "text_projection.weight", "vision": "visual_projection.weight"}.get(part)
  if name is None or name not in tensors:
    raise ValueError(f"{path}: projection=True needs a CLIPModel folder with "
                     f"{name or 'text_projection/visual_projection'} and part='text' or "
                     f"'vision' (part={part!r})")
  weight = tensors[name]
  if weight.shape[0] != embed_dim:
    raise ValueError(f"{path}: CLIP projects to {weight.shape[0]} dims but "
                     f"config.model.embed_dim={embed_dim}")
  head = {"kernel": weight.T.astype(np.float32), "bias": np.zeros(embed_dim, np.float32)}
  return head, np.asarray(tensors["logit_scale"], np.float32).reshape(())


class Loader:
  """Loads the towers a model config names "pretrained" (models.towers.build_model's
  `loader`), reading each folder's weights once however many towers and projections come
  from it (a CLIP folder gives both towers and both projections)."""

  def __init__(self, shapes_only=False):
    """`shapes_only`: build the towers from the folders' config.json alone, with no params
    (what compiling for a topology or counting parameters needs; no weights are read)."""
    self._tensors = {}
    self.shapes_only = shapes_only

  def tensors(self, path):
    if path not in self._tensors:
      check_folder(path)
      self._tensors[path] = read_weights(path)
    return self._tensors[path]

  def tower(self, options, where):
    """(tower module, params) for the config entry `where`: {path, part, **overrides}."""
    options = dict(options)
    path = options.pop("path", None)
    if not path:
      raise ValueError(f"{where}: name='pretrained' needs path=<a Hugging Face model folder>")
    part = options.pop("part", None)
    if self.shapes_only:
      check_folder(path)
    module, params = convert(path, lambda: self.tensors(path), part, options,
                             shapes_only=self.shapes_only)
    return module.tower, params

  def projection(self, options, where, embed_dim):
    """(head params, logit scale) of CLIP's projection for the config entry `where`; with
    shapes_only, (None, None) once config.json's projection_dim is checked."""
    path = options.get("path")
    if not path:
      raise ValueError(f"{where}: projection=True needs path=<a CLIPModel folder>")
    if self.shapes_only:
      import transformers  # pylint: disable=g-import-not-at-top
      config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
      if getattr(config, "projection_dim", embed_dim) != embed_dim:
        raise ValueError(f"{path}: CLIP projects to {config.projection_dim} dims but "
                         f"config.model.embed_dim={embed_dim}")
      return None, None
    return projection(path, self.tensors(path), options.get("part"), embed_dim)


def check_fits(tower, params, example, path):
  """Every parameter of `tower` outside its pooling head (GPO is ours) must be loaded, with
  the shape the tower expects."""
  shapes = jax.eval_shape(lambda: tower.init(jax.random.key(0), example, train=False))
  expected = {k: tuple(v.shape) for k, v in flatten(shapes["params"]).items()
              if k[0] != "pool"}
  loaded = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  missing = sorted("/".join(k) for k in expected if k not in loaded)
  extra = sorted("/".join(k) for k in loaded if k not in expected)
  wrong = sorted(f"{'/'.join(k)}: {loaded[k]} vs {expected[k]}" for k in expected
                 if k in loaded and loaded[k] != expected[k])
  if missing or extra or wrong:
    raise ValueError(f"{path}: checkpoint does not fit {type(tower).__name__}: missing "
                     f"{missing}, unexpected {extra}, wrong shapes {wrong}")


def flatten(tree, prefix=()):
  """{path tuple: leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out
