"""Audio + video + text on the embedded digit-sequences dataset (the default experiment).

Variants (`--config=configs/audio_video_text.py:VARIANT`):
  (none)  the default: trains on 2 CPU cores in minutes, R@1 >= 50% on every pair.
  tiny    a few steps of a smaller model, for tests and smoke runs.
"""

import ml_collections


def tower(name, **kwargs):
  return dict(name=name, width=64, num_layers=2, num_heads=4, mlp_dim=128, dropout=0.0,
              pooling="cls", dtype="float32", remat=False, **kwargs)


def get_config(variant=""):
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="digit_sequences", data_dir=ml_collections.config_dict.placeholder(str),
                     train_split="train",
                     eval_split="test", shuffle_buffer=10_000, cache=True)
  config.modalities = dict(
      audio=dict(kind="audio", feature="audio", num_samples=25_600),
      video=dict(kind="video", feature="video", max_shift=1),
      text=dict(kind="text", feature="text", tokenizer="digit_words", max_length=8),
  )
  config.model = dict(
      embed_dim=64,
      towers=dict(
          audio=tower("audio_transformer", sample_rate=8000, patch_frames=8, fft_length=256,
                      hop_length=160, num_mels=40),
          video=tower("video_transformer", patch_size=4),
          text=tower("text_transformer"),
      ),
  )
  config.loss = dict(kind="softmax", pair_weights={})

  config.batch_size = 256
  config.eval_batch_size = 500
  config.total_steps = 2000
  config.optimizer = dict(learning_rate=2e-3, warmup_steps=100, end_learning_rate_ratio=0.01,
                          weight_decay=0.05, b1=0.9, b2=0.98, grad_clip_norm=1.0)

  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2

  if variant == "tiny":
    config.model.embed_dim = 32
    for t in config.model.towers.values():
      t.update(width=32, num_layers=1, num_heads=2, mlp_dim=64)
    config.batch_size = 16
    config.eval_batch_size = 200
    config.data.shuffle_buffer = 256
    config.total_steps = 6
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 6
    config.checkpoint_every = 3
  elif variant:
    raise ValueError(f"configs/audio_video_text.py: unknown variant {variant!r}; "
                     "expected '' or 'tiny'")
  return config
