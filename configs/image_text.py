"""Image-text retrieval at B/16 size on a real benchmark (COCO or Flickr30K, Karpathy split).

  python -m xmodal_jax.data.build --dataset=coco_karpathy --manual_dir=COCO --data_dir=DATA
  python launch/train.py --config=configs/image_text.py --workdir=runs/coco \
      --config.data.data_dir=DATA --config.modalities.text.tokenizer=/path/to/clip-folder

Variants (`--config=configs/image_text.py:VARIANT`):
  (none)   ViT-B/16 + CLIP's text transformer (B), bfloat16, from scratch; the tokenizer is a
           local Hugging Face folder (a CLIP checkpoint holds one).
  clip     both towers and the projection from a local CLIP checkpoint folder
           (`--config.model.towers.image.path` and `.text.path`; the tokenizer comes with it).
  siglip   both towers from a local SigLIP folder (not SigLIP 2), e.g. siglip-base-patch16-224,
           with the sigmoid loss starting from its scale and bias; embed_dim 768 (the
           towers' width: --config.model.embed_dim=1152 for so400m), text padded to 64;
           the identity heads stay frozen, as SigLIP has none.
  flickr30k  the same on flickr30k_karpathy.
  align_fuse ALBEF/TCL-style alignment: GPO pooling, momentum encoders with 65,536-entry
           queues, ITC + IMS + LMIM (image patches pooled to a 4 x 4 grid) + image-text
           matching with hard negatives in a 6-layer fusion encoder over the text tokens;
           evaluation re-ranks the top 128 with the matching head.
  tiny     a few steps of tiny towers on 32 x 32 images, for tests and smoke runs.
  fp8      both towers' block matmuls in float8 (models/fp8.py; for H100-class GPUs).
  L, g, bigG  pod scale: ViT-L/14 + CLIP text-L (0.43B parameters), ViT-g/14 + text-g
           (1.3B) or OpenCLIP's ViT-bigG/14 + text-bigG (2.5B),
           bfloat16, rematerialized blocks, blockwise loss, the state sharded 16 ways (fsdp;
           the batch over every chip), OpenAI CLIP's global batch of 32,768.
  e        past bigG: a ViT-e/14-class image tower (3.9B; PaLI's) + text-bigG (4.5B in all)
           at a global batch of 65,536 in 4 gradient-caching micro-batches, half the image
           tokens dropped in training (FLIP) and Adafactor, as :bigG otherwise. Check the fit:
           python launch/compile.py --config=configs/image_text.py:L --topology=v5e:16x16
           (the figures for v5e-256 are in benchmarks/README.md, "Compiling for TPU pods").
"""

import ml_collections

from configs import recipes, sizes, variants
from xmodal_jax import schema

VARIANTS = ("clip", "siglip", "flickr30k", "tiny", "align_fuse", "fp8", "L", "g", "bigG", "e")
# The joint space of the pod sizes (CLIP's, OpenCLIP's for g and bigG).
POD_EMBED_DIMS = {"L": 768, "g": 1024, "bigG": 1280, "e": 1280}
# Each pod size's text tower: no CLIP text tower larger than bigG's is published.
POD_TEXT = {"L": "L", "g": "g", "bigG": "bigG", "e": "bigG"}
# The ALBEF fusion encoder over the text tokens, by tower size.
FUSION = {"B": dict(width=768, num_layers=6, num_heads=12, mlp_dim=3072, dtype="bfloat16"),
          "tiny": dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, dtype="float32")}


def get_config(variant=""):
  v = variants.parse(variant, VARIANTS, "configs/image_text.py")
  size = "tiny" if v.tiny else "B"
  placeholder = ml_collections.config_dict.placeholder
  config = schema.defaults()
  # cache: keep the training split's records in memory; shuffle_buffer: captions="expand" only.
  config.data.update(name="flickr30k_karpathy" if v.flickr30k else "coco_karpathy",
                     data_dir=placeholder(str), train_split="train", eval_split="test",
                     shuffle_buffer=30_000 if v.flickr30k else 50_000, cache=False)
  config.modalities = dict(
      image=dict(kind="image", feature="image", image_size=224, crop_scale=(0.5, 1.0),
                 flip=True),
      text=dict(kind="text", feature="text", tokenizer="", max_length=77, captions="sample"),
  )
  if v.tiny:
    towers = dict(image=sizes.vit("tiny", image_size=32),
                  text=sizes.bert("tiny", vocab_size=64))
  elif v.clip or v.siglip:
    towers = {name: dict(name="pretrained", path=placeholder(str), part=part, projection=True,
                         dtype="bfloat16", remat=False)
              for name, part in (("image", "vision"), ("text", "text"))}
  else:
    towers = dict(image=sizes.vit("B", dtype="bfloat16"),
                  text=sizes.clip_text("B", dtype="bfloat16"))
  config.model.update(
      embed_dim=32 if v.tiny else 512,
      logit_scale_init=placeholder(float),  # unset: the model's log(1 / 0.07), as CLIP
      logit_bias_init=placeholder(float),
      towers=towers,
  )
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.total_steps = 30_000
  config.optimizer.update(learning_rate=5e-4, warmup_steps=2_000, end_learning_rate_ratio=0.0,
                          weight_decay=0.2, b1=0.9, b2=0.98, grad_clip_norm=1.0)
  config.evals = dict(retrieval=recipes.retrieval_eval(every=2_000))
  config.evals.retrieval.fused = "none"
  config.log_every = 100
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3

  if v.siglip:  # its logit scale and bias replace these inits
    config.model.update(embed_dim=768, logit_scale_init=2.3, logit_bias_init=-10.0)
    # SigLIP's towers end in its joint space: our heads load as the identity and stay so,
    # and the run leaves as a SiglipModel folder (launch/convert.py --to=hf).
    config.train_policy = {name: dict(head="freeze") for name in ("image", "text")}
    config.loss.kind = "sigmoid"
    config.modalities.text.max_length = 64
  if v.tiny:
    config.modalities.image.image_size = 32
    config.modalities.text.max_length = 16
    config.batch_size = 16
    config.eval_batch_size = 16
    config.data.shuffle_buffer = 64
    config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.log_every = 2
    config.evals.retrieval.every = 4
    config.checkpoint_every = 2
  if v.align_fuse:
    recipes.align_fuse(config, fusion=dict(pairs=("text:image",), **FUSION[size]),
                       rerank_k=4 if v.tiny else 128, distill_ramp_steps=1_000)
    if v.tiny:
      config.alignment.queue_size = 64
    else:
      config.batch_size = 512  # queue_size must stay a multiple of it
  if v.fp8:
    for tower in config.model.towers.values():
      tower["fp8"] = True
  pods = [size for size in POD_EMBED_DIMS if getattr(v, size)]
  if pods:
    if v.tiny or v.clip or v.siglip or len(pods) > 1:
      raise ValueError("configs/image_text.py: :L, :g, :bigG and :e are sizes of their own; they "
                       "do not combine with :tiny, :clip, :siglip or each other")
    pod = pods[0]
    config.model.towers = dict(
        image=sizes.vit(pod, dtype="bfloat16", remat=True),
        text=sizes.clip_text(POD_TEXT[pod], dtype="bfloat16", remat=True))
    config.model.embed_dim = POD_EMBED_DIMS[pod]
    config.loss.impl, config.loss.block_size = "blockwise", 4096
    # fsdp=16: the state splits 16 ways and the batch over every chip. On v5e-256, sharding
    # over all 256 chips tripled L's temporaries (15.2 vs 5.3 GiB at 16; benchmarks/README.md).
    config.mesh = dict(data=-1, fsdp=16)
    config.batch_size = 32_768
    config.eval_batch_size = 32_768
    if v.e:  # fits a v5e-256 with 4.9 GiB free per chip (benchmarks/README.md)
      config.batch_size = config.eval_batch_size = 65_536
      config.grad_accum_steps = 4
      config.model.towers.image.token_drop_rate = 0.5
      config.optimizer.name = "adafactor"
  return config
