"""A run's modalities as Hugging Face folders (launch/convert.py --to=hf): one CLIPModel or
SiglipModel folder for a text and image pair in either layout, else a folder per tower in its
family's layout (to_hf.py), each with its tokenizer or preprocessing settings."""

import json
import os

import numpy as np

from xmodal_jax import tokenizers
from xmodal_jax.models import audio, speech
from xmodal_jax.pretrained.to_hf import (checkpoint_tensors, layout, model_shapes,
                                         projection_file, save_folder, tower_folder)


def clip_folder(text_tower, text_params, vision_tower, vision_params, heads, logit_scale,
                out):
  """Writes a folder `transformers.CLIPModel.from_pretrained` loads: both towers, the two
  projections (`heads`: {"text", "vision"}: our Dense params) and the logit scale (its log).

  CLIP's projections have no bias; each head's bias b moves into the LayerNorm that ends the
  pooled path, as the d with d K = b (K the head's kernel), which leaves every embedding as
  it was (the text tower's last_hidden_state shifts by d, its pooled token included)."""
  import transformers  # pylint: disable=g-import-not-at-top
  towers = {"text": (text_tower, dict(text_params)), "vision": (vision_tower, dict(vision_params))}
  configs, checks = pair_parts("CLIPModel", towers)
  for part, last_norm in (("text", "encoder/ln_final"), ("vision", "ln_post")):
    kernel, bias = (np.asarray(heads[part][k], np.float64) for k in ("kernel", "bias"))
    shift, _, rank, _ = np.linalg.lstsq(kernel.T, bias, rcond=None)
    if np.abs(shift @ kernel - bias).max() > 1e-5 * max(np.abs(bias).max(), 1.0):
      raise ValueError(f"the {part} tower: the head's bias cannot move into the LayerNorm "
                       f"(its kernel has rank {rank} < {kernel.shape[1]})")
    node = towers[part][1]  # the params pair_parts' checks hold, changed in place
    *parents, leaf = last_norm.split("/")
    for key in parents:
      node[key] = dict(node[key])
      node = node[key]
    node[leaf] = dict(node[leaf], bias=np.asarray(node[leaf]["bias"], np.float64) + shift)
  tensors = {"text_projection.weight": np.asarray(heads["text"]["kernel"], np.float32).T.copy(),
             "visual_projection.weight": np.asarray(heads["vision"]["kernel"],
                                                    np.float32).T.copy(),
             "logit_scale": np.asarray(logit_scale, np.float32).reshape(())}
  config = transformers.CLIPConfig(
      text_config=configs["text"].to_dict(), vision_config=configs["vision"].to_dict(),
      projection_dim=tensors["text_projection.weight"].shape[0],
      logit_scale_init_value=float(tensors["logit_scale"]))
  return pair_folder(config, "CLIPModel", tensors, checks, out)


def pair_parts(model_class, towers):
  """({part: transformers config}, pair_folder's checks) of `towers` ({"text"/"vision":
  (tower, params)}), which must have the layouts PAIRS gives `model_class`."""
  import transformers  # pylint: disable=g-import-not-at-top
  expected = dict(zip(("text", "vision"), next(
      layouts for layouts, name in PAIRS.items() if name == model_class)))
  configs, checks = {}, []
  for part, (tower, params) in towers.items():
    where = f"the {part} tower"
    config_class, config_kwargs, _, _, params_fn = layout(tower, where)
    if config_class != expected[part]:
      raise ValueError(f"{where} has the {config_class[:-6]} layout, not {model_class}'s "
                       f"{expected[part][:-6]}")
    configs[part] = getattr(transformers, config_class)(**config_kwargs)
    checks.append((params_fn, tower, params, where, f"{part}_model."))
  return configs, checks


def pair_folder(config, model_class, tensors, checks, out):
  """Writes `model_class`'s folder: `tensors` and, for each (params_fn, tower, params, where,
  prefix) of `checks`, a tower's tensors under its prefix; every tensor must be filled."""
  shapes = model_shapes(model_class, config)
  for params_fn, tower, params, where, prefix in checks:
    tensors.update(checkpoint_tensors(params_fn, tower, shapes, params, where, prefix))
  unwritten = sorted(set(shapes) - set(tensors))
  if unwritten:
    raise ValueError(f"{model_class} tensors the run does not fill: {unwritten}")
  save_folder(config, model_class, tensors, out)
  return tensors


def siglip_folder(text_tower, text_params, vision_tower, vision_params, heads, logit_scale,
                  logit_bias, out):
  """Writes a folder `transformers.SiglipModel.from_pretrained` loads: both towers, the logit
  scale (its log) and the sigmoid loss's bias (0 for a run without one).

  SigLIP's towers end in its joint space. Our text head folds into the text tower's own
  Dense head (two affine maps make one); the vision tower ends in an attention-pooling head
  whose residual sum has no place for a linear map, so our image head must be the identity,
  as loading a SigLIP folder makes it (keep it so with train_policy.<image>.head="freeze")."""
  import transformers  # pylint: disable=g-import-not-at-top
  kernel, bias = (np.asarray(heads["vision"][k]) for k in ("kernel", "bias"))
  if not (np.array_equal(kernel, np.eye(*kernel.shape)) and not bias.any()):
    raise ValueError("the vision tower's head is not the identity, and SigLIP's layout has no "
                     "projection after its attention-pooling head; freeze the head "
                     "(config.train_policy.<image modality>.head=\"freeze\") or export with "
                     "--to=jax")
  text_params = dict(text_params)
  own = {k: np.asarray(text_params["head"][k], np.float64) for k in ("kernel", "bias")}
  ours = {k: np.asarray(heads["text"][k], np.float64) for k in ("kernel", "bias")}
  text_params["head"] = {"kernel": (own["kernel"] @ ours["kernel"]).astype(np.float32),
                         "bias": (own["bias"] @ ours["kernel"] + ours["bias"]).astype(
                             np.float32)}
  text_tower = text_tower.clone(projection_size=ours["kernel"].shape[1])
  configs, checks = pair_parts("SiglipModel", {"text": (text_tower, text_params),
                                               "vision": (vision_tower, vision_params)})
  config = transformers.SiglipConfig(text_config=configs["text"].to_dict(),
                                     vision_config=configs["vision"].to_dict())
  tensors = {"logit_scale": np.asarray(logit_scale, np.float32).reshape(1),
             "logit_bias": np.asarray(logit_bias, np.float32).reshape(1)}
  return pair_folder(config, "SiglipModel", tensors, checks, out)


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


# The text and vision layouts that make one two-tower folder, and its model class.
PAIRS = {("CLIPTextConfig", "CLIPVisionConfig"): "CLIPModel",
         ("SiglipTextConfig", "SiglipVisionConfig"): "SiglipModel"}


def two_tower_pair(model, modality_configs, modalities):
  """(text modality, image modality, model class) when `modalities` are a CLIP or a SigLIP
  text and vision tower, else None."""
  kinds = {modality_configs[m].kind: m for m in modalities}
  if len(modalities) != 2 or set(kinds) != {"text", "image"}:
    return None
  try:
    names = tuple(layout(model.towers[kinds[k]], k)[0] for k in ("text", "image"))
  except ValueError:
    return None
  return (kinds["text"], kinds["image"], PAIRS[names]) if names in PAIRS else None


def write_run(model, params, modality_configs, modalities, out):
  """A run's `modalities` as Hugging Face folders: one CLIPModel or SiglipModel folder for a
  CLIP or SigLIP text and image pair, else {out}/{modality}/ per tower; each with its
  tokenizer or image preprocessing. Returns a line per folder written."""
  pair = two_tower_pair(model, modality_configs, modalities)
  if pair:
    text_modality, image, model_class = pair
    if isinstance(params["logit_scale"], dict):
      raise ValueError("a run with per-pair temperatures has no single logit scale")
    towers = (model.towers[text_modality], params[f"towers_{text_modality}"],
              model.towers[image], params[f"towers_{image}"],
              {"text": params[f"heads_{text_modality}"], "vision": params[f"heads_{image}"]},
              params["logit_scale"])
    if model_class == "CLIPModel":
      clip_folder(*towers, out)
    else:
      siglip_folder(*towers, params.get("logit_bias", 0.0), out)
    for modality in (text_modality, image):
      preprocessing(modality_configs[modality], out)
    return [f"{text_modality} + {image}: a {model_class} folder -> {out}"]
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
  """The text's tokenizer, or an image's or an audio tower's preprocessor_config.json,
  beside the weights."""
  import transformers  # pylint: disable=g-import-not-at-top
  if isinstance(tower, speech.SpeechTransformer):
    transformers.Wav2Vec2FeatureExtractor(
        sampling_rate=tower.sample_rate, do_normalize=tower.normalize,
        return_attention_mask=tower.stable_layer_norm).save_pretrained(out)
  elif isinstance(tower, speech.WhisperEncoder):  # to_hf.layout checked the whole seconds
    transformers.WhisperFeatureExtractor(
        feature_size=tower.num_mels, sampling_rate=tower.sample_rate,
        hop_length=tower.sample_rate // 100, chunk_length=tower.max_frames // 100
    ).save_pretrained(out)
  elif modality_config.kind == "text":
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
