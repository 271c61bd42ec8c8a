"""The jit-compiled train step and the embedding step used by evaluation."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from xmodal_jax import losses, parallel

MAX_LOGIT_SCALE = 100.0
OBJECTIVES = ("contrastive", "regression")


def logit_scale(params):
  """The multiplier s = exp(stored log), clipped at 100 as in CLIP."""
  return jnp.minimum(jnp.exp(params["logit_scale"]), MAX_LOGIT_SCALE)


def objective(embeddings, masks, scale, bias, *, loss_config, axis_name):
  """The weighted sum of the objectives `config.loss.weights` names, on this device's rows.

  Runs inside shard_map over the data axis: each device scores its rows against the global
  batch (loss.impl: dense = all-gathered, blockwise, ring), so no device builds B x B.
  """
  options = dict(pair_weights=dict(loss_config.pair_weights), impl=loss_config.impl,
                 block_size=loss_config.block_size or None, axis_name=axis_name)
  total, metrics = 0.0, {}
  for name, weight in loss_config.weights.items():
    if not weight:
      continue
    if name == "contrastive":
      value, terms = losses.contrastive_loss(embeddings, scale, masks=masks,
                                             kind=loss_config.kind, bias=bias, **options)
    else:
      value, terms = losses.similarity_regression_loss(
          embeddings, masks=masks, **dict(loss_config.regression), **options)
    total += weight * value
    metrics[name] = value
    metrics.update({f"{name}/{k}": v for k, v in terms.items()})
  return total, metrics


def compute_loss(params, batch, rng, *, model, loss_config, mesh):
  embeddings = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
  scale = logit_scale(params)
  bias = params.get("logit_bias")
  sharded = jax.shard_map(
      functools.partial(objective, loss_config=loss_config, axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P(), P()),
      out_specs=P())
  loss, metrics = sharded(embeddings, batch["_mask"], scale, bias)
  metrics["logit_scale"] = scale
  if bias is not None:
    metrics["logit_bias"] = bias
  return loss, metrics


def train_step(state, batch, *, model, tx, loss_config, mesh, seed):
  """One optimizer update on a global batch. Returns (new state, metrics)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, rng, model=model,
                                   loss_config=loss_config, mesh=mesh)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.global_norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def embed_step(params, batch, *, model):
  """{modality: L2-normalized embeddings} for an eval batch."""
  return model.apply({"params": params}, batch, train=False)
