"""The jit-compiled train step: the model, the weighted objectives of config.loss, AdamW."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from xmodal_jax import parallel
from xmodal_jax.losses import alignment, objectives
from xmodal_jax.models import towers
from xmodal_jax.train import state as state_lib

MAX_LOGIT_SCALE = 100.0


def logit_scale(params):
  """The multiplier s = exp(stored log), clipped at 100 as in CLIP."""
  return jnp.minimum(jnp.exp(params["logit_scale"]), MAX_LOGIT_SCALE)


def distill_alpha(alignment_config, step):
  """Momentum distillation's alpha, ramped up linearly over `distill_ramp_steps`; None: off."""
  alpha = alignment_config.get("distill_alpha", 0.0)
  if not alpha:
    return None
  ramp = alignment_config.get("distill_ramp_steps", 0)
  return alpha * jnp.minimum(1.0, (step + 1) / ramp) if ramp else alpha


def compute_loss(params, batch, rng, momentum_emb=None, queues=None, alpha=None, *, model,
                 loss_config, mesh):
  """(sum over config.loss.weights of weight x term, metrics) on a global batch.

  Per-device terms (objectives.Objective.per_device) run inside shard_map over the batch
  axes, each device scoring its rows against the global batch (loss.impl: dense =
  all-gathered, blockwise, ring), so no device builds B x B; the others run on the global
  batch under jit, and scores against a queue stay sharded by the queue's rows.
  """
  rng, term_rng = jax.random.split(rng)
  details = objectives.uses(loss_config, "details")
  out = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng},
                    method="details" if details else None)
  emb = out["emb"] if details else out
  scale, bias = logit_scale(params), params.get("logit_bias")
  weights = objectives.active(loss_config)
  table = {name: objectives.OBJECTIVES[name] for name in weights}
  per_device = [name for name, objective in table.items() if objective.per_device]
  on_global_batch = [name for name in table if name not in per_device]

  def device_terms(emb, masks, scale, bias):
    inputs = objectives.Inputs(emb, masks, scale, bias, axis_name=parallel.BATCH_AXES)
    return {name: table[name].term(inputs, loss_config) for name in per_device}
  values = {}
  if per_device:
    values = jax.shard_map(device_terms, mesh=mesh,
                           in_specs=(P(parallel.BATCH_AXES), P(parallel.BATCH_AXES), P(), P()),
                           out_specs=P())(emb, batch["_mask"], scale, bias)
  if on_global_batch:
    def match(pair, a_tokens, a_valid, b_tokens, b_valid, dropout_rng):
      return model.apply({"params": params}, pair, a_tokens, a_valid, b_tokens, b_valid,
                         train=True, method="match", rngs={"dropout": dropout_rng})
    inputs = objectives.Inputs(
        emb, batch["_mask"], scale, bias, ids=batch["_id"], tokens=out.get("tokens"),
        locals=out.get("locals"), momentum_emb=momentum_emb, queues=queues, alpha=alpha,
        queue_columns=jax.sharding.NamedSharding(mesh, P(None, parallel.BATCH_AXES)),
        rng=term_rng, match=match, fusion_pairs=tuple(towers.fusion_pairs(model)))
    values.update({name: table[name].term(inputs, loss_config) for name in on_global_batch})
  loss, metrics = 0.0, {}
  for name, (value, terms) in values.items():
    loss += weights[name] * value
    metrics[name] = value
    metrics.update({f"{name}/{k}": v for k, v in terms.items()})
  metrics["logit_scale"] = scale
  if bias is not None:
    metrics["logit_bias"] = bias
  return loss, metrics


def update_queues(queues, momentum_emb, batch, mesh):
  """Enqueues this step's momentum embeddings of every modality (FIFO, rows sharded: each
  device writes its batch rows into its own queue rows)."""
  sharded = jax.sharding.NamedSharding(mesh, P(parallel.BATCH_AXES))
  new, pointer = {}, queues["pointer"]
  for m, keys in momentum_emb.items():
    emb, ids, new_pointer = alignment.enqueue(
        queues[m]["emb"], queues[m]["ids"], pointer, keys, batch["_id"], batch["_mask"][m],
        shards=parallel.batch_shards(mesh))
    new[m] = {"emb": jax.lax.with_sharding_constraint(emb, sharded),
              "ids": jax.lax.with_sharding_constraint(ids, sharded)}
  new["pointer"] = new_pointer
  return new


def train_step(state, batch, *, model, tx, loss_config, mesh, seed, alignment_config=None):
  """One optimizer update on a global batch. Returns (new state, metrics).

  A step whose loss, gradients or updated params are not all finite applies no update (the
  params and optimizer state stay as they were; the step still counts) and reports
  metrics["nonfinite"] = 1, so a state, and a checkpoint of it, is always finite.

  With momentum objectives (itc, ims), as ALBEF: the EMA params first move towards the
  current params (momentum from `alignment_config`), then embed the batch as keys; after the
  update those keys join the queues.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  extra, momentum_params, queues = {}, state.momentum_params, state.queues
  if queues is not None:
    momentum_params = state_lib.ema(momentum_params, state.params, alignment_config.momentum)
    momentum_emb = jax.lax.stop_gradient(
        model.apply({"params": momentum_params}, batch, train=False))
    extra = dict(momentum_emb=momentum_emb, queues=queues,
                 alpha=distill_alpha(alignment_config, state.step))
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, rng, model=model,
                                   loss_config=loss_config, mesh=mesh, **extra)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.global_norm(grads)
  finite = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            & jnp.isfinite(optax.global_norm(params)))
  keep_if_not_finite = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  params = keep_if_not_finite(params, state.params)
  opt_state = keep_if_not_finite(opt_state, state.opt_state)
  metrics["nonfinite"] = (~finite).astype(jnp.int32)
  if queues is not None:  # A skipped step's keys may be the non-finite part: not enqueued.
    queues = keep_if_not_finite(update_queues(queues, extra["momentum_emb"], batch, mesh),
                                queues)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       momentum_params=momentum_params, queues=queues), metrics
