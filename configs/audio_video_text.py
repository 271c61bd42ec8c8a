"""Audio + video + text on the embedded digit-sequences dataset (the default experiment).

Variants (`--config=configs/audio_video_text.py:VARIANT`):
  (none)      the default: trains on 2 CPU cores in minutes, R@1 >= 50% on every pair.
  regression  the same with seed 000's similarity regression (PCMR) instead of InfoNCE.
  sigmoid     the same with SigLIP's sigmoid pair loss.
  align_fuse  seed 001: GPO pooling, momentum queues, ITC + IMS + LMIM + matching with hard
              negatives; evaluation also re-ranks the top 16 with the matching head. On
              this data add seed 000's in-batch InfoNCE (--config.loss.weights.contrastive=1):
              without it audio stays far behind (ablation in the issue 7 note).
  tiny        a few steps of a smaller model, for tests and smoke runs.
Variants combine with commas: `:tiny,regression`.
"""

import ml_collections

from configs import recipes


def tower(name, **kwargs):
  return dict(name=name, width=64, num_layers=2, num_heads=4, mlp_dim=128, dropout=0.0,
              pooling="cls", gpo_drop_rate=0.0, dtype="float32", remat=False, **kwargs)


def get_config(variant=""):
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="digit_sequences", data_dir=ml_collections.config_dict.placeholder(str),
                     train_split="train",
                     eval_split="test", shuffle_buffer=10_000, cache=True)
  config.modalities = dict(
      audio=dict(kind="audio", feature="audio", num_samples=25_600),
      video=dict(kind="video", feature="video", num_frames=4, frame_size=8, channels=1,
                 sampling="uniform", max_shift=0),
      text=dict(kind="text", feature="text", tokenizer="digit_words", max_length=8),
  )
  config.model = dict(
      embed_dim=64,
      logit_scale_init=2.659260,  # log(1 / 0.07), as CLIP
      logit_bias_init=ml_collections.config_dict.placeholder(float),  # sigmoid loss only
      towers=dict(
          audio=tower("audio_transformer", sample_rate=8000, patch_frames=8, fft_length=256,
                      hop_length=160, num_mels=40),
          video=tower("video_transformer", patch_size=8),
          text=tower("text_transformer"),
      ),
  )
  config.loss = recipes.loss_defaults()

  config.batch_size = 256
  config.eval_batch_size = 500
  config.total_steps = 1500
  config.optimizer = dict(learning_rate=2e-3, warmup_steps=100, end_learning_rate_ratio=0.01,
                          weight_decay=0.05, b1=0.9, b2=0.98, grad_clip_norm=1.0)

  # Fused queries (METHODS.md): "all" subsets of 2..M-1 modalities, "none", or a list such
  # as ["audio+video"]; each queries every modality outside it.
  config.eval = dict(fused="all", rerank_k=0)
  config.alignment = recipes.alignment_defaults()

  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2

  variants = set(filter(None, variant.split(",")))
  unknown = variants - {"tiny", "regression", "sigmoid", "align_fuse"}
  if unknown:
    raise ValueError(f"configs/audio_video_text.py: unknown variant(s) {sorted(unknown)}; "
                     "expected tiny, regression, sigmoid, align_fuse")
  if "regression" in variants:
    config.loss.weights = dict(contrastive=0.0, regression=1.0)
  if "sigmoid" in variants:
    config.loss.kind = "sigmoid"
    config.model.logit_scale_init = 2.302585  # log(10), as SigLIP
    config.model.logit_bias_init = -10.0
  if "align_fuse" in variants:
    recipes.align_fuse(config, fusion=dict(pairs=["text:audio", "text:video"], width=64,
                                           num_layers=2, num_heads=4, mlp_dim=128),
                       rerank_k=16, distill_ramp_steps=500)
    # 9,000 training items: a 65,536 queue would hold every item 7 times over, mostly stale.
    config.alignment.queue_size = 4_096
  if "tiny" in variants:
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
  return config
