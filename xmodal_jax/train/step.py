"""The jit-compiled train step and the embedding step used by evaluation."""

import jax
import jax.numpy as jnp
import optax

from xmodal_jax import losses

MAX_LOGIT_SCALE = 100.0


def logit_scale(params):
  """The multiplier s = exp(stored log), clipped at 100 as in CLIP."""
  return jnp.minimum(jnp.exp(params["logit_scale"]), MAX_LOGIT_SCALE)


def compute_loss(params, batch, rng, *, model, loss_config):
  embeddings = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
  scale = logit_scale(params)
  loss, metrics = losses.contrastive_loss(
      embeddings, scale, masks=batch["_mask"], pair_weights=dict(loss_config.pair_weights),
      kind=loss_config.kind)
  metrics["logit_scale"] = scale
  return loss, metrics


def train_step(state, batch, *, model, tx, loss_config, seed):
  """One optimizer update on a global batch. Returns (new state, metrics)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, rng, model=model,
                                   loss_config=loss_config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.global_norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def embed_step(params, batch, *, model):
  """{modality: L2-normalized embeddings} for an eval batch."""
  return model.apply({"params": params}, batch, train=False)
