"""A training stream mixed from several datasets by weight (config.data.sources).

Which source fills stream position g, and which of its examples, is a pure function of
(seed, g) (docs/architecture.md, "Mixtures"): positions come in blocks of BLOCK; source s
owns `quota[s]` of each block's slots, its weight's share rounded by largest remainder; a
seeded permutation of the block's positions (mixed_input.mixture_position) puts position g on
a slot, and the slot's owner is the source. Source s's own position is then
block x quota[s] + (slot - first slot of s): every source reads its own positions 0, 1, 2,
... in order, as a single dataset does, so each source's epochs are whole seeded
permutations of it, and a block of positions holds each source's share exactly.

This module holds the plain-Python part (no TensorFlow): it is what the config schema checks.
"""

import numpy as np

BLOCK = 10_000


def active(data_config):
  """The sources that contribute rows ({name: options}, weight > 0), sorted by name: their
  order is the source index of batch["_source"]."""
  return {name: data_config.sources[name] for name in sorted(data_config.sources)
          if data_config.sources[name].weight > 0}


def quotas(weights, block=BLOCK):
  """Slots per block of each weight: the largest-remainder rounding of its share of `block`
  (they sum to `block`; a positive weight too small for one slot is an error)."""
  weights = np.asarray(weights, np.float64)
  exact = weights / weights.sum() * block
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:block - counts.sum()]] += 1
  return counts


def own_features(modalities):
  """{modality: feature} of config.modalities: what a dataset read alone provides."""
  return {name: m.feature for name, m in modalities.items()}


def features(source_options, modalities):
  """{modality: dataset feature} a source provides: its `features` mapping, or (empty) every
  modality under its own config.modalities feature."""
  return dict(source_options.features) or own_features(modalities)


def validate(config):
  """config.data.sources: weights non-negative with a positive total, every source's
  modalities among the model's, every modality from some source, and no expanded captions
  (those read one dataset in order)."""
  sources = config.data.sources
  if not sources:
    return
  where = "config.data.sources"
  for name, options in sources.items():
    weight = options.weight
    if not isinstance(weight, (int, float)) or weight < 0 or not np.isfinite(weight):
      raise ValueError(f"{where}.{name}.weight={weight!r}: expected a number >= 0")
    unknown = sorted(set(options.features) - set(config.modalities))
    if unknown:
      raise ValueError(f"{where}.{name}.features names {unknown}, which the model does not "
                       f"have; its modalities are {list(config.modalities)}")
  mixed = active(config.data)
  if not mixed:
    raise ValueError(f"{where}: the weights sum to 0; give at least one source a positive "
                     "weight")
  counts = quotas([s.weight for s in mixed.values()])
  too_small = [name for name, count in zip(mixed, counts) if count == 0]
  if too_small:
    raise ValueError(f"{where}.{too_small[0]}.weight is below 1/{BLOCK} of the total: the "
                     f"mixture would give it no rows (raise it or set it to 0)")
  provided = {m for options in mixed.values() for m in features(options, config.modalities)}
  missing = [m for m in config.modalities if m not in provided]
  if missing:
    raise ValueError(f"{where}: no source with a positive weight provides the modalities "
                     f"{missing} (add them to a source's features)")
  expanded = [name for name, m in config.modalities.items()
              if m.kind == "text" and m.captions == "expand"]
  if expanded:
    raise ValueError(f"config.modalities.{expanded[0]}.captions=\"expand\" reads one dataset "
                     f"in order; a mixture (config.data.sources) samples each source by "
                     f"position: use captions=\"sample\"")
