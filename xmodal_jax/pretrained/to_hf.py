"""Our towers -> Hugging Face folders, the inverse of `hf.convert`.

The inverse is not written out per family: each family's converter (families/) runs once
on checkpoint tensors that hold their own element numbers, so every parameter it returns says
which elements of which checkpoint tensor it came from, and our values are written back
there. One converter thus serves both directions, and a tensor that would be left unwritten
(or a parameter with no place) is an error, never a silent zero.
"""

import json
import os

import numpy as np

from xmodal_jax import tokenizers
from xmodal_jax.models import audio, text, vision
from xmodal_jax.pretrained.families import bert, clip, vit
from xmodal_jax.pretrained.hf import flatten
from xmodal_jax.pretrained.weights import Weights, canonical_names

SAFETENSORS_METADATA = {"format": "pt"}  # what transformers' loader checks for


def checkpoint_tensors(params_fn, tower, shapes, params, where, prefix=""):
  """{checkpoint name: float32 array} from which `params_fn(weights, tower)` rebuilds
  `params` exactly; `shapes` are the checkpoint's {name: shape}, of which those under
  `prefix` are the tower's."""
  original = canonical_names({n: n for n in shapes if n.startswith(prefix)}, (prefix,))
  ids, start = {}, 0
  for name, shape in ((name, shapes[full]) for name, full in original.items()):
    size = int(np.prod(shape, dtype=np.int64))
    ids[name] = np.arange(start, start + size, dtype=np.int64).reshape(shape)
    start += size
  traced, ours = flatten(params_fn(Weights(ids, where), tower)), flatten(params)
  extra = sorted("/".join(k) for k in ours if k not in traced)
  if extra:
    raise ValueError(f"{where}: parameters with no place in the Hugging Face layout: {extra}")
  values, written = np.zeros(start, np.float32), np.zeros(start, np.int32)
  for path, index in traced.items():
    value = np.asarray(ours[path], np.float32)
    if not np.issubdtype(index.dtype, np.integer):  # a constant the converter supplies
      if not np.array_equal(value, index):
        raise ValueError(f"{where}: {'/'.join(path)} must stay {index.ravel()[:4]}... to fit "
                         "the Hugging Face layout")
      continue
    if value.shape != index.shape:
      raise ValueError(f"{where}: {'/'.join(path)} has shape {value.shape}, the layout "
                       f"expects {index.shape}")
    values[index.ravel()] = value.ravel()
    np.add.at(written, index.ravel(), 1)
  unwritten = sorted(name for name, index in ids.items() if np.any(written[index] != 1))
  if unwritten:
    raise ValueError(f"{where}: checkpoint tensors our parameters do not fill: {unwritten}")
  return {original[name]: values[index] for name, index in ids.items()}


def require(tower, where, **expected):
  """The tower's options that a family's layout fixes, checked by name."""
  wrong = {k: getattr(tower, k) for k, v in expected.items() if getattr(tower, k) != v}
  if wrong:
    raise ValueError(f"{where}: {type(tower).__name__} with {wrong} has no Hugging Face "
                     f"layout (it needs {({k: expected[k] for k in wrong})}); "
                     "launch/convert.py --to=jax exports any tower")


def trunk(tower):
  return dict(hidden_size=tower.width, num_hidden_layers=tower.num_layers,
              num_attention_heads=tower.num_heads, intermediate_size=tower.mlp_dim,
              hidden_act=tower.activation, layer_norm_eps=tower.layer_norm_eps)


def dropouts(tower, hidden="hidden_dropout_prob", attention="attention_probs_dropout_prob"):
  attention_dropout = tower.dropout if tower.attention_dropout is None else (
      tower.attention_dropout)
  return {hidden: tower.dropout, attention: attention_dropout}


def layout(tower, where):
  """(transformers config class, its kwargs, model class, model kwargs, converter) of the
  family whose layout `tower` has."""
  if getattr(tower, "lora_rank", 0) or getattr(tower, "fp8", False):
    raise ValueError(f"{where}: LoRA adapters and fp8 blocks have no Hugging Face layout")
  if isinstance(tower, text.CausalTextEncoder):
    require(tower, where, pooling="eos")
    return ("CLIPTextConfig", trunk(tower) | dict(
        vocab_size=tower.vocab_size, max_position_embeddings=tower.max_positions,
        eos_token_id=tower.eos_token_id, bos_token_id=None, pad_token_id=None,
        **dropouts(tower, "dropout", "attention_dropout")),
            "CLIPTextModel", {}, clip.clip_text_params)
  if isinstance(tower, text.BertTextEncoder):
    require(tower, where, positions_after_padding_id=False)
    if tower.pooling not in ("pooler", "cls", "mean"):
      require(tower, where, pooling="pooler")
    return ("BertConfig", trunk(tower) | dict(
        vocab_size=tower.vocab_size, max_position_embeddings=tower.max_positions,
        type_vocab_size=tower.type_vocab_size, pad_token_id=tower.pad_token_id,
        **dropouts(tower)), "BertModel",
            dict(add_pooling_layer=tower.pooling == "pooler"), bert.bert_params)
  if isinstance(tower, audio.SpectrogramTransformer):
    require(tower, where, num_prefix_tokens=2, patch_bias=True, pre_norm=False,
            final_norm="tokens")
    return ("ASTConfig", trunk(tower) | dict(
        patch_size=tower.patch_size, frequency_stride=tower.patch_stride[0],
        time_stride=tower.patch_stride[1], max_length=tower.max_frames,
        num_mel_bins=tower.num_mels, **dropouts(tower)), "ASTModel", {}, vit.ast_params)
  if type(tower) is vision.PatchTransformer:  # pylint: disable=unidiomatic-typecheck
    height, width = tower.input_size()
    if height != width or (tower.patch_stride and tuple(tower.patch_stride) != (
        tower.patch_size,) * 2) or tower.num_prefix_tokens != 1:
      raise ValueError(f"{where}: only square images, non-overlapping patches and one [CLS] "
                       "token have a Hugging Face ViT / CLIP layout")
    common = trunk(tower) | dict(image_size=height, patch_size=tower.patch_size,
                                 num_channels=tower.num_channels)
    if not tower.patch_bias:  # CLIP's vision tower
      require(tower, where, pre_norm=True, final_norm="pooled", pooler="cls", pooling="pooler")
      return ("CLIPVisionConfig", common | dropouts(tower, "dropout", "attention_dropout"),
              "CLIPVisionModel", {}, clip.clip_vision_params)
    require(tower, where, pre_norm=False, final_norm="tokens")
    pooler = tower.pooling == "pooler" and tower.pooler == "dense_tanh"
    if not pooler:
      require(tower, where, pooling="cls")
    return ("ViTConfig", common | dropouts(tower), "ViTModel",
            dict(add_pooling_layer=pooler), vit.vit_params)
  raise ValueError(f"{where}: {type(tower).__name__} has no Hugging Face layout here (CLIP "
                   "text and vision, ViT, BERT and AST do); launch/convert.py --to=jax "
                   "exports it")


def model_shapes(model_class, config, **kwargs):
  """{state-dict name: shape} of a transformers model, built on torch's meta device."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = getattr(transformers, model_class)(config, **kwargs)
  return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def tower_folder(tower, params, out, where):
  """Writes `tower` as the Hugging Face folder of its family (config.json and
  model.safetensors); `load_hf(out, pooling=...)` reads the same params back."""
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config_class, config_kwargs, model_class, model_kwargs, params_fn = layout(tower, where)
  config = getattr(transformers, config_class)(**config_kwargs)
  shapes = model_shapes(model_class, config, **model_kwargs)
  tensors = checkpoint_tensors(params_fn, tower, shapes, params, where)
  os.makedirs(out, exist_ok=True)
  config.architectures = [model_class]
  config.save_pretrained(out)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata=SAFETENSORS_METADATA)
  return tensors


def clip_folder(text_tower, text_params, vision_tower, vision_params, heads, logit_scale,
                out):
  """Writes a folder `transformers.CLIPModel.from_pretrained` loads: both towers, the two
  projections (`heads`: {"text", "vision"}: our Dense params) and the logit scale (its log).

  CLIP's projections have no bias; each head's bias b moves into the LayerNorm that ends the
  pooled path, as the d with d K = b (K the head's kernel), which leaves every embedding as
  it was (the text tower's last_hidden_state shifts by d, its pooled token included)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  parts = {"text": (text_tower, dict(text_params), "encoder/ln_final", "text_model."),
           "vision": (vision_tower, dict(vision_params), "ln_post", "vision_model.")}
  configs, checks = {}, {}
  for part, (tower, params, last_norm, prefix) in parts.items():
    where = f"the {part} tower"
    config_class, config_kwargs, _, _, params_fn = layout(tower, where)
    if config_class != f"CLIP{part.capitalize()}Config":
      raise ValueError(f"{where} has the {config_class[:-6]} layout, not CLIP's")
    kernel, bias = (np.asarray(heads[part][k], np.float64) for k in ("kernel", "bias"))
    shift, _, rank, _ = np.linalg.lstsq(kernel.T, bias, rcond=None)
    if np.abs(shift @ kernel - bias).max() > 1e-5 * max(np.abs(bias).max(), 1.0):
      raise ValueError(f"{where}: the head's bias cannot move into the LayerNorm (its kernel "
                       f"has rank {rank} < {kernel.shape[1]})")
    node = params
    *parents, leaf = last_norm.split("/")
    for key in parents:
      node[key] = dict(node[key])
      node = node[key]
    node[leaf] = dict(node[leaf], bias=np.asarray(node[leaf]["bias"], np.float64) + shift)
    configs[part] = getattr(transformers, config_class)(**config_kwargs)
    checks[part] = (params_fn, tower, params, where, prefix)
  tensors = {"text_projection.weight": np.asarray(heads["text"]["kernel"], np.float32).T.copy(),
             "visual_projection.weight": np.asarray(heads["vision"]["kernel"],
                                                    np.float32).T.copy(),
             "logit_scale": np.asarray(logit_scale, np.float32).reshape(())}
  config = transformers.CLIPConfig(
      text_config=configs["text"].to_dict(), vision_config=configs["vision"].to_dict(),
      projection_dim=tensors["text_projection.weight"].shape[0],
      logit_scale_init_value=float(tensors["logit_scale"]))
  config.architectures = ["CLIPModel"]
  shapes = model_shapes("CLIPModel", config)
  for params_fn, tower, params, where, prefix in checks.values():
    tensors.update(checkpoint_tensors(params_fn, tower, shapes, params, where, prefix))
  unwritten = sorted(set(shapes) - set(tensors))
  if unwritten:
    raise ValueError(f"CLIPModel tensors the run does not fill: {unwritten}")
  os.makedirs(out, exist_ok=True)
  config.save_pretrained(out)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata=SAFETENSORS_METADATA)
  return tensors


def projection_file(head, out):
  """The head as a torch Linear's tensors (weight [P, W], bias [P]) in projection.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"weight": np.asarray(head["kernel"], np.float32).T.copy(),
             "bias": np.asarray(head["bias"], np.float32)},
            os.path.join(out, "projection.safetensors"), metadata=SAFETENSORS_METADATA)


def image_processor_config(modality_config, size, out):
  """preprocessor_config.json for CLIPImageProcessor with the run's evaluation preprocessing:
  shorter side resized to `size`, centre crop, /255, mean/std."""
  config = dict(image_processor_type="CLIPImageProcessor", do_resize=True,
                size={"shortest_edge": size}, do_center_crop=True,
                crop_size={"height": size, "width": size}, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, resample=2,
                image_mean=list(modality_config["mean"]), image_std=list(modality_config["std"]),
                do_convert_rgb=True)
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def clip_pair(model, modality_configs, modalities):
  """(text modality, image modality) when `modalities` are a CLIP text and vision tower."""
  kinds = {modality_configs[m].kind: m for m in modalities}
  if len(modalities) != 2 or set(kinds) != {"text", "image"}:
    return None
  try:
    names = [layout(model.towers[kinds[k]], k)[0] for k in ("text", "image")]
  except ValueError:
    return None
  return ((kinds["text"], kinds["image"])
          if names == ["CLIPTextConfig", "CLIPVisionConfig"] else None)


def write_run(model, params, modality_configs, modalities, out):
  """A run's `modalities` as Hugging Face folders: one CLIPModel folder for a CLIP text and
  image pair, else {out}/{modality}/ per tower; each with its tokenizer or image
  preprocessing. Returns a line per folder written."""
  pair = clip_pair(model, modality_configs, modalities)
  if pair:
    text_modality, image = pair
    if isinstance(params["logit_scale"], dict):
      raise ValueError("a run with per-pair temperatures has no single CLIP logit scale")
    clip_folder(model.towers[text_modality], params[f"towers_{text_modality}"],
                model.towers[image], params[f"towers_{image}"],
                {"text": params[f"heads_{text_modality}"], "vision": params[f"heads_{image}"]},
                params["logit_scale"], out)
    for modality in pair:
      preprocessing(modality_configs[modality], out)
    return [f"{text_modality} + {image}: a CLIPModel folder -> {out}"]
  lines = []
  for modality in modalities:
    folder = os.path.join(out, modality)
    tensors = tower_folder(model.towers[modality], params[f"towers_{modality}"], folder,
                           f"the {modality} tower")
    projection_file(params[f"heads_{modality}"], folder)
    preprocessing(modality_configs[modality], folder, model.towers[modality])
    lines.append(f"{modality}: {len(tensors)} tensors in its family's layout, and "
                 f"projection.safetensors -> {folder}")
  return lines


def preprocessing(modality_config, out, tower=None):
  """The text's tokenizer, or an image's or an AST's preprocessor_config.json, beside the
  weights."""
  if modality_config.kind == "text":
    tokenizers.load(modality_config.tokenizer).save_pretrained(out)
  elif modality_config.kind == "image":
    image_processor_config(modality_config, modality_config.image_size, out)
  elif isinstance(tower, audio.SpectrogramTransformer):  # as ASTFeatureExtractor reads it
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
      json.dump(dict(feature_extractor_type="ASTFeatureExtractor", feature_size=1,
                     sampling_rate=tower.sample_rate, num_mel_bins=tower.num_mels,
                     max_length=tower.max_frames, mean=tower.mean, std=tower.std,
                     do_normalize=True, padding_value=0.0, return_attention_mask=False), f,
                indent=2)
