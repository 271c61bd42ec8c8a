"""AdamW with linear warmup and cosine decay, gradient clipping, no decay on 1-D params;
frozen towers (or parts of them) and per-tower learning-rate multipliers.

`config.train_policy.<modality>` says what of each tower trains: `trainable` "all", "none"
(the tower and its head into the shared space are frozen, as LiT locks one tower and
ImageBind binds to a frozen space), or a tuple of regexes matched in full against the
tower's parameter paths ("trunk/encoder/block11/.*" for the last of 12 blocks,
".*/ln_[a-z]+/.*" for its LayerNorms): only those train, and its head. A tower's LoRA
adapters (its `lora_rank`, models/transformer.py) always train: with trainable="none", only
they do. `lr_multiplier` scales the learning rate of the tower's trainable parameters and
its head. Frozen parameters get no gradient (the loss sees them through stop_gradient, so XLA
drops their backward pass), no optimizer state and no update.
"""

import math
import re

import jax
import jax.numpy as jnp
import optax

from xmodal_jax.parallel import sharding

LORA_PARAMS = ("lora_a", "lora_b")  # models/transformer.py: ProjectionWeights


def validate(config):
  """Raises on config.optimizer and config.train_policy values the schedule, AdamW and the
  freezing rules cannot take, naming the field."""
  opt = config.optimizer
  checks = [
      ("learning_rate", opt.learning_rate, math.isfinite(opt.learning_rate)
       and opt.learning_rate > 0, "a finite number > 0"),
      ("warmup_steps", opt.warmup_steps, opt.warmup_steps >= 0, ">= 0"),
      ("end_learning_rate_ratio", opt.end_learning_rate_ratio,
       0 <= opt.end_learning_rate_ratio <= 1, "between 0 and 1"),
      ("weight_decay", opt.weight_decay, opt.weight_decay >= 0, ">= 0"),
      ("b1", opt.b1, 0 <= opt.b1 < 1, "0 <= b1 < 1"),
      ("b2", opt.b2, 0 <= opt.b2 < 1, "0 <= b2 < 1"),
      ("grad_clip_norm", opt.grad_clip_norm, opt.grad_clip_norm > 0, "> 0"),
      ("name", opt.name, opt.name in OPTIMIZERS, f"one of {OPTIMIZERS}"),
      ("momentum_dtype", opt.momentum_dtype, opt.momentum_dtype in MOMENTUM_DTYPES,
       f"one of {MOMENTUM_DTYPES}"),
      ("schedule", opt.schedule, opt.schedule in SCHEDULES, f"one of {SCHEDULES}"),
      ("cooldown_steps", opt.cooldown_steps, opt.cooldown_steps >= 0
       and opt.warmup_steps + opt.cooldown_steps <= config.total_steps,
       f">= 0, with warmup_steps + cooldown_steps <= total_steps={config.total_steps}"),
      ("rsqrt_timescale", opt.rsqrt_timescale, opt.rsqrt_timescale > 0, "> 0"),
  ]
  for name, value, ok, expected in checks:
    if not ok:
      raise ValueError(f"config.optimizer.{name}={value}: expected {expected}")
  tower_rules(config.train_policy)


OPTIMIZERS = ("adamw", "adafactor")
MOMENTUM_DTYPES = ("bfloat16", "float32")
SCHEDULES = ("warmup_cosine", "warmup_rsqrt", "warmup_stable_decay")


def learning_rate_schedule(opt, total_steps):
  """`config.optimizer`'s schedule over `total_steps`, from 0 up to the peak in
  `warmup_steps` (linear) and then: warmup_cosine, a cosine decay to the end value;
  warmup_rsqrt, peak / sqrt(1 + (step - warmup) / rsqrt_timescale) (big_vision's); or
  warmup_stable_decay, the peak held. The last two end with a linear cooldown to the end
  value over `cooldown_steps` (none when 0). The end value is end_learning_rate_ratio x peak."""
  peak, warmup = opt.learning_rate, opt.warmup_steps
  end = peak * opt.end_learning_rate_ratio
  if opt.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  cooldown_start = total_steps - opt.cooldown_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    rate = jnp.float32(peak)
    if opt.schedule == "warmup_rsqrt":
      rate = peak * jax.lax.rsqrt(1 + jnp.maximum(step - warmup, 0) / opt.rsqrt_timescale)
    if opt.cooldown_steps:
      left = jnp.clip((total_steps - step) / opt.cooldown_steps, 0.0, 1.0)
      at_start = rate if opt.schedule == "warmup_stable_decay" else (
          peak * jax.lax.rsqrt(1 + max(cooldown_start - warmup, 0) / opt.rsqrt_timescale))
      rate = jnp.where(step >= cooldown_start, end + (at_start - end) * left, rate)
    if warmup:
      rate = jnp.where(step < warmup, peak * step / warmup, rate)
    return rate
  return schedule


def tower_rules(train_policy, loaded_heads=()):
  """{modality: (trainable, lr_multiplier, head_frozen)} of config.train_policy, validated.
  With head="auto", a head freezes with its tower (trainable="none") only when it was loaded
  (`loaded_heads`) or the tower's embeddings are cached (the cache holds the head's
  outputs): a head fresh from its initializer otherwise trains, or the frozen tower's space
  would be projected at random for the whole run."""
  rules = {}
  for modality, policy in train_policy.items():
    where = f"config.train_policy.{modality}"
    trainable = policy.trainable
    if isinstance(trainable, (list, tuple)):
      if not trainable:
        raise ValueError(f"{where}.trainable=(): expected \"all\", \"none\" or some regexes")
      for pattern in trainable:
        try:
          re.compile(pattern)
        except (re.error, TypeError) as e:
          raise ValueError(f"{where}.trainable: {pattern!r} is not a regex ({e})") from e
      trainable = tuple(trainable)
    elif trainable not in ("all", "none"):
      raise ValueError(f"{where}.trainable={trainable!r}: expected \"all\", \"none\" or a "
                       "tuple of regexes on the tower's parameter paths")
    multiplier = policy.lr_multiplier
    if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier)
            and multiplier > 0):
      raise ValueError(f"{where}.lr_multiplier={multiplier!r}: expected a number > 0 (freeze "
                       "with trainable=\"none\")")
    if policy.head not in ("auto", "train", "freeze"):
      raise ValueError(f"{where}.head={policy.head!r}: expected auto, train or freeze")
    rules[modality] = (trainable, float(multiplier), policy.head == "freeze" or (
        policy.head == "auto" and trainable == "none" and (
            modality in loaded_heads or bool(policy.cache_embeddings))))
  return rules


def learning_rate_multipliers(rules, params):
  """A tree like `params`: each parameter's learning-rate multiplier, 0.0 where frozen, by
  `rules` (tower_rules)."""
  owners = {f"towers_{m}": m for m in rules} | {f"heads_{m}": m for m in rules}
  matched = set()

  def multiplier(path, _):
    names = sharding.path_name(path).split("/")
    modality = owners.get(names[0])
    if modality is None:
      return 1.0
    trainable, scale, head_frozen = rules[modality]
    if names[-1] in LORA_PARAMS:
      return scale
    if names[0].startswith("heads_"):
      return 0.0 if head_frozen else scale
    if trainable == "none":
      return 0.0
    if trainable == "all":
      return scale
    inner = "/".join(names[1:])
    if any(re.fullmatch(pattern, inner) for pattern in trainable):
      matched.add(modality)
      return scale
    return 0.0
  tree = jax.tree_util.tree_map_with_path(multiplier, params)
  for modality, (trainable, _, _) in rules.items():
    if isinstance(trainable, tuple) and modality not in matched:
      names = [sharding.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
      example = next((name.split("/", 1)[1] for name in names
                      if name.startswith(f"towers_{modality}/")), "(no parameters)")
      raise ValueError(f"config.train_policy.{modality}.trainable={trainable}: matches no "
                       f"parameter of the tower (its paths look like {example!r})")
  return tree


def frozen(rules, params):
  """A tree like `params` of bools: True where the parameter does not train."""
  return jax.tree.map(lambda m: m == 0.0, learning_rate_multipliers(rules, params))


def has_frozen(rules):
  return any(trainable != "all" or head_frozen for trainable, _, head_frozen in rules.values())


def adafactor(rate, opt, decay_mask):
  """big_vision's Adafactor: a factored second moment (a row and a column mean of g^2 over
  the two largest sides of each tensor whose two largest sides are both 32 or more, so
  O(n + m) state instead of O(nm)), momentum b1 on the scaled update when b1 > 0 (a
  full-size first moment, stored in `momentum_dtype`), decoupled weight decay."""
  parts = [optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=32)]
  if opt.b1:
    parts.append(optax.ema(opt.b1, debias=True, accumulator_dtype=jnp.dtype(opt.momentum_dtype)))
  if opt.weight_decay:
    parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
  return optax.chain(*parts, optax.scale_by_learning_rate(rate))


def make_optimizer(opt, total_steps, rules):
  """The optax transformation of `config.optimizer` over `total_steps` (AdamW or
  Adafactor); biases, norms and scalars get no decay. With frozen parameters or
  learning-rate multipliers (`rules`, tower_rules of config.train_policy), the optimizer
  runs per multiplier group (optax.multi_transform): frozen ones get no state."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  schedule = learning_rate_schedule(opt, total_steps)

  def adamw(scale):
    rate = schedule if scale == 1.0 else lambda step: scale * schedule(step)
    if opt.name == "adafactor":
      return adafactor(rate, opt, decay_mask)
    return optax.adamw(rate, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=decay_mask)
  if all(rule == ("all", 1.0, False) for rule in rules.values()):
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw(1.0))
  label = lambda m: "frozen" if m == 0.0 else f"lr x{m:g}"
  scales = {1.0} | {scale for _, scale, _ in rules.values()}
  transforms = {"frozen": optax.set_to_zero()} | {label(s): adamw(s) for s in scales}
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.multi_transform(transforms, lambda params: jax.tree.map(
          label, learning_rate_multipliers(rules, params))))
