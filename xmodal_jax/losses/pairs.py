"""The loop every pairwise objective shares: one term per unordered pair of modalities, then
the pair_weights-weighted mean over the pairs that have data (docs/methods.md, "Pairs").

Objectives supply only their per-pair term; argument checks, masks, counts and weighting
live here once.
"""

import itertools

import jax
import jax.numpy as jnp

from xmodal_jax.parallel import streaming

IMPLS = streaming.IMPLS


def modality_pairs(modalities):
  """All unordered pairs (m, n), m before n in the given order."""
  return list(itertools.combinations(modalities, 2))


def pair_name(m, n):
  return f"{m}-{n}"


def per_pair(value, name):
  """A scalar, or a {pair name: scalar} mapping's entry for `name`."""
  if isinstance(value, dict) or hasattr(value, "items"):
    if name not in value:
      raise ValueError(f"no value for pair {name!r} in {sorted(value)}")
    return value[name]
  return value


def check_options(*, impl, where=""):
  """The options every pairwise objective takes; `where` prefixes the field in errors."""
  if impl not in IMPLS:
    raise ValueError(f"{where}impl={impl!r}: expected one of {IMPLS}")


def check_pair_weights(modalities, pair_weights, where=""):
  """Every key of `pair_weights` must name a pair "m-n" of `modalities` (in their order)."""
  names = {pair_name(m, n) for m, n in modality_pairs(modalities)}
  for name in pair_weights or {}:
    if name not in names:
      raise ValueError(f"{where}pair_weights.{name}: no such pair; expected names among "
                       f"{sorted(names)}")


def normalize_masks(embeddings, masks):
  """{modality: bool[B]} for every modality of `embeddings` (all True where not given)."""
  batch = jax.tree.leaves(embeddings)[0].shape[0]
  masks = masks or {}
  unknown = set(masks) - set(embeddings)
  if unknown:
    raise ValueError(f"masks name modalities {sorted(unknown)} that have no embeddings")
  return {m: (jnp.ones((batch,), bool) if masks.get(m) is None else
              jnp.asarray(masks[m], bool)) for m in embeddings}


def mean_over_pairs(objective, embeddings, masks, pair_weights, impl, pair_term):
  """The weighted mean over all modality pairs of `pair_term(m, n, name, masks) -> (loss,
  count, metrics)`; a pair whose `count` (terms with data, over all devices) is 0 leaves the
  mean. `objective` names the caller in errors. Returns (loss, merged metrics)."""
  check_options(impl=impl)
  modalities = list(embeddings)
  if len(modalities) < 2:
    raise ValueError(f"{objective} needs at least 2 modalities, got {modalities}")
  masks = normalize_masks(embeddings, masks)
  pair_weights = pair_weights or {}
  total, weight_sum, metrics = 0.0, 0.0, {}
  for m, n in modality_pairs(modalities):
    name = pair_name(m, n)
    loss, count, pair_metrics = pair_term(m, n, name, masks)
    weight = jnp.where(count > 0, pair_weights.get(name, 1.0), 0.0)
    total += weight * loss
    weight_sum += weight
    metrics.update(pair_metrics)
  return total / jnp.maximum(weight_sum, 1e-12), metrics
