"""AdamW with linear warmup and cosine decay, gradient clipping, no decay on 1-D params."""

import math

import jax
import optax


def validate(config):
  """Raises on config.optimizer values the schedule and AdamW cannot take, naming the field."""
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
  ]
  for name, value, ok, expected in checks:
    if not ok:
      raise ValueError(f"config.optimizer.{name}={value}: expected {expected}")


def learning_rate_schedule(config):
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=max(config.total_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.end_learning_rate_ratio)


def make_optimizer(config):
  """The optax transformation of `config.optimizer`; biases, norms and scalars get no decay."""
  opt = config.optimizer
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=decay_mask))
