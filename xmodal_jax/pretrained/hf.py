"""Hugging Face model folders -> our Linen towers and their params, without a hub.

`load_hf(path)` reads config.json (through `transformers.AutoConfig`) and the weights
(model.safetensors, sharded safetensors, or pytorch_model.bin when torch is installed),
picks the family's tower, and converts each tensor to our parameter layout. Every
parameter the tower needs must come from the folder; weights the tower has no place for
(task heads such as a masked-LM head) are listed in a warning, never dropped unsaid.
"""

import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.pretrained.families import CONVERTERS, whisper
from xmodal_jax.pretrained.families.vit import LEGACY_VIT_NAMES
from xmodal_jax.pretrained.weights import Weights, canonical_names, read_weights

FAMILIES = ("bert", "roberta", "xlm-roberta", "vit", "clip", "clip_text_model",
            "clip_vision_model", "siglip", "siglip_text_model", "siglip_vision_model",
            "audio-spectrogram-transformer", "wav2vec2", "hubert", "whisper")
CLIP_PARTS = ("text", "vision")
TWO_TOWER_FAMILIES = ("clip", "siglip")  # one folder, a text and a vision tower

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
  renames = ()
  if model_type in TWO_TOWER_FAMILIES:
    if part not in CLIP_PARTS:
      raise ValueError(f"{path}: a {model_type.upper()} model folder holds two towers; pass "
                       f"part='text' or part='vision' (got {part!r})")
    model_type = f"{model_type}_{part}_model"
    config = getattr(config, f"{part}_config")
    prefixes = (f"{part}_model.",)
  elif part is not None:
    raise ValueError(f"{path}: part={part!r} only applies to CLIP and SigLIP model folders")
  elif model_type == "whisper":  # WhisperForConditionalGeneration nests the model in "model."
    prefixes = ("model.",)
    if getattr(config, "architectures", None) == [whisper.ENCODER_ONLY]:
      renames = (("^", whisper.ENCODER_PREFIX),)
  else:
    prefixes = ("bert.", "roberta.", "vit.", "audio_spectrogram_transformer.", "text_model.",
                "vision_model.", "wav2vec2.", "hubert.")
  if model_type in ("vit", "audio-spectrogram-transformer"):
    renames = LEGACY_VIT_NAMES
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


def projection(path, tensors, part, embed_dim):
  """CLIP's projection of `part` ("text" or "vision") from a CLIPModel folder's `tensors`, as
  params of our head (Dense [W, P] with a zero bias), its logit scale (stored as the log, as
  ours) and logit bias (None: CLIP has none): the model starts from CLIP's joint space.
  `embed_dim` must be CLIP's projection_dim. A SiglipModel's towers end in its joint space
  (the text tower's head, the vision tower's pooling head): our head is the identity, and
  the sigmoid loss's bias comes too."""
  if "logit_bias" in tensors:
    width = tensors[f"{part}_model.post_layernorm.weight" if part == "vision" else
                    f"{part}_model.head.weight"].shape[0]
    if width != embed_dim:
      raise ValueError(f"{path}: SigLIP's {part} tower gives {width} dims but "
                       f"config.model.embed_dim={embed_dim}")
    head = {"kernel": np.eye(width, dtype=np.float32), "bias": np.zeros(width, np.float32)}
    return (head, np.asarray(tensors["logit_scale"], np.float32).reshape(()),
            np.asarray(tensors["logit_bias"], np.float32).reshape(()))
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
  return head, np.asarray(tensors["logit_scale"], np.float32).reshape(()), None


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
    shapes_only, (None, None, None) once config.json's projection_dim is checked."""
    path = options.get("path")
    if not path:
      raise ValueError(f"{where}: projection=True needs path=<a CLIPModel folder>")
    if self.shapes_only:
      import transformers  # pylint: disable=g-import-not-at-top
      config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
      if getattr(config, "projection_dim", embed_dim) != embed_dim:
        raise ValueError(f"{path}: CLIP projects to {config.projection_dim} dims but "
                         f"config.model.embed_dim={embed_dim}")
      return None, None, None
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
