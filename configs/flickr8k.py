"""PCMC's Flickr8k experiment (Sánchez and Laguna, arXiv 2401.16347): image, written
caption and spoken caption coordinated in one space, evaluated on all six pairs and on
fused queries (two modalities as one query).

Files (docs of the `flickr8k_audio` builder, xmodal_jax/data/builders/benchmarks.py): the
Flickr8k images (Flickr8k_Dataset.zip), Karpathy's dataset_flickr8k.json and the Flickr8k
Audio Caption Corpus (flickr_audio.tar.gz, 40,000 spoken captions, Harwath and Glass 2015),
plus two local Hugging Face folders: a CLIP checkpoint (openai/clip-vit-base-patch32 or any
CLIPModel) and a wav2vec 2.0 or HuBERT one (facebook/wav2vec2-base, facebook/hubert-base-
ls960, ...):

  python -m xmodal_jax.data.build --dataset=flickr8k_audio --manual_dir=FLICKR8K \
      --data_dir=DATA --sample_rate=16000
  python launch/train.py --config=configs/flickr8k.py --workdir=runs/flickr8k \
      --config.data.data_dir=DATA --config.model.towers.image.path=CLIP \
      --config.model.towers.text.path=CLIP --config.model.towers.audio.path=WAV2VEC2

One example per spoken caption (30,000 in training); at test, the 1,000 Karpathy test images
each count once, with their 5,000 spoken and written captions. With CLIP ViT-B/32 and a
base speech model the towers hold 87.5M (image) + 63.2M (text) + 94.4M (speech)
parameters, plus the three heads into the 512-wide space (CLIP's own for image and text):
246,043,649 in all (a test counts them from the folders' config.json; the run prints it).

The paper reports R@1/5/10 for each pair and for fused queries (e.g. image + speech ->
text); its numbers are in the paper, not in this repository: compare the final table of
`launch/evaluate.py` (rows "image->text", "audio+image->text", ...) against it.

Variants (`--config=configs/flickr8k.py:VARIANT`):
  (none)      N-way contrastive (PCMC): InfoNCE on the three pairs.
  regression  similarity regression (PCMR) instead.
  tiny        tiny from-scratch towers (32 x 32 images, a two-convolution speech tower), for
              tests on small files in the real layout.
"""

import ml_collections

from configs import recipes, sizes, variants
from xmodal_jax import schema

VARIANTS = ("regression", "tiny")


def get_config(variant=""):
  v = variants.parse(variant, VARIANTS, "configs/flickr8k.py")
  placeholder = ml_collections.config_dict.placeholder
  config = schema.defaults()
  config.data.update(name="flickr8k_audio", data_dir=placeholder(str), train_split="train",
                     eval_split="test", shuffle_buffer=30_000, cache=False)
  config.modalities = dict(
      **recipes.clip_modalities(),
      # 8 s at 16 kHz: the spoken captions last 4.3 s on average.
      audio=dict(kind="audio", feature="audio", num_samples=128_000),
  )
  # The speech tower trains but for its convolutional frontend (as their fine-tuning does).
  config.model.update(
      embed_dim=512,
      logit_scale_init=placeholder(float),  # unset: CLIP's, loaded with its projections
      logit_bias_init=placeholder(float),
      towers=dict(image=recipes.clip_tower("vision"), text=recipes.clip_tower("text"),
                  audio=dict(name="pretrained", path=placeholder(str), pooling="mean",
                             dtype="bfloat16")),
  )
  config.train_policy = dict(**recipes.clip_policy(),
                             audio=dict(trainable=("(?!feature_encoder/).*",)))
  if v.regression:
    config.loss.weights = dict(contrastive=0.0, regression=1.0)
  config.batch_size = 256
  config.eval_batch_size = 512
  config.total_steps = 6_000  # about 50 epochs of 30,000 spoken captions
  config.optimizer.update(learning_rate=1e-4, warmup_steps=500, end_learning_rate_ratio=0.0,
                          weight_decay=0.05, b1=0.9, b2=0.98, grad_clip_norm=1.0)
  config.evals = dict(retrieval=recipes.retrieval_eval(every=1_000))
  config.log_every = 50
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 2

  if v.tiny:
    config.modalities.image.image_size = 32
    config.modalities.text.update(tokenizer="digit_words", max_length=8)
    config.modalities.audio.num_samples = 4_000
    config.model.embed_dim = 32
    config.model.towers = dict(image=sizes.vit("tiny", image_size=32),
                               text=sizes.bert("tiny", vocab_size=64),
                               audio=sizes.speech("tiny"))
    config.train_policy = {}
    recipes.tiny_schedule(config)
  return config
