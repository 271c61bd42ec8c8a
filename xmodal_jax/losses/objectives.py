"""Training objectives by name: `config.loss.weights = {name: weight}` picks and weighs them.

OBJECTIVES is the one table: the train step loops over it, the names a config may use come
from it, and each entry checks its own config options. Adding an objective is one function
and one entry (docs/architecture.md, "Adding an objective"):

    def mean_distance(inputs, loss_config):
      a, b = inputs.emb["audio"], inputs.emb["text"]
      return jnp.mean(jnp.sum((a - b) ** 2, axis=-1)), {}

    objectives.register("mean_distance", objectives.Objective(mean_distance))
"""

import dataclasses
import itertools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from xmodal_jax.losses import alignment, contrastive, pairs, regression


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Momentum:
  """What the momentum (EMA) model gives the itc/ims terms in one step, as one value."""
  emb: dict  # its embeddings of the batch {modality: [B, D]}
  queues: dict  # {modality: {"emb", "ids"}}: earlier steps' keys
  alpha: Any = None  # momentum distillation's alpha; None: off
  view_emb: Optional[dict] = None  # its embeddings of the second views (batch["_views"])


@dataclasses.dataclass
class Inputs:
  """What a term reads. A per-device term (Objective.per_device) runs inside shard_map and
  gets this device's rows of `emb`/`masks` with `axis_name` set, and nothing below `bias`; a
  global term gets the global batch under jit and the rest its Objective flags ask for."""
  emb: dict  # {modality: float32[B, D]}, L2-normalized
  masks: dict  # {modality: bool[B]}
  scale: Any  # the logit scale s (already exponentiated and clipped)
  bias: Any = None  # the sigmoid loss's bias, when the model has one
  axis_name: Optional[str] = None
  ids: Any = None  # int[B] item ids
  tokens: Optional[dict] = None  # details: {modality: (tokens [B, L, W], valid [B, L])}
  locals: Optional[dict] = None  # details: {modality: (local emb [B, K, D], valid [B, K])}
  momentum: Optional[Momentum] = None  # for momentum objectives
  queue_columns: Any = None  # sharding that keeps [B, Q] scores on the queue's row shards
  rng: Any = None
  match: Optional[Callable] = None  # (pair, a tokens, a valid, b tokens, b valid, rng) -> [n, 2]
  fusion_pairs: tuple = ()  # the model's fusion pairs "a:b"


def no_options(config):
  del config


@dataclasses.dataclass(frozen=True)
class Objective:
  """term(inputs, config.loss) -> (scalar, {metric name: value}); logged as train/{name}
  and train/{name}/{metric}.

  per_device: runs inside shard_map over the data axis on this device's rows (it must
    reduce over `inputs.axis_name` itself); otherwise on the global batch under jit.
  details: needs the towers' tokens and local features. momentum: needs the EMA params'
    embeddings and the queues (config.alignment).
  pair_scales: takes `inputs.scale` (and bias) as {pair "m-n": scalar}, as the model holds
    them with config.model.per_pair_temperature; otherwise one scalar.
  validate(config): raises ValueError naming the config field that is wrong.
  """
  term: Callable[[Inputs, Any], tuple]
  per_device: bool = False
  details: bool = False
  momentum: bool = False
  pair_scales: bool = False
  validate: Callable[[Any], None] = no_options


# --- PCMC / PCMR: every pair of modalities, per device ------------------------------------------


def pairwise_options(loss_config, inputs):
  return dict(pair_weights=dict(loss_config.pair_weights), impl=loss_config.impl,
              block_size=loss_config.block_size or None, axis_name=inputs.axis_name)


def contrastive_term(inputs, loss_config):
  return contrastive.contrastive_loss(inputs.emb, inputs.scale, masks=inputs.masks,
                                      kind=loss_config.kind, bias=inputs.bias,
                                      **pairwise_options(loss_config, inputs))


def regression_term(inputs, loss_config):
  return regression.similarity_regression_loss(inputs.emb, masks=inputs.masks,
                                               **dict(loss_config.regression),
                                               **pairwise_options(loss_config, inputs))


def validate_pairwise(config):
  pairs.check_options(impl=config.loss.impl, where="config.loss.")
  pairs.check_pair_weights(list(config.modalities), config.loss.pair_weights, "config.loss.")


def validate_contrastive(config):
  validate_pairwise(config)
  loss = config.loss
  if loss.kind == "sigmoid" and config.model.logit_bias_init is None:
    raise ValueError("config.loss.kind='sigmoid' needs config.model.logit_bias_init "
                     "(SigLIP uses -10)")
  contrastive.check_options(kind=loss.kind, impl=loss.impl, where="config.loss.")


def validate_regression(config):
  validate_pairwise(config)
  options = config.loss.regression
  regression.check_options(target=options.target, loss=options.loss, margin=options.margin,
                           impl=config.loss.impl, where="config.loss.regression.")


# --- ALBEF-style alignment on the global batch -------------------------------------------------


def queued(inputs, query, key, keys=None):
  """Cross-entropy of `query`'s embeddings against `key`'s momentum keys (or `keys`) and
  queue."""
  momentum = inputs.momentum
  value, _ = alignment.queue_contrastive(
      inputs.emb[query], momentum.emb[query], momentum.emb[key] if keys is None else keys,
      momentum.queues[key]["emb"], inputs.scale, ids=inputs.ids, key_mask=inputs.masks[key],
      query_mask=inputs.masks[query], queue_ids=momentum.queues[key]["ids"],
      alpha=momentum.alpha, queue_columns=inputs.queue_columns)
  return value


def mean_of(metrics):
  return jnp.mean(jnp.stack(list(metrics.values())))


def itc_term(inputs, loss_config):
  """Image-text contrastive, generalized: both directions of every pair, against queues."""
  del loss_config
  metrics = {f"{a}->{b}": queued(inputs, a, b) for a, b in itertools.permutations(inputs.emb, 2)}
  return mean_of(metrics), metrics


def intra_modal(loss_config, modalities):
  """The modalities the within-modality terms (ims, lmim) run on: config.loss.
  intra_modalities, or all when it is empty. Without a second view that varies what
  retrieval should ignore, these terms reward it (docs/methods.md, "The alignment recipe on
  this data": on the digit data, the speaker of each audio clip)."""
  chosen = loss_config.intra_modalities or list(modalities)
  return [m for m in modalities if m in chosen]


def ims_term(inputs, loss_config):
  """Intra-modal separability: each modality against its own momentum keys and queue. A
  modality with a second view (pipeline `second_view`) takes the momentum keys of that view,
  so its positive is another augmentation of the same item rather than the same input."""
  views = inputs.momentum.view_emb or {}
  metrics = {m: queued(inputs, m, m, views.get(m)) for m in intra_modal(loss_config, inputs.emb)}
  return mean_of(metrics), metrics


def lmim_term(inputs, loss_config):
  """Local mutual information between each sample's embedding and its own locals."""
  metrics = {m: alignment.lmim(inputs.emb[m], *inputs.locals[m], inputs.scale,
                               mask=inputs.masks[m])
             for m in intra_modal(loss_config, inputs.locals)}
  return mean_of(metrics), metrics


def validate_intra(config):
  chosen = list(config.loss.intra_modalities)
  unknown = [m for m in chosen if m not in config.modalities]
  if unknown:
    raise ValueError(f"config.loss.intra_modalities: {unknown} are not modalities of "
                     f"config.modalities {list(config.modalities)}")


def itm_term(inputs, loss_config):
  """Matching with hard negatives through each fusion pair's encoder."""
  del loss_config
  emb, ids, masks, rng = inputs.emb, inputs.ids, inputs.masks, inputs.rng
  metrics, values = {}, []
  for pair in inputs.fusion_pairs:
    a, b = pair.split(":")
    rng, pair_rng, dropout_rng = jax.random.split(rng, 3)
    similarity = jax.lax.stop_gradient(inputs.scale * emb[a] @ emb[b].T)
    neg_b, neg_b_ok, neg_a, neg_a_ok = alignment.hard_negatives(
        pair_rng, similarity, ids, ids, masks[a], masks[b])
    (tokens_a, valid_a), (tokens_b, valid_b) = inputs.tokens[a], inputs.tokens[b]
    logits = inputs.match(
        pair, jnp.concatenate([tokens_a, tokens_a, tokens_a[neg_a]]),
        jnp.concatenate([valid_a, valid_a, valid_a[neg_a]]),
        jnp.concatenate([tokens_b, tokens_b[neg_b], tokens_b]),
        jnp.concatenate([valid_b, valid_b[neg_b], valid_b]), dropout_rng)
    pos, neg_for_a, neg_for_b = jnp.split(logits, 3)
    value, accuracy = alignment.matching_loss(pos, neg_for_a, neg_for_b, masks[a] & masks[b],
                                              neg_b_ok, neg_a_ok)
    metrics[pair], metrics[f"{pair}/accuracy"] = value, accuracy
    values.append(value)
  return jnp.mean(jnp.stack(values)), metrics


def validate_momentum(config):
  """itc and ims keep EMA params and queues (config.alignment)."""
  if not 0.0 <= config.alignment.momentum < 1.0:
    raise ValueError(f"config.alignment.momentum={config.alignment.momentum}: expected "
                     "0 <= momentum < 1")


def validate_ims(config):
  validate_momentum(config)
  validate_intra(config)


def validate_second_views(config):
  """A modality's second_view feeds IMS only, and only differs from the first if it
  augments."""
  for name, m in config.modalities.items():
    if not m.second_view:
      continue
    where = f"config.modalities.{name}.second_view"
    if not config.loss.weights.get("ims", 0.0) or name not in intra_modal(config.loss,
                                                                           config.modalities):
      raise ValueError(f"{where}: only IMS reads a second view, and it does not run on "
                       f"{name!r} (config.loss.weights.ims, config.loss.intra_modalities)")
    if not m.augment:
      raise ValueError(f"{where}: with augment=False both views are the same example")


def validate_lmim(config):
  validate_intra(config)
  if not config.model.local_features:
    raise ValueError("config.loss.weights.lmim needs config.model.local_features > 0 "
                     "(local features per sample)")


def validate_itm(config):
  if not config.model.fusion.pairs:
    raise ValueError("config.loss.weights.itm needs config.model.fusion.pairs, e.g. "
                     "['text:video']")


OBJECTIVES = {
    "contrastive": Objective(contrastive_term, per_device=True, pair_scales=True,
                             validate=validate_contrastive),
    "regression": Objective(regression_term, per_device=True, pair_scales=True,
                            validate=validate_regression),
    "itc": Objective(itc_term, momentum=True, validate=validate_momentum),
    "ims": Objective(ims_term, momentum=True, validate=validate_ims),
    "lmim": Objective(lmim_term, details=True, validate=validate_lmim),
    "itm": Objective(itm_term, details=True, validate=validate_itm),
}


def register(name, objective):
  """Adds `objective` to the table under `name` (a new name only)."""
  if name in OBJECTIVES:
    raise ValueError(f"objective {name!r} exists already")
  OBJECTIVES[name] = objective


def active(loss_config):
  """{name: weight} of the objectives with a non-zero weight."""
  return {name: weight for name, weight in loss_config.weights.items() if weight}


def uses(loss_config, flag):
  """Whether any weighted objective has Objective flag `flag` ("details", "momentum", ...)."""
  return any(getattr(OBJECTIVES[name], flag) for name in active(loss_config))


def check_queue(config, device_count):
  """The momentum queues' rows are sharded over the devices and filled a batch at a time."""
  size = config.alignment.queue_size
  if size <= 0 or size % config.batch_size or size % device_count:
    raise ValueError(f"config.alignment.queue_size={size}: expected a positive multiple of "
                     f"config.batch_size={config.batch_size} and of the "
                     f"{device_count} devices")


def validate(config, device_count):
  """Checks config.loss.weights' names and each weighted objective's options, for a mesh of
  `device_count` devices."""
  for name in config.loss.weights:
    if name not in OBJECTIVES:
      raise ValueError(f"config.loss.weights.{name}: no such objective; expected names among "
                       f"{sorted(OBJECTIVES)}")
  if not active(config.loss):
    raise ValueError("config.loss.weights: every objective has weight 0")
  for name in active(config.loss):
    OBJECTIVES[name].validate(config)
  validate_second_views(config)
  if uses(config.loss, "momentum"):
    check_queue(config, device_count)
  if config.model.per_pair_temperature:
    scalar_scale = sorted(n for n in active(config.loss) if not OBJECTIVES[n].pair_scales)
    if scalar_scale:
      raise ValueError(f"config.model.per_pair_temperature=True: objectives {scalar_scale} "
                       "take one temperature (queues and within-modality terms have no "
                       "pair); set it False or weight them 0")
