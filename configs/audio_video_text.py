"""Audio + video + text on the embedded digit-sequences dataset (the default experiment).

Variants (`--config=configs/audio_video_text.py:VARIANT`):
  (none)      the default: InfoNCE over the 3 pairs, GPO pooling on every tower; trains on
              2 CPU cores in about 5 minutes. Test R@1 %, mean of 3 seeds: a->t 90.0,
              a->v 78.1, t->a 86.1, t->v 88.9, v->a 75.4, v->t 89.8 (cls pooling: 84.2,
              67.9, 80.3, 83.7, 66.0, 85.0; benchmarks/README.md, "Alignment ablation").
  regression  the same with similarity regression (PCMR) instead of InfoNCE.
  sigmoid     the same with SigLIP's sigmoid pair loss.
  align_fuse  ALBEF/TCL-style alignment: GPO pooling, momentum queues, ITC + IMS + LMIM +
              matching with hard negatives, beside PCMC's in-batch InfoNCE; a fusion encoder for
              each of the three pairs (matching on audio:video too), and evaluation re-ranks the
              top 16 with them. IMS and LMIM run on text and video only (on audio, with no
              second view, they learn the speaker); momentum 0.9 and a queue of 1,024 (a 0.995
              EMA lags these fast-moving towers); no distillation. Mean of 3 seeds, test R@1 %:
              a->t 91.8, a->v 77.6, t->a 90.8, t->v 89.8, v->a 79.1, v->t 92.8 (a+v->t 97.5),
              against the default's 90.0, 78.1, 86.1, 88.9, 75.4, 89.8 (94.4): ahead on five
              pairs, on audio->video 0.5 below, within the seeds' spread (std 1.4 and 0.9); in
              about three times the time (13-15 minutes). Re-ranking helps text->video (91.6)
              but not audio<->video (70.7 and 69.3: that matching head stays weak).
              docs/methods.md, "The alignment recipe on this data", has each step of the
              diagnosis.
  tiny        a few steps of a smaller model, for tests and smoke runs; records are read per
              batch (data.cache=False): a few steps read far fewer than the whole split,
              which caching would read and hold first (4 s for the digits' 9,000 items).
  pod         pod scale: AST-B audio (10 s at 16 kHz), ViT-B/16 frames video (8 frames at
              224), CLIP text-B; bfloat16, rematerialized blocks, blockwise loss, the state
              sharded 16 ways (fsdp), global batch 32,768 in 4 micro-batches (gradient
              caching: the loss still sees all 32,768). Data: VALOR-1M (Chen et
              al., 2023: 1.18M AudioSet clips, each with an audio-visual caption; a global
              batch is 3% of it; VALOR-32K, its 32k-clip benchmark, would be one batch),
              built by the
              manifest builder from one line per clip, {"id": ..., "split": ..., "audio":
              "clips/ID.mp4", "video": "clips/ID.mp4", "text": "the caption"} (the audio is
              the clip's own track):
                python -m xmodal_jax.data.build --manifest=valor.jsonl --name=valor \
                    --modalities=audio:audio,video:video,text:text --video_frames=8 \
                    --frame_size=256 --data_dir=DATA
              then --config.data.data_dir=DATA --config.modalities.text.tokenizer=CLIP_FOLDER.
              Check the fit first: python launch/compile.py
              --config=configs/audio_video_text.py:pod --topology=v5e:16x16 (8.5 GiB per
              chip of 16 on a v5e-256, 47% free; without gradient caching 21.4 GiB of
              temporaries: benchmarks/README.md).
  mixture     training mixes three datasets that each hold some of the modalities
              (config.data.sources; docs/guide.md, "Mixtures"), at :pod's model and batch:
                audiocaps  weight 0.05  audio + text   AudioCaps train, 49.8k clips with
                                                       human-written sound captions
                webvid     weight 0.35  video + text   a WebVid-style video-text set
                valor      weight 0.60  all three      VALOR-1M, 1.18M clips
              VALOR is the only source of audio-video pairs and gives all three pairs per
              row, so it has most of each batch. Over the 2,000 steps of 32,768 rows the
              weights are 39.3M VALOR rows (33 passes over it), 22.9M WebVid rows (2.3
              passes over 10M clips) and 3.3M AudioCaps rows (66 passes: more would
              memorize its 49.8k clips; it is there for captions about sounds, which
              VALOR's audio-visual captions rarely give). Builds: AudioCaps by its adapter
              (python -m xmodal_jax.data.build --dataset=audiocaps ...), WebVid (as
              webvid_clips: TFDS has its own builder named webvid) and VALOR by the
              manifest builder (one line per clip, as :pod shows), all in
              config.data.data_dir. Evaluation: retrieval on VALOR's test (every pair),
              AudioCaps' test (audio-text) and MSR-VTT's 1k-A test (video-text, its
              adapter).
              With :tiny, the same three sources are slices of the embedded digit
              sequences' train split (audio + text, video + text, all three), and the
              second evaluation is audio-text retrieval on its test split.
Variants combine with commas: `:tiny,regression`.
"""

import ml_collections

from configs import recipes, sizes, variants
from xmodal_jax import schema

VARIANTS = ("tiny", "regression", "sigmoid", "align_fuse", "pod", "mixture")

# The mixture's sources: (weight, modalities the source provides; None: all three).
MIXTURE = {"audiocaps": (0.05, ("audio", "text")), "webvid": (0.35, ("video", "text")),
           "valor": (0.60, None)}
# Each source's dataset name (a manifest-built dataset is named apart from TFDS's builders).
MIXTURE_DATASETS = {"audiocaps": "audiocaps", "webvid": "webvid_clips", "valor": "valor"}


def tower(name, **kwargs):
  # GPO pooling: +4.8 to +10.2 points of R@1 on every pair over cls, mean of 3 seeds (std at
  # most 1.7; benchmarks/README.md, "Alignment ablation").
  drop = {} if name == "text_transformer" else sizes.DROP  # patch towers drop tokens
  return dict(name=name, width=64, num_layers=2, num_heads=4, mlp_dim=128, dropout=0.0,
              pooling="gpo", gpo_drop_rate=0.0, dtype="float32", remat=False, **drop,
              **kwargs)


def get_config(variant=""):
  v = variants.parse(variant, VARIANTS, "configs/audio_video_text.py")
  config = schema.defaults()

  placeholder = ml_collections.config_dict.placeholder
  # cache: keep the training split's records in memory; shuffle_buffer: captions="expand" only.
  config.data.update(name="digit_sequences", data_dir=placeholder(str), train_split="train",
                     eval_split="test", shuffle_buffer=10_000, cache=True)
  config.modalities = dict(
      audio=dict(kind="audio", feature="audio", num_samples=25_600),
      video=dict(kind="video", feature="video", num_frames=4, frame_size=8, channels=1,
                 sampling="uniform", max_shift=0),
      text=dict(kind="text", feature="text", tokenizer="digit_words", max_length=8),
  )
  config.model.update(
      embed_dim=64,
      logit_scale_init=placeholder(float),  # unset: the model's log(1 / 0.07), as CLIP
      logit_bias_init=placeholder(float),  # sigmoid loss only
      towers=dict(
          audio=tower("audio_transformer", sample_rate=8000, patch_frames=8, fft_length=256,
                      hop_length=160, num_mels=40),
          video=tower("video_transformer", patch_size=8),
          text=tower("text_transformer"),
      ),
  )
  # Written out (all 1, the default) so that a flag can set one:
  # --config.loss.pair_weights['audio-video']=2.0
  config.loss.pair_weights = {"audio-text": 1.0, "audio-video": 1.0, "text-video": 1.0}

  config.batch_size = 256
  config.eval_batch_size = 512  # divides over 1, 2, 4, 8, ... devices
  config.total_steps = 1500
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100, end_learning_rate_ratio=0.01,
                          weight_decay=0.05, b1=0.9, b2=0.98, grad_clip_norm=1.0)

  # Evaluators by name (xmodal_jax/eval/evaluators.py). Retrieval's fused queries: "all"
  # subsets of 2..M-1 modalities, "none", or a list such as ["audio+video"]; each queries
  # every modality outside it.
  config.evals = dict(retrieval=recipes.retrieval_eval(every=500))

  config.log_every = 50
  config.checkpoint_every = 250
  config.keep_checkpoints = 2

  if v.regression:
    config.loss.weights = dict(contrastive=0.0, regression=1.0)
  if v.sigmoid:
    config.loss.kind = "sigmoid"
    config.model.logit_scale_init = 2.302585  # log(10), as SigLIP
    config.model.logit_bias_init = -10.0
  if v.align_fuse:
    recipes.align_fuse(config, fusion=dict(pairs=("text:audio", "text:video", "audio:video"),
                                           width=64, num_layers=2, num_heads=4, mlp_dim=128),
                       rerank_k=16, distill_ramp_steps=500)
    # Measured best (docs/methods.md, "The alignment recipe on this data"): PCMC's InfoNCE beside
    # the alignment terms; IMS / LMIM off for audio, where they learn the speaker; a fresh EMA
    # and a short queue (1,500 steps at learning rate 2e-3 move the towers far faster than
    # a 0.995 EMA follows: its keys lag, and ITC alone loses 30-40 points to that); and no
    # distillation (its targets come from the same lagging model).
    config.loss.weights.contrastive = 1.0
    config.loss.intra_modalities = ("text", "video")
    config.alignment.update(momentum=0.9, queue_size=1_024, distill_alpha=0.0)
  if v.tiny:
    config.model.embed_dim = 32
    for t in config.model.towers.values():
      # cls: GPO's GRU adds compile time to every test that builds this (test_pooling.py and
      # test_towers.py check GPO itself).
      t.update(width=32, num_layers=1, num_heads=2, mlp_dim=64, pooling="cls")
    config.batch_size = 16
    config.data.cache = False
    config.eval_batch_size = 200
    config.data.shuffle_buffer = 256
    config.total_steps = 6
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    for evaluator in config.evals.values():
      evaluator.every = 6
    config.checkpoint_every = 3
  if v.mixture:
    mixture(config, tiny=v.tiny)
  if v.pod or (v.mixture and not v.tiny):
    if v.tiny:
      raise ValueError("configs/audio_video_text.py: :pod and :tiny do not combine")
    config.data.update(name="valor", train_split="train", eval_split="test", cache=False)
    config.modalities = dict(
        audio=dict(kind="audio", feature="audio", num_samples=160_000),
        video=dict(kind="video", feature="video", num_frames=8, frame_size=224, channels=3,
                   sampling="random", max_shift=0),
        text=dict(kind="text", feature="text", tokenizer="", max_length=77,
                  captions="sample"))
    pod = dict(dtype="bfloat16", remat=True)
    config.model.embed_dim = 512
    config.model.towers = dict(audio=sizes.ast("B", **pod),
                               video=sizes.frames("B", num_frames=8) | dict(
                                   image=sizes.vit("B", **pod)),
                               text=sizes.clip_text("B", **pod))
    config.loss.impl, config.loss.block_size = "blockwise", 4096
    config.mesh = dict(data=-1, fsdp=16)  # as configs/image_text.py:L (16, not every chip)
    config.batch_size = config.eval_batch_size = 32_768
    config.grad_accum_steps = 4  # 128 rows per chip: 21.4 GiB of activations at once
    config.total_steps = 2_000  # about 55 passes over VALOR-1M's 1.18M clips
    config.optimizer.update(learning_rate=5e-4, warmup_steps=200)
    for evaluator in config.evals.values():
      evaluator.every = 500
    config.checkpoint_every = 100
  return config


def mixture(config, tiny):
  """config.data.sources and the other datasets' evaluators of the :mixture variant."""
  data_dir = config.data.get_ref("data_dir")
  slices = {"audiocaps": "train[:40%]", "webvid": "train[40%:80%]", "valor": "train[80%:]"}
  config.data.sources = {
      name: dict(name="digit_sequences" if tiny else MIXTURE_DATASETS[name], data_dir=data_dir,
                 split=slices[name] if tiny else "train", weight=weight,
                 features={m: m for m in modalities} if modalities else {})
      for name, (weight, modalities) in MIXTURE.items()}
  every = config.evals.retrieval.every
  if tiny:
    config.evals.speech = recipes.retrieval_eval(
        every=every, data=dict(name="digit_sequences", data_dir=data_dir, split="test"),
        features=dict(audio="audio", text="text"), prefix="speech/test")
  else:
    config.evals.audiocaps = recipes.retrieval_eval(
        every=every, data=dict(name="audiocaps", data_dir=data_dir, split="test"),
        features=dict(audio="audio", text="text"))
    config.evals.msrvtt = recipes.retrieval_eval(
        every=every, data=dict(name="msrvtt", data_dir=data_dir, split="test"),
        features=dict(video="video", text="text"))
