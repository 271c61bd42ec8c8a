"""The multi-modal model: one tower + projection head per modality, a shared logit scale."""

import itertools
from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.models import (audio, features, fusion as fusion_lib, pooling, speech, text,
                                vision)

# Towers by the name a config gives them; each maps {input name: array} to
# `transformer.tower_output` (pooled [B, W], tokens, valid). "pretrained" (a Hugging Face
# folder, through the loader `build_model` is given) and "frames" (an image tower per frame)
# are built by `build_tower`.
TOWERS = {
    "audio_transformer": audio.AudioTransformer,
    "video_transformer": vision.VideoTransformer,
    "text_transformer": text.TextTransformer,
    "bert": text.BertTextEncoder,
    "clip_text": text.CausalTextEncoder,
    "vit": vision.PatchTransformer,
    "ast": audio.SpectrogramTransformer,
    "speech": speech.SpeechTransformer,
    "whisper": speech.WhisperEncoder,
    "features": features.FeatureEncoder,
}
BUILT_TOWERS = ("pretrained", "frames")


def l2_normalize(x, eps=1e-6):
  """x / max(|x|, eps) over the last axis, with a finite gradient at x = 0 (|x|'s is 0/0: an
  all-padding local feature is exactly 0, and a NaN times its 0 weight is still NaN)."""
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


class MultiModalModel(nn.Module):
  """{modality: inputs} -> {modality: float32[B, embed_dim] L2-normalized embeddings}.

  Modalities absent from the batch are skipped; a modality given as {"cached_embedding":
  float32[B, embed_dim]} (a frozen tower's, computed once) skips its tower. Also owns
  `logit_scale`, stored as its log (initialized to log(1/0.07) as in CLIP; the one place that
  default is written) and, if `logit_bias_init` is set, the sigmoid loss's `logit_bias`
  (SigLIP: -10); callers read them from the params. With `scale_pairs` (pair names "m-n"),
  both are one scalar per pair of modalities instead, {pair: scalar} (per-pair temperatures).
  With `local_features` > 0, a local head per modality projects up to that many pooled runs of
  tokens (a grid of cells for patch towers) into the embedding space (LMIM); `fusion` holds a
  FusionEncoder per pair "a:b" (a's tokens attend to b's) for matching and re-ranking
  (ALBEF).
  """
  towers: Mapping[str, nn.Module]
  embed_dim: int
  logit_scale_init: float = float(np.log(1 / 0.07))
  logit_bias_init: Optional[float] = None
  dtype: Any = jnp.float32
  local_features: int = 0
  fusion: Mapping[str, nn.Module] = flax.core.FrozenDict()
  scale_pairs: Sequence[str] = ()

  def setup(self):
    self.heads = {m: nn.Dense(self.embed_dim, dtype=self.dtype) for m in self.towers}
    if self.local_features:
      self.local_heads = {m: nn.Dense(self.embed_dim, dtype=self.dtype) for m in self.towers}
    def scalar_or_per_pair(value):
      if not self.scale_pairs:
        return lambda rng: jnp.full((), value, jnp.float32)
      return lambda rng: {pair: jnp.full((), value, jnp.float32) for pair in self.scale_pairs}
    self.logit_scale = self.param("logit_scale", scalar_or_per_pair(self.logit_scale_init))
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", scalar_or_per_pair(self.logit_bias_init))

  def __call__(self, batch, *, train):
    """{modality: float32[B, embed_dim]} L2-normalized embeddings."""
    return self.details(batch, train=train, local_features=False)["emb"]

  def details(self, batch, *, train, local_features=True):
    """{"emb": embeddings, "tokens": {m: (tokens, valid)}, "locals": {m: (normalized local
    embeddings [B, K, D], valid [B, K])}} ("locals" empty without local heads)."""
    embeddings, tokens, local = {}, {}, {}
    for modality, tower in self.towers.items():
      if modality not in batch:
        continue
      if "cached_embedding" in batch[modality]:  # a frozen tower's (train/embedding_cache.py)
        embeddings[modality] = batch[modality]["cached_embedding"].astype(jnp.float32)
        continue
      out = tower(batch[modality], train=train)
      embeddings[modality] = l2_normalize(
          self.heads[modality](out["pooled"]).astype(jnp.float32))
      tokens[modality] = (out["tokens"], out["valid"])
      if local_features and self.local_features:
        if "grid" in out:  # patches: a square grid of at most local_features cells
          side = max(int(np.sqrt(self.local_features)), 1)
          pooled, valid = pooling.pool_grid(out["tokens"], *out["grid"], side)
        else:
          pooled, valid = pooling.pool_locals(out["tokens"], out["valid"],
                                              self.local_features)
        local[modality] = (l2_normalize(
            self.local_heads[modality](pooled).astype(jnp.float32)), valid)
    return {"emb": embeddings, "tokens": tokens, "locals": local}

  def match(self, pair, query_tokens, query_valid, context_tokens, context_valid, *, train):
    """Matching logits [B, 2] of fusion pair "a:b" (a's tokens, then b's)."""
    return self.fusion[fusion_key(pair)](query_tokens, query_valid, context_tokens,
                                         context_valid, train=train)

  def init_all(self, batch, *, train):
    """Runs every part once (towers, heads, local heads, fusion encoders): for init."""
    out = self.details(batch, train=train)
    for pair in fusion_pairs(self):
      a, b = pair.split(":")
      self.match(pair, *out["tokens"][a], *out["tokens"][b], train=train)
    return out


def build_tower(tower_config, where, vocab_size=None, loader=None):
  """A tower from its config dict {name, **kwargs} -> (module, {param path: pretrained params}).

  name="pretrained" goes to `loader.tower(options, where)` (xmodal_jax.pretrained.Loader: a
  Hugging Face folder `path`, `part` for CLIP, the other keys overriding the tower's
  options); name="frames" builds its `image` tower the same way. `where` names the config
  entry in errors.
  """
  kwargs = dict(tower_config)
  name = kwargs.pop("name", None)
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  if name == "pretrained":
    if loader is None:
      raise ValueError(f"{where}: name='pretrained' needs a loader (build_model(..., "
                       "loader=xmodal_jax.pretrained.Loader()))")
    module, params = loader.tower(kwargs, where)
    return module, {(): params}
  if name == "frames":
    if "image" not in kwargs:
      raise ValueError(f"{where}: name='frames' needs image=<an image tower config>")
    image, loaded = build_tower(kwargs.pop("image"), f"{where}.image", loader=loader)
    try:
      module = vision.FrameVideoEncoder(image=image, **kwargs)
    except TypeError as e:
      raise ValueError(f"{where}: {e}") from e
    return module, {("image",) + path: params for path, params in loaded.items()}
  if name not in TOWERS:
    raise ValueError(f"{where}.name={name!r}: expected one of "
                     f"{sorted(TOWERS) + list(BUILT_TOWERS)}")
  if vocab_size is not None and "vocab_size" in TOWERS[name].__dataclass_fields__:
    kwargs["vocab_size"] = vocab_size
  if kwargs.get("token_drop_rate") and not getattr(TOWERS[name], "DROPS_TOKENS", False):
    dropping = sorted(n for n, t in TOWERS.items() if getattr(t, "DROPS_TOKENS", False))
    raise ValueError(f"{where}.token_drop_rate: {name!r} towers do not drop tokens (these "
                     f"do: {dropping}, and frames through its image tower)")
  try:
    return TOWERS[name](**kwargs), {}
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from e


def build_model(model_config, vocab_sizes=None, loader=None):
  """Builds MultiModalModel from `config.model`: {towers: {modality: {name, **kwargs}}}.

  `vocab_sizes` ({modality: int}) fills from-scratch text towers' vocab_size from their
  tokenizers. `loader` (xmodal_jax.pretrained.Loader) loads towers named "pretrained" and,
  for a tower with projection=True, CLIP's projection into the modality's head and CLIP's
  logit scale. Returns (model, pretrained): pretrained maps a param path in the model's
  params (a tuple of names) to the params loaded for it, for `insert_pretrained`.
  """
  towers, pretrained = {}, {}
  for modality, tower_config in model_config.towers.items():
    tower_config = dict(tower_config)
    where = f"config.model.towers.{modality}"
    if tower_config.pop("projection", False):
      if loader is None:
        raise ValueError(f"{where}.projection=True needs a loader "
                         "(xmodal_jax.pretrained.Loader)")
      head, scale, bias = loader.projection(tower_config, where, model_config.embed_dim)
      pretrained[(f"heads_{modality}",)] = head
      pretrained[()] = {"logit_scale": scale}  # every pair's, with per-pair temperatures
      if bias is not None:  # SigLIP's; the model has one with config.model.logit_bias_init
        pretrained[()]["logit_bias"] = bias
    tower, loaded = build_tower(tower_config, where, (vocab_sizes or {}).get(modality), loader)
    towers[modality] = tower
    for path, params in loaded.items():
      pretrained[(f"towers_{modality}",) + path] = params
  options = {key: model_config[key] for key in ("logit_scale_init", "logit_bias_init",
                                               "local_features")
             if model_config[key] is not None}
  if model_config.per_pair_temperature:  # named as losses/pairs.py names pairs
    options["scale_pairs"] = tuple(f"{m}-{n}" for m, n in itertools.combinations(towers, 2))
  model = MultiModalModel(towers=towers, embed_dim=model_config.embed_dim,
                          fusion=build_fusion(model_config.fusion, list(towers)),
                          **options)
  return model, pretrained


def fusion_key(pair):
  """Pair "a:b" -> the name of its fusion encoder's params ("fusion_a-b")."""
  return pair.replace(":", "-")


def fusion_pairs(model):
  """The model's fusion pairs as "a:b"."""
  return [key.replace("-", ":", 1) for key in model.fusion]


def fusion_pair(model, m, n):
  """The model's fusion pair joining modalities `m` and `n` (either order), or None."""
  return next((pair for pair in fusion_pairs(model) if set(pair.split(":")) == {m, n}), None)


def build_fusion(fusion_config, modalities):
  """{pair "a:b": FusionEncoder} from `config.model.fusion` = {pairs: ["a:b", ...],
  width, num_layers, num_heads, mlp_dim, dropout, dtype}."""
  if not fusion_config.pairs:
    return flax.core.FrozenDict()
  options = {k: v for k, v in dict(fusion_config).items() if k != "pairs"}
  if "dtype" in options:
    options["dtype"] = jnp.dtype(options["dtype"])
  encoders = {}
  for pair in fusion_config["pairs"]:
    a, sep, b = pair.partition(":")
    if not sep or a not in modalities or b not in modalities or a == b:
      raise ValueError(f"config.model.fusion.pairs: {pair!r} is not 'a:b' with two of the "
                       f"modalities {modalities}")
    try:
      encoders[fusion_key(pair)] = fusion_lib.FusionEncoder(**options)
    except TypeError as e:
      raise ValueError(f"config.model.fusion: {e}") from e
  return flax.core.FrozenDict(encoders)


def insert_pretrained(params, pretrained):
  """Returns `params` with the loaded params put in place, leaf by leaf.

  `pretrained` maps a path (tuple of names) in `params` to a subtree; each of its leaves must
  exist there with the same shape. Leaves it lacks (a GPO head, say) keep their init.
  """
  params = flax.core.unfreeze(params)
  for path, loaded in pretrained.items():
    for leaf_path, value in flax.traverse_util.flatten_dict(loaded).items():
      node, full = params, path + leaf_path
      for key in full[:-1]:
        if key not in node:
          raise ValueError(f"pretrained param {'/'.join(full)} has no place in the model")
        node = node[key]
      if isinstance(node.get(full[-1]), dict) and np.shape(value) == ():
        node[full[-1]] = {pair: value for pair in node[full[-1]]}  # one scale for each pair
        continue
      if full[-1] not in node or node[full[-1]].shape != value.shape:
        raise ValueError(f"pretrained param {'/'.join(full)} {value.shape} does not fit the "
                         f"model's {getattr(node.get(full[-1]), 'shape', None)}")
      node[full[-1]] = value
  return params
