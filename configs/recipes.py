"""Objective recipes shared by the experiment configs."""

import ml_collections


def loss_defaults():
  """`config.loss`: seed 000's in-batch InfoNCE on every pair, the other terms off."""
  return ml_collections.ConfigDict(dict(
      weights=dict(contrastive=1.0, regression=0.0),  # objectives and their weights
      kind="softmax",  # or "sigmoid" (set model.logit_bias_init, SigLIP: -10)
      pair_weights={},  # {"audio-text": 2.0, ...}; unnamed pairs weigh 1
      impl="dense",  # dense (all-gathered columns) | blockwise | ring
      block_size=0,  # columns per tile for blockwise/ring; 0: a whole shard
      regression=dict(target="intra", margin=0.2, loss="mse", balance=False),
      intra_modalities=(),  # ims and lmim run on these modalities; empty: all
  ))


def alignment_defaults():
  """`config.alignment`: the momentum encoders and queues seed 001's itc/ims use (the one
  place their defaults are written)."""
  return ml_collections.ConfigDict(dict(momentum=0.995, queue_size=65_536, distill_alpha=0.0,
                                        distill_ramp_steps=0))


def nonfinite_defaults():
  """`config.nonfinite`: a step whose loss, gradients or update are not finite never applies
  its update; "skip" goes on and stops training after `max_in_a_row` such steps in a row,
  "stop" stops at the first (train/nonfinite.py: Guard)."""
  return ml_collections.ConfigDict(dict(policy="skip", max_in_a_row=10))


def parallelism_defaults(config):
  """`config.mesh` (axis sizes; -1: the devices left) and `config.sharding` ((regex, rule)
  on state paths: "fsdp", "replicate" or a PartitionSpec tuple; xmodal_jax/parallel/
  sharding.py). The default is data parallelism; data=D, fsdp=F keeps 1/F of the state per
  device. `config.grad_accum_steps` = k runs the towers on k micro-batches of the global
  batch in turn (gradient caching: the same loss and gradients, 1/k of the activations)."""
  config.mesh = dict(data=-1, fsdp=1)
  config.sharding = [(".*", "fsdp")]
  config.grad_accum_steps = 1


def retrieval_eval(every):
  """`config.evals.retrieval`: every ordered pair and every fused query (docs/methods.md)
  on config.data.eval_split, every `every` steps and at the end."""
  return ml_collections.ConfigDict(dict(type="retrieval", every=every, fused="all"))


def align_fuse(config, *, fusion, rerank_k, distill_ramp_steps):
  """Seed 001 (docs/methods.md) on `config`, TCL's weighting: (ITC both ways + IMS + LMIM) /
  3 + matching; GPO pooling on every tower, 16 local features, distillation alpha 0.4, the
  fusion encoders `fusion` (pairs and sizes), and an evaluator re-ranking the top
  `rerank_k` with their matching heads as often as retrieval is evaluated."""
  config.loss.weights = dict(contrastive=0.0, regression=0.0, itc=1 / 3, ims=1 / 3,
                             lmim=1 / 3, itm=1.0)
  for tower in config.model.towers.values():
    tower.pooling = "gpo"
  config.model.local_features = 16
  config.model.fusion = fusion
  config.alignment.distill_alpha = 0.4
  config.alignment.distill_ramp_steps = distill_ramp_steps
  config.evals.rerank = dict(type="rerank", every=config.evals.retrieval.every, k=rerank_k)


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
  space included, trained at a tenth of the learning rate, in bfloat16."""
  return dict(name="pretrained", path=ml_collections.config_dict.placeholder(str), part=part,
              projection=True, lr_multiplier=0.1, dtype="bfloat16")


def tiny_schedule(config, batch_size=8):
  """A few steps at `batch_size`, evaluated and checkpointed at the end: for tests."""
  config.update(batch_size=batch_size, eval_batch_size=batch_size, total_steps=4, log_every=2,
                checkpoint_every=4)
  config.data.shuffle_buffer = 64
  config.optimizer.warmup_steps = 1
  for evaluator in config.evals.values():
    evaluator.every = 4
