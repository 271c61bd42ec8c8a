"""The jit-compiled train step and the embedding step used by evaluation."""

import functools
import itertools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from xmodal_jax import losses, parallel
from xmodal_jax.losses import alignment
from xmodal_jax.models import towers
from xmodal_jax.train import state as state_lib

MAX_LOGIT_SCALE = 100.0
PAIRWISE = ("contrastive", "regression")  # seed 000, in shard_map over the data axis
ALIGNMENT = ("itc", "ims", "lmim", "itm")  # seed 001, on the global batch under jit
MOMENTUM = ("itc", "ims")  # need the momentum params and queues
OBJECTIVES = PAIRWISE + ALIGNMENT


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
    if not weight or name not in PAIRWISE:
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


def uses(loss_config, names):
  return any(loss_config.weights.get(name, 0.0) for name in names)


def distill_alpha(alignment_config, step):
  """Momentum distillation's alpha, ramped up linearly over `distill_ramp_steps`; None: off."""
  alpha = alignment_config.get("distill_alpha", 0.0)
  if not alpha:
    return None
  ramp = alignment_config.get("distill_ramp_steps", 0)
  return alpha * jnp.minimum(1.0, (step + 1) / ramp) if ramp else alpha


def alignment_objective(params, out, momentum_emb, queues, batch, scale, rng, alpha, *,
                        model, loss_config, mesh):
  """Seed 001's terms on the global batch: {name: value} for the weighted ones, and metrics.

  Scores against a queue stay sharded by the queue's rows (over the data axis)."""
  weights, emb = loss_config.weights, out["emb"]
  ids, masks = batch["_id"], batch["_mask"]
  terms, metrics = {}, {}
  queue_columns = jax.sharding.NamedSharding(mesh, P(None, parallel.DATA_AXIS))

  def queued(query, key):
    value, _ = alignment.queue_contrastive(
        emb[query], momentum_emb[query], momentum_emb[key], queues[key]["emb"], scale,
        ids=ids, key_mask=masks[key], query_mask=masks[query], queue_ids=queues[key]["ids"],
        alpha=alpha, queue_columns=queue_columns)
    return value
  if weights.get("itc"):
    for a, b in itertools.permutations(emb, 2):
      metrics[f"itc/{a}->{b}"] = queued(a, b)
    terms["itc"] = jnp.mean(jnp.stack([metrics[f"itc/{a}->{b}"]
                                       for a, b in itertools.permutations(emb, 2)]))
  if weights.get("ims"):
    for m in emb:
      metrics[f"ims/{m}"] = queued(m, m)
    terms["ims"] = jnp.mean(jnp.stack([metrics[f"ims/{m}"] for m in emb]))
  if weights.get("lmim"):
    for m, (local, valid) in out["locals"].items():
      metrics[f"lmim/{m}"] = alignment.lmim(emb[m], local, valid, scale, mask=masks[m])
    terms["lmim"] = jnp.mean(jnp.stack([metrics[f"lmim/{m}"] for m in out["locals"]]))
  if weights.get("itm"):
    values = []
    for pair in towers.fusion_pairs(model):
      a, b = pair.split(":")
      rng, pair_rng, dropout_rng = jax.random.split(rng, 3)
      similarity = jax.lax.stop_gradient(scale * emb[a] @ emb[b].T)
      neg_b, neg_b_ok, neg_a, neg_a_ok = alignment.hard_negatives(
          pair_rng, similarity, ids, ids, masks[a], masks[b])
      (tokens_a, valid_a), (tokens_b, valid_b) = out["tokens"][a], out["tokens"][b]
      logits = model.apply(
          {"params": params}, pair,
          jnp.concatenate([tokens_a, tokens_a, tokens_a[neg_a]]),
          jnp.concatenate([valid_a, valid_a, valid_a[neg_a]]),
          jnp.concatenate([tokens_b, tokens_b[neg_b], tokens_b]),
          jnp.concatenate([valid_b, valid_b[neg_b], valid_b]),
          train=True, method="match", rngs={"dropout": dropout_rng})
      pos, neg_for_a, neg_for_b = jnp.split(logits, 3)
      value, accuracy = alignment.matching_loss(pos, neg_for_a, neg_for_b, masks[a] & masks[b],
                                                neg_b_ok, neg_a_ok)
      metrics[f"itm/{pair}"], metrics[f"itm/{pair}/accuracy"] = value, accuracy
      values.append(value)
    terms["itm"] = jnp.mean(jnp.stack(values))
  return terms, metrics


def compute_loss(params, batch, rng, momentum_emb=None, queues=None, alpha=None, *, model,
                 loss_config, mesh):
  rng, align_rng = jax.random.split(rng)
  aligned = uses(loss_config, ALIGNMENT)
  out = model.apply({"params": params}, batch, train=True, details=aligned,
                    rngs={"dropout": rng})
  embeddings = out["emb"] if aligned else out
  scale = logit_scale(params)
  bias = params.get("logit_bias")
  loss, metrics = 0.0, {}
  if uses(loss_config, PAIRWISE):
    sharded = jax.shard_map(
        functools.partial(objective, loss_config=loss_config, axis_name=parallel.DATA_AXIS),
        mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P(), P()),
        out_specs=P())
    loss, metrics = sharded(embeddings, batch["_mask"], scale, bias)
  if aligned:
    terms, align_metrics = alignment_objective(params, out, momentum_emb, queues, batch, scale,
                                               align_rng, alpha, model=model,
                                               loss_config=loss_config, mesh=mesh)
    for name, value in terms.items():
      loss += loss_config.weights[name] * value
    metrics.update(terms)
    metrics.update(align_metrics)
  metrics["logit_scale"] = scale
  if bias is not None:
    metrics["logit_bias"] = bias
  return loss, metrics


def update_queues(queues, momentum_emb, batch, mesh):
  """Enqueues this step's momentum embeddings of every modality (FIFO, rows sharded: each
  device writes its batch rows into its own queue rows)."""
  sharded = jax.sharding.NamedSharding(mesh, P(parallel.DATA_AXIS))
  new, pointer = {}, queues["pointer"]
  for m, keys in momentum_emb.items():
    emb, ids, new_pointer = alignment.enqueue(
        queues[m]["emb"], queues[m]["ids"], pointer, keys, batch["_id"], batch["_mask"][m],
        shards=mesh.shape[parallel.DATA_AXIS])
    new[m] = {"emb": jax.lax.with_sharding_constraint(emb, sharded),
              "ids": jax.lax.with_sharding_constraint(ids, sharded)}
  new["pointer"] = new_pointer
  return new


def train_step(state, batch, *, model, tx, loss_config, mesh, seed, alignment_config=None):
  """One optimizer update on a global batch. Returns (new state, metrics).

  With momentum objectives (itc, ims), as ALBEF: the EMA params first move towards the
  current params (momentum from `alignment_config`), then embed the batch as keys; after the
  update those keys join the queues.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  extra, momentum_params, queues = {}, state.momentum_params, state.queues
  if queues is not None:
    momentum_params = state_lib.ema(momentum_params, state.params,
                                    alignment_config.get("momentum", 0.995))
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
  if queues is not None:
    queues = update_queues(queues, extra["momentum_emb"], batch, mesh)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       momentum_params=momentum_params, queues=queues), metrics


def embed_step(params, batch, *, model, tokens=()):
  """{modality: L2-normalized embeddings} for an eval batch; with `tokens` (modalities), also
  {modality: {"tokens", "valid"}} for re-ranking."""
  if not tokens:
    return model.apply({"params": params}, batch, train=False)
  out = model.apply({"params": params}, batch, train=False, details=True)
  return out["emb"], {m: {"tokens": out["tokens"][m][0], "valid": out["tokens"][m][1]}
                      for m in tokens}


def match_step(params, query_tokens, query_valid, context_tokens, context_valid, *, model,
               pair):
  """Matching scores (log-odds of "matched") of fusion pair "a:b" at evaluation."""
  logits = model.apply({"params": params}, pair, query_tokens, query_valid, context_tokens,
                       context_valid, train=False, method="match")
  return logits[:, 1] - logits[:, 0]
