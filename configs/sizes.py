"""Tower presets by size: tiny (CPU tests), B/16-, L/14-, g/14-, bigG/14- and e/14-sized
(accelerators).

Each function returns a tower config dict for `config.model.towers.<modality>`; keyword
arguments override any field (dtype, remat, pooling, dropout, ...). Widths, depths and heads
follow ViT-B/16, ViT-L/14, ViT-g/14 (1.0B parameters: width 1408, 40 blocks, MLP 6144,
as in Zhai et al., "Scaling Vision Transformers") and OpenCLIP's ViT-bigG/14 (1.8B: width
1664, 48 blocks, MLP 8192), a ViT-e/14-class tower (3.9B: width 1792, 56 blocks, MLP 15360, as
in Chen et al., PaLI), BERT-base, CLIP's text transformers (OpenCLIP's for g: width
1024, 24 blocks; for bigG: width 1280, 32 blocks, 20 heads), AST-base and wav2vec 2.0 /
HuBERT base and large.
"""

TRUNKS = {
    "tiny": dict(width=32, num_layers=2, num_heads=2, mlp_dim=64),
    "B": dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "g": dict(width=1408, num_layers=40, num_heads=16, mlp_dim=6144),
    "bigG": dict(width=1664, num_layers=48, num_heads=16, mlp_dim=8192),
    "e": dict(width=1792, num_layers=56, num_heads=16, mlp_dim=15360),
}
CLIP_TEXT_TRUNKS = {  # The text towers CLIP pairs with ViT-B and ViT-L.
    "tiny": TRUNKS["tiny"],
    "B": dict(width=512, num_layers=12, num_heads=8, mlp_dim=2048),
    "L": dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "g": dict(width=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "bigG": dict(width=1280, num_layers=32, num_heads=20, mlp_dim=5120),
}
PATCH = {"tiny": 4, "B": 16, "L": 14, "g": 14, "bigG": 14, "e": 14}
COMMON = dict(dtype="float32", remat=False, dropout=0.0, pooling="cls")
# Written out (off) for the patch towers, so that a flag can turn FLIP's token dropping on:
# --config.model.towers.image.token_drop_rate=0.5
DROP = dict(token_drop_rate=0.0)
SIZES = tuple(TRUNKS)


def check(size):
  if size not in TRUNKS:
    raise ValueError(f"model size {size!r}: expected one of {SIZES}")


def vit(size, image_size=224, **kwargs):
  """A ViT image tower (HF ViTModel layout) at `size`: B -> ViT-B/16, L -> ViT-L/14,
  g -> ViT-g/14."""
  check(size)
  return dict(name="vit", image_size=(image_size, image_size), patch_size=PATCH[size],
              **TRUNKS[size], **COMMON, **DROP) | kwargs


def bert(size, vocab_size=30522, **kwargs):
  """A BERT-style text tower (post-LN) at `size`; B is BERT-base, L is BERT-large."""
  check(size)
  return dict(name="bert", vocab_size=vocab_size, **TRUNKS[size], **COMMON) | kwargs


def clip_text(size, vocab_size=49408, **kwargs):
  """CLIP's causal text transformer at `size` (B: 512 wide, L: 768 wide, 12 layers; g:
  1024 wide, 24 layers)."""
  check(size)
  return dict(name="clip_text", vocab_size=vocab_size, eos_token_id=vocab_size - 1,
              **CLIP_TEXT_TRUNKS[size], **COMMON) | dict(pooling="eos") | kwargs


def ast(size, num_mels=128, max_frames=1024, **kwargs):
  """An Audio Spectrogram Transformer (16x16 patches, stride 10) at `size`."""
  check(size)
  return dict(name="ast", num_mels=num_mels, max_frames=max_frames,
              patch_size=16 if size != "tiny" else 8, patch_stride=(10, 10),
              **TRUNKS[size], **COMMON, **DROP) | dict(pooling="pooler") | kwargs


def speech(size, **kwargs):
  """A wav2vec 2.0 / HuBERT speech tower at `size` (B: their base, 7 convolutions to 512
  channels, one frame per 20 ms at 16 kHz; L: their large, stable layer norm); tiny has two
  small convolutions. Mean pooling over the frames."""
  check(size)
  convs = (dict(conv_channels=(16, 16), conv_kernels=(10, 4), conv_strides=(5, 2),
                pos_conv_kernel=8, pos_conv_groups=2) if size == "tiny" else
           dict(feature_norm="layer", stable_layer_norm=True) if size in ("L", "g") else {})
  return dict(name="speech", **TRUNKS[size], **COMMON) | convs | dict(pooling="mean") | kwargs


def frames(size, num_frames=8, temporal="mean", image_size=224, **kwargs):
  """Video as `num_frames` frames through a ViT at `size`, then temporal mean/transformer."""
  return dict(name="frames", image=vit(size, image_size), num_frames=num_frames,
              temporal=temporal, temporal_heads=TRUNKS[size]["num_heads"], **kwargs)


def features(size, **kwargs):
  """An MLP (or a transformer, for sequences) over precomputed features."""
  check(size)
  return dict(name="features", **TRUNKS[size], **COMMON) | dict(num_layers=2) | kwargs
