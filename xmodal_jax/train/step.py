"""The jit-compiled train step: the model, the weighted objectives of config.loss, AdamW."""

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from xmodal_jax import parallel
from xmodal_jax.losses import alignment, contrastive, objectives
from xmodal_jax.models import towers
from xmodal_jax.train import optimizer
from xmodal_jax.train import state as state_lib

MAX_LOGIT_SCALE = 100.0


def logit_scale(params):
  """The multiplier s = exp(stored log), clipped at 100 as in CLIP (a scalar, or {pair:
  scalar} with per-pair temperatures)."""
  return jax.tree.map(lambda x: jnp.minimum(jnp.exp(x), MAX_LOGIT_SCALE), params["logit_scale"])


def scalar_metrics(name, value):
  """{name: value} for a scalar, {name/pair: value} for a per-pair mapping."""
  if isinstance(value, dict):
    return {f"{name}/{pair}": v for pair, v in value.items()}
  return {name: value}


def distill_alpha(alignment_config, step):
  """Momentum distillation's alpha, ramped up linearly over `distill_ramp_steps`; None: off."""
  alpha = alignment_config.distill_alpha
  if not alpha:
    return None
  ramp = alignment_config.distill_ramp_steps
  return alpha * jnp.minimum(1.0, (step + 1) / ramp) if ramp else alpha


def tower_outputs(params, batch, rng, *, model, details):
  """What the objectives read from the towers: {"emb"} (and "tokens", "locals" when an
  objective needs the details) of every row of `batch`."""
  if details:
    return model.apply({"params": params}, batch, train=True, rngs={"dropout": rng},
                       method="details")
  return {"emb": model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})}


def compute_loss(params, batch, rng, momentum=None, *, model, loss_config, mesh, freeze=None):
  """(sum over config.loss.weights of weight x term, metrics) on a global batch; `momentum`
  (objectives.Momentum) feeds the momentum objectives. `freeze` (params -> params) stops the
  gradient of frozen parameters."""
  params = freeze(params) if freeze else params
  rng, term_rng = jax.random.split(rng)
  out = tower_outputs(params, batch, rng, model=model,
                      details=objectives.uses(loss_config, "details"))
  return objective_loss(params, out, batch, term_rng, momentum, model=model,
                        loss_config=loss_config, mesh=mesh)


def objective_loss(params, out, batch, rng, momentum=None, *, model, loss_config, mesh):
  """(loss, metrics) of the towers' outputs `out` (tower_outputs) of the global batch.

  Per-device terms (objectives.Objective.per_device) run inside shard_map over the batch
  axes, each device scoring its rows against the global batch (loss.impl: dense =
  all-gathered, blockwise, ring), so no device builds B x B; the others run on the global
  batch under jit, and scores against a queue stay sharded by the queue's rows. `params`
  serve the logit scale and bias and the fusion encoders (itm).
  """
  emb = out["emb"]
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
        locals=out.get("locals"), momentum=momentum,
        queue_columns=jax.sharding.NamedSharding(mesh, P(None, parallel.BATCH_AXES)),
        rng=rng, match=match, fusion_pairs=tuple(towers.fusion_pairs(model)))
    values.update({name: table[name].term(inputs, loss_config) for name in on_global_batch})
  loss, metrics = 0.0, {}
  if "_source" in batch:  # a mixture: which source the loss comes from
    metrics.update(source_metrics(emb, batch, scale, bias, loss_config=loss_config, mesh=mesh))
  for name, (value, terms) in values.items():
    loss += weights[name] * value
    metrics[name] = value
    metrics.update({f"{name}/{k}": v for k, v in terms.items()})
  metrics.update(scalar_metrics("logit_scale", scale))
  if bias is not None:
    metrics.update(scalar_metrics("logit_bias", bias))
  return loss, metrics


def source_metrics(emb, batch, scale, bias, *, loss_config, mesh):
  """{"source_rows": int[S] rows of each mixture source in the global batch, "source_loss":
  float[S] the contrastive loss of its rows (contrastive.source_losses), no gradient}."""
  def per_device(emb, masks, source, scale, bias):
    return contrastive.source_losses(
        jax.lax.stop_gradient(emb), scale, source, masks=masks,
        pair_weights=loss_config.pair_weights, kind=loss_config.kind, bias=bias,
        axis_name=parallel.BATCH_AXES)
  rows = P(parallel.BATCH_AXES)
  losses = jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows, P(), P()),
                         out_specs=P())(emb, batch["_mask"], batch["_source"], scale, bias)
  return {"source_rows": batch["_source"].sum(0), "source_loss": losses}


def split_micro_batches(tree, steps, mesh):
  """[B, ...] leaves sharded over the batch axes -> [steps, B / steps, ...], micro-batch i
  holding rows i of every device's share, so that splitting moves no data between devices."""
  shards = parallel.batch_shards(mesh)
  rows = jax.sharding.NamedSharding(mesh, P(None, parallel.BATCH_AXES))

  def split(x):
    x = x.reshape(shards, steps, x.shape[0] // (shards * steps), *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape(steps, -1, *x.shape[3:])
    return jax.lax.with_sharding_constraint(x, rows)
  return jax.tree.map(split, tree)


def merge_micro_batches(tree, mesh):
  """The inverse of split_micro_batches: [steps, B / steps, ...] -> [B, ...] in the rows'
  original order."""
  shards = parallel.batch_shards(mesh)
  rows = jax.sharding.NamedSharding(mesh, P(parallel.BATCH_AXES))

  def merge(x):
    steps = x.shape[0]
    x = x.reshape(steps, shards, x.shape[1] // shards, *x.shape[2:])
    x = jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[3:])
    return jax.lax.with_sharding_constraint(x, rows)
  return jax.tree.map(merge, tree)


def embed_in_micro_batches(apply, batch, steps, mesh):
  """`apply(micro-batch, i)` on each of `steps` micro-batches in turn (a scan: one
  micro-batch's activations live at a time), merged back into the global batch's rows."""
  if steps == 1:
    return apply(batch, 0)
  _, outs = jax.lax.scan(lambda _, xs: (None, apply(*xs)), None,
                         (split_micro_batches(batch, steps, mesh), jnp.arange(steps)))
  return merge_micro_batches(outs, mesh)


def cached_loss_and_grads(params, batch, rng, momentum=None, *, steps, model, loss_config,
                          mesh, freeze=None):
  """((loss, metrics), grads) of compute_loss on the global batch, with the towers' memory of
  one micro-batch of B / `steps` rows (gradient caching, Gao et al. 2021).

  1. Embed each micro-batch without keeping its activations. 2. Compute the objectives on
  the whole global batch's outputs (every negative, every term) and their gradients with
  respect to those outputs (and to the params the objectives use directly: logit scale,
  fusion encoders). 3. Re-run each micro-batch's towers and pull its outputs' gradient back
  to the params. Micro-batch i's dropout draws from fold_in(rng, i) in both passes.
  """
  rng, term_rng = jax.random.split(rng)
  details = objectives.uses(loss_config, "details")
  freeze = freeze or (lambda p: p)

  def outputs(p, micro_batch, i):
    return tower_outputs(freeze(p), micro_batch, jax.random.fold_in(rng, i), model=model,
                         details=details)
  out = embed_in_micro_batches(functools.partial(outputs, params), batch, steps, mesh)
  leaves, treedef = jax.tree.flatten(out)
  inexact = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]
  floats = lambda tree: [x for x, f in zip(jax.tree.leaves(tree), inexact) if f]

  def loss_of_outputs(p, float_leaves):  # the outputs with their float leaves replaced
    float_leaves = iter(float_leaves)
    out = treedef.unflatten([next(float_leaves) if f else x for x, f in zip(leaves, inexact)])
    return objective_loss(freeze(p), out, batch, term_rng, momentum, model=model,
                          loss_config=loss_config, mesh=mesh)
  (loss, metrics), (grads, out_grads) = jax.value_and_grad(
      loss_of_outputs, argnums=(0, 1), has_aux=True)(params, floats(out))

  def backward(grads, xs):
    micro_batch, i, micro_grads = xs
    _, pull_back = jax.vjp(lambda p: floats(outputs(p, micro_batch, i)), params)
    return jax.tree.map(jnp.add, grads, pull_back(micro_grads)[0]), None
  grads, _ = jax.lax.scan(backward, grads, (
      split_micro_batches(batch, steps, mesh), jnp.arange(steps),
      split_micro_batches(out_grads, steps, mesh)))
  return (loss, metrics), grads


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


def train_step(state, batch, *, model, tx, loss_config, mesh, seed, alignment_config=None,
               grad_accum_steps=1, frozen=None):
  """One optimizer update on a global batch. Returns (new state, metrics).

  `frozen` (params -> tree of bools, train/optimizer.py) names parameters that do not
  train: the loss sees them through stop_gradient and they keep their exact values.

  With `grad_accum_steps` k > 1 the towers run on k micro-batches in turn
  (cached_loss_and_grads): the same loss and gradients over the whole global batch, with the
  activations of B / k rows.

  A step whose loss, gradients or updated params are not all finite applies no update (the
  params and optimizer state stay as they were; the step still counts) and reports
  metrics["nonfinite"] = 1, so a state, and a checkpoint of it, is always finite.

  With momentum objectives (itc, ims), as ALBEF: the EMA params first move towards the
  current params (momentum from `alignment_config`), then embed the batch as keys; after the
  update those keys join the queues (both see the whole global batch once per step).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  batch = with_token_seeds(batch, model, rng)
  extra, momentum_params, queues = {}, state.momentum_params, state.queues
  if queues is not None:
    momentum_params = state_lib.ema(momentum_params, state.params, alignment_config.momentum)
    momentum_embed = lambda inputs: jax.lax.stop_gradient(embed_in_micro_batches(
        lambda micro_batch, _: model.apply({"params": momentum_params}, micro_batch,
                                           train=False), inputs, grad_accum_steps, mesh))
    extra["momentum"] = objectives.Momentum(
        momentum_embed({k: v for k, v in batch.items() if k != "_views"}), queues,
        distill_alpha(alignment_config, state.step),
        # IMS's positives: the second views' keys
        momentum_embed(batch["_views"]) if "_views" in batch else None)
  if grad_accum_steps == 1:
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  else:
    grad_fn = functools.partial(cached_loss_and_grads, steps=grad_accum_steps)
  is_frozen = frozen(state.params) if frozen else None
  if is_frozen is not None:
    extra["freeze"] = lambda p: jax.tree.map(
        lambda x, f: jax.lax.stop_gradient(x) if f else x, p, is_frozen)
  (loss, metrics), grads = grad_fn(state.params, batch, rng, model=model,
                                   loss_config=loss_config, mesh=mesh, **extra)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if is_frozen is not None:  # exactly as they were (x + 0 would turn -0.0 into 0.0)
    params = jax.tree.map(lambda new, old, f: old if f else new, params, state.params,
                          is_frozen)
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
    queues = keep_if_not_finite(update_queues(queues, extra["momentum"].emb, batch, mesh),
                                queues)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       momentum_params=momentum_params, queues=queues), metrics


def drop_rate(tower):
  """The tower's token_drop_rate (a frames tower's is its image tower's)."""
  return getattr(getattr(tower, "image", tower), "token_drop_rate", 0.0)


def with_token_seeds(batch, model, rng):
  """`batch` with a uint32 token_seed per row for towers that drop tokens: a hash of the
  step's key and the row's item id, so a row draws the same tokens in any micro-batch, on
  any device count and after a resume."""
  dropping = [m for m, t in model.towers.items() if drop_rate(t) and m in batch
              and "cached_embedding" not in batch[m]]
  if not dropping:
    return batch
  key = jax.random.fold_in(rng, 0x746F6B)  # apart from the dropout draws
  seeds = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), dtype=jnp.uint32))(
      batch["_id"].astype(jnp.uint32))
  return dict(batch, **{m: dict(batch[m], token_seed=seeds) for m in dropping})


def jit_train_step(config, model, tx, mesh, shardings, rules=None):
  """`config`'s train step, jitted: the state stays in `shardings` (and is donated), the
  metrics come back replicated. `rules`: what trains (the optimizer's tower_rules; default:
  config.train_policy's with no head loaded)."""
  rules = rules or optimizer.tower_rules(config.train_policy)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=config.loss, mesh=mesh,
                        seed=config.seed, alignment_config=config.alignment,
                        grad_accum_steps=config.grad_accum_steps,
                        frozen=(functools.partial(optimizer.frozen, rules)
                                if optimizer.has_frozen(rules) else None)),
      out_shardings=(shardings, jax.sharding.NamedSharding(mesh, P())), donate_argnums=(0,))
