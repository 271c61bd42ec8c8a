"""AdamW with linear warmup and cosine decay, gradient clipping, no decay on 1-D params."""

import jax
import optax


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
