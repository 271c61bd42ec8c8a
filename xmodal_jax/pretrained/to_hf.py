"""Our towers -> Hugging Face folders in their family's layout, the inverse of `hf.convert`
(run_to_hf.py writes a whole run's).

The inverse is not written out per family: each family's converter (families/) runs once
on checkpoint tensors that hold their own element numbers, so every parameter it returns says
which elements of which checkpoint tensor it came from, and our values are written back
there. One converter thus serves both directions, and a tensor that would be left unwritten
(or a parameter with no place) is an error, never a silent zero. The one exception is a key
bias where the layout has none (Whisper's): it cannot change the attention, so it is dropped.
"""

import importlib
import os

import numpy as np

from xmodal_jax.models import audio, speech, text, vision
from xmodal_jax.pretrained.families import bert, clip, siglip, vit, wav2vec2, whisper
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
      # A bias added to every key (Whisper's keys have none) shifts each query's logits by
      # one constant, which softmax ignores: it is dropped, not refused.
      if path[-2:] != ("key", "bias") and not np.array_equal(value, index):
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
  if isinstance(tower, text.CausalTextEncoder) and not tower.causal:  # SigLIP's
    require(tower, where, pooling="last")
    if not tower.projection_size:
      raise ValueError(f"{where}: a bidirectional CausalTextEncoder has SigLIP's layout only "
                       "with its text head (projection_size > 0)")
    return ("SiglipTextConfig", trunk(tower) | dict(
        vocab_size=tower.vocab_size, max_position_embeddings=tower.max_positions,
        projection_size=tower.projection_size, attention_dropout=dropouts(
            tower, "dropout", "attention_dropout")["attention_dropout"]),
            "SiglipTextModel", {}, siglip.siglip_text_params)
  if isinstance(tower, text.CausalTextEncoder):
    require(tower, where, pooling="eos", projection_size=0)
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
  if isinstance(tower, speech.SpeechTransformer):
    family = "Wav2Vec2" if tower.feature_projection_norm else "Hubert"  # HuBERT's may lack it
    return (f"{family}Config", trunk(tower) | dict(
        conv_dim=tuple(tower.conv_channels), conv_kernel=tuple(tower.conv_kernels),
        conv_stride=tuple(tower.conv_strides), conv_bias=tower.conv_bias,
        feat_extract_norm=tower.feature_norm, feat_extract_activation=tower.feature_activation,
        num_conv_pos_embeddings=tower.pos_conv_kernel,
        num_conv_pos_embedding_groups=tower.pos_conv_groups,
        do_stable_layer_norm=tower.stable_layer_norm, mask_time_prob=tower.mask_time_prob,
        mask_time_length=tower.mask_time_length,
        **({} if tower.feature_projection_norm else dict(feat_proj_layer_norm=False)),
        **dropouts(tower, "hidden_dropout", "attention_dropout")), f"{family}Model", {},
            wav2vec2.speech_params)
  if isinstance(tower, speech.WhisperEncoder):
    require(tower, where, max_frames=2 * tower.max_positions, layer_norm_eps=1e-5)
    if tower.max_frames % 100:
      raise ValueError(f"{where}: max_frames={tower.max_frames}: WhisperFeatureExtractor's "
                       "windows are whole seconds (a multiple of 100 frames)")
    return ("WhisperConfig", dict(
        d_model=tower.width, encoder_layers=tower.num_layers,
        encoder_attention_heads=tower.num_heads, encoder_ffn_dim=tower.mlp_dim,
        num_mel_bins=tower.num_mels, max_source_positions=tower.max_positions,
        activation_function=tower.activation, **dropouts(tower, "dropout", "attention_dropout")),
            whisper.ENCODER_ONLY, {}, whisper.whisper_params)
  if type(tower) is vision.PatchTransformer:  # pylint: disable=unidiomatic-typecheck
    height, width = tower.input_size()
    if height != width or (tower.patch_stride and tuple(tower.patch_stride) != (
        tower.patch_size,) * 2):
      raise ValueError(f"{where}: only square images and non-overlapping patches have a "
                       "Hugging Face ViT / CLIP / SigLIP layout")
    common = trunk(tower) | dict(image_size=height, patch_size=tower.patch_size,
                                 num_channels=tower.num_channels)
    if tower.pooler == "map":  # SigLIP's vision tower
      require(tower, where, num_prefix_tokens=0, patch_bias=True, pre_norm=False,
              final_norm="tokens", pooling="pooler")
      return ("SiglipVisionConfig", common | dict(attention_dropout=dropouts(
          tower, "dropout", "attention_dropout")["attention_dropout"]),
              "SiglipVisionModel", {}, siglip.siglip_vision_params)
    if tower.num_prefix_tokens != 1:
      raise ValueError(f"{where}: ViT and CLIP layouts have one [CLS] token, not "
                       f"{tower.num_prefix_tokens}")
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
                   "and SigLIP text and vision, ViT, BERT, AST, wav2vec 2.0, HuBERT and "
                   "Whisper's encoder do); launch/convert.py "
                   "--to=jax exports it")


def model_shapes(model_class, config, **kwargs):
  """{state-dict name: shape} of a transformers model, built on torch's meta device."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(whisper.MODEL_MODULE) if (
      model_class == whisper.ENCODER_ONLY) else transformers
  with torch.device("meta"):
    model = getattr(module, model_class)(config, **kwargs)
  return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def tower_folder(tower, params, out, where):
  """Writes `tower` as the Hugging Face folder of its family (config.json and
  model.safetensors); `load_hf(out, pooling=...)` reads the same params back (wav2vec 2.0's
  weight-normed convolution to within float32 rounding, everything else bit for bit)."""
  import transformers  # pylint: disable=g-import-not-at-top
  config_class, config_kwargs, model_class, model_kwargs, params_fn = layout(tower, where)
  config = getattr(transformers, config_class)(**config_kwargs)
  shapes = model_shapes(model_class, config, **model_kwargs)
  # The names the converter reads: Whisper's encoder saved alone lacks its "encoder."
  # prefix; the weight-normed convolution is traced as the plain weight it computes.
  prefix = whisper.ENCODER_PREFIX if model_class == whisper.ENCODER_ONLY else ""
  shapes, weight_normed = wav2vec2.plain_weight_shapes(shapes)
  tensors = checkpoint_tensors(params_fn, tower, {prefix + k: v for k, v in shapes.items()},
                               params, where)
  tensors = {k[len(prefix):]: v for k, v in tensors.items()}
  if weight_normed:
    tensors = wav2vec2.weight_norm_parts(tensors)
  save_folder(config, model_class, tensors, out)
  return tensors


def save_folder(config, model_class, tensors, out):
  """config.json (naming `model_class`) and model.safetensors in folder `out`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  config.architectures = [model_class]
  config.save_pretrained(out)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata=SAFETENSORS_METADATA)


def projection_file(head, out):
  """The head as a torch Linear's tensors (weight [P, W], bias [P]) in projection.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"weight": np.asarray(head["kernel"], np.float32).T.copy(),
             "bias": np.asarray(head["bias"], np.float32)},
            os.path.join(out, "projection.safetensors"), metadata=SAFETENSORS_METADATA)
