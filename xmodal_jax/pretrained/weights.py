"""A Hugging Face folder's tensors, read once and named canonically, and the small converters
every family shares (dense, layer norm, attention, convolutions, activations)."""

import json
import os
import re

import numpy as np

from xmodal_jax.models import transformer

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
  if not isinstance(act, str) or act not in transformer.ACTIVATIONS:
    raise ValueError(f"{field}={act!r} is not supported (expected one of "
                     f"{sorted(transformer.ACTIVATIONS)})")
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
