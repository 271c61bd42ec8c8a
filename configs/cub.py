"""PCMC's CUB-200 experiment (Sánchez and Laguna, arXiv 2401.16347): bird photos, their
descriptions and their species' class embedding coordinated in one space, evaluated on all
six pairs and on fused queries, plus zero-shot species classification of the photos.

Files (docs of the `cub200` builder, xmodal_jax/data/builders/benchmarks.py):
CUB_200_2011.tgz, Reed et al.'s descriptions (cvpr2016_cub.tar.gz, its text_c10/ folder) and
a local CLIP folder (openai/clip-vit-base-patch32 or any CLIPModel):

  python -m xmodal_jax.data.build --dataset=cub200 --manual_dir=CUB --data_dir=DATA
  python launch/train.py --config=configs/cub.py --workdir=runs/cub \
      --config.data.data_dir=DATA --config.model.towers.image.path=CLIP \
      --config.model.towers.text.path=CLIP

The class embedding ("attributes") is the species' 312 continuous attributes (CUB's
class_attribute_labels_continuous.txt, 0-1), through a 2-layer MLP. It describes a species,
not a photo, so retrieval matches it by species (`class_level`): photo -> attributes ranks
the 200 species (R@1 is the classification accuracy by class embedding), attributes -> photo
queries once per species and any photo of it counts. With CLIP ViT-B/32: 87.5M (image) +
63.2M (text) + 1.9M (attributes MLP) parameters plus the heads: 153,435,905 in all (a test
counts them from CLIP's config.json; the run prints it).

The paper reports R@1/5/10 per pair and for fused queries; its numbers are in the paper,
not in this repository: compare the final table of `launch/evaluate.py` against it.

Variants (`--config=configs/cub.py:VARIANT`):
  (none)      N-way contrastive (PCMC) on the three pairs.
  regression  similarity regression (PCMR) instead.
  tiny        tiny from-scratch towers on 32 x 32 images, for tests on small files in the
              real layout.
"""

import ml_collections

from configs import recipes, sizes, variants
from xmodal_jax import schema

VARIANTS = ("regression", "tiny")


def get_config(variant=""):
  v = variants.parse(variant, VARIANTS, "configs/cub.py")
  placeholder = ml_collections.config_dict.placeholder
  config = schema.defaults()
  config.data.update(name="cub200", data_dir=placeholder(str), train_split="train",
                     eval_split="test", shuffle_buffer=6_000, cache=False)
  config.modalities = dict(
      **recipes.clip_modalities(),
      attributes=dict(kind="features", feature="attributes", shape=(312,)),
  )
  config.model.update(
      embed_dim=512,
      logit_scale_init=placeholder(float),  # unset: CLIP's, loaded with its projections
      logit_bias_init=placeholder(float),
      towers=dict(image=recipes.clip_tower("vision"), text=recipes.clip_tower("text"),
                  attributes=sizes.features("B", width=512, mlp_dim=1024)),
  )
  config.train_policy = recipes.clip_policy()
  if v.regression:
    config.loss.weights = dict(contrastive=0.0, regression=1.0)
  config.batch_size = 128
  config.eval_batch_size = 512
  config.total_steps = 4_700  # about 100 epochs of 5,994 photos
  config.optimizer.update(learning_rate=1e-4, warmup_steps=300, end_learning_rate_ratio=0.0,
                          weight_decay=0.05, b1=0.9, b2=0.98, grad_clip_norm=1.0)
  config.evals = dict(
      retrieval=recipes.retrieval_eval(every=1_000),
      zeroshot=schema.evaluator(
          "zeroshot", every=1_000, modality="image",
          templates=("a photo of a {}, a type of bird.", "a photo of the {}.")))
  config.evals.retrieval.class_level = ("attributes",)
  config.log_every = 50
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 2

  if v.tiny:
    config.modalities.image.image_size = 32
    config.modalities.text.update(tokenizer="digit_words", max_length=8)
    config.model.embed_dim = 32
    config.model.towers = dict(image=sizes.vit("tiny", image_size=32),
                               text=sizes.bert("tiny", vocab_size=64),
                               attributes=sizes.features("tiny"))
    config.train_policy = {}
    recipes.tiny_schedule(config)
  return config
