"""Objective recipes shared by the experiment configs."""

import ml_collections

from xmodal_jax import schema


def retrieval_eval(every, **options):
  """A retrieval evaluator: every ordered pair and every fused query (docs/methods.md) on
  config.data.eval_split (or the dataset `options` name), every `every` steps and at the
  end."""
  return schema.evaluator("retrieval", every=every, **options)


def align_fuse(config, *, fusion, rerank_k, distill_ramp_steps):
  """ALBEF/TCL-style alignment (docs/methods.md) on `config`, TCL's weighting: (ITC both ways
  + IMS + LMIM) / 3 + matching; GPO pooling on every tower, 16 local features, distillation
  alpha 0.4, the fusion encoders `fusion` (pairs and sizes), and an evaluator re-ranking the top
  `rerank_k` with their matching heads as often as retrieval is evaluated."""
  config.loss.weights = dict(contrastive=0.0, regression=0.0, itc=1 / 3, ims=1 / 3,
                             lmim=1 / 3, itm=1.0)
  for tower in config.model.towers.values():
    tower.pooling = "gpo"
  config.model.local_features = 16
  config.model.fusion = fusion
  config.alignment.distill_alpha = 0.4
  config.alignment.distill_ramp_steps = distill_ramp_steps
  config.evals.rerank = schema.evaluator("rerank", every=config.evals.retrieval.every,
                                        k=rerank_k)


def clip_modalities():
  """Photos and captions as CLIP towers read them: 224 x 224 crops of 80-100% of the
  photo with flips in training, 77 tokens of one caption (the tokenizer from the text
  tower's folder)."""
  return dict(
      image=dict(kind="image", feature="image", image_size=224, crop_scale=(0.8, 1.0),
                 flip=True),
      text=dict(kind="text", feature="text", tokenizer="", max_length=77, captions="sample"))


def clip_tower(part):
  """A tower from a local CLIP folder (`path` left to set), its projection into the shared
  space included, in bfloat16 (train it with clip_policy)."""
  return dict(name="pretrained", path=ml_collections.config_dict.placeholder(str), part=part,
              projection=True, dtype="bfloat16")


def clip_policy():
  """`config.train_policy` of the CLIP towers: a tenth of the learning rate."""
  return dict(image=dict(lr_multiplier=0.1), text=dict(lr_multiplier=0.1))


def tiny_schedule(config, batch_size=8):
  """A few steps at `batch_size`, evaluated and checkpointed at the end: for tests."""
  config.update(batch_size=batch_size, eval_batch_size=batch_size, total_steps=4, log_every=2,
                checkpoint_every=4)
  config.data.shuffle_buffer = 64
  config.optimizer.warmup_steps = 1
  for evaluator in config.evals.values():
    evaluator.every = 4
