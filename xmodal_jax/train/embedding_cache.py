"""ImageBind's recipe for a frozen tower: its embeddings of the training split are computed
once, when training starts, and the train step reads them instead of running the tower.

A tower opts in with `config.train_policy.<modality>.cache_embeddings=True`; it must be
frozen (trainable="none", no LoRA adapters) and its modality must not augment
(`augment=False` in config.modalities: training then prepares each example exactly as
evaluation does, so the cache holds what the tower would compute). Each item keeps one embedding, so every record of an item must hold the
same value of the modality (one image with five spoken captions: yes; five different
recordings under one id: no). Objectives that read a tower's token features (IMS, LMIM,
matching) cannot use a cached modality.
"""

import numpy as np

from xmodal_jax.losses import objectives


def cached_modalities(config):
  return [m for m, policy in config.train_policy.items() if policy.cache_embeddings]


def validate(config):
  """Raises on a cached tower that is not frozen, augments, or feeds a token objective."""
  weights = config.loss.weights
  intra = objectives.intra_modal(config.loss, config.modalities)
  fused = {m for pair in config.model.fusion.pairs for m in pair.split(":")}
  for modality in cached_modalities(config):
    where = f"config.train_policy.{modality}.cache_embeddings"
    tower, options = config.model.towers[modality], config.modalities[modality]
    policy = config.train_policy[modality]
    if policy.trainable != "none" or policy.head == "train" or tower.get("lora_rank"):
      raise ValueError(f"{where}: only a frozen tower's embeddings, its head's included, can "
                       "be cached (set trainable=\"none\", head auto or freeze, no lora_rank)")
    if options.augment or options.kind == "text":
      raise ValueError(f"{where}: config.modalities.{modality} must not augment (set "
                       "augment=False; text modalities pick captions, so they cannot be "
                       "cached)")
    if config.data.sources:
      raise ValueError(f"{where}: a cache keys embeddings by the item ids of one training "
                       "split; a mixture (config.data.sources) reads several")
    token_terms = [t for t in ("ims", "lmim") if weights.get(t, 0.0) and modality in intra]
    if token_terms or modality in fused:
      raise ValueError(f"{where}: {token_terms or 'the fusion encoders'} read this tower's "
                       "token features, which a cache does not keep")


class Cache:
  """{modality: (item ids sorted, float32[N, D] embeddings)} of the training split."""

  def __init__(self, tables):
    self.tables = tables

  @classmethod
  def compute(cls, experiment, params):
    """Embeds the training split's cached modalities with the frozen towers (evaluation
    preprocessing, which equals training's for them)."""
    tables, config = {}, experiment.config
    for modality in cached_modalities(config):
      embedder = experiment.embedder.for_dataset(
          {"name": config.data.name, "data_dir": config.data.data_dir},
          {modality: config.modalities[modality].feature})
      embedded = embedder.split(params, config.data.train_split)
      mask = embedded.masks[modality]
      ids, emb = embedded.ids[mask], embedded.emb[modality][mask]
      unique, counts = np.unique(ids, return_counts=True)
      if (counts > 1).any():
        raise ValueError(
            f"config.train_policy.{modality}.cache_embeddings: item(s) "
            f"{unique[counts > 1][:5].tolist()} of split {config.data.train_split!r} hold "
            f"several values of {modality!r}; a cache keeps one embedding per item")
      order = np.argsort(ids)
      tables[modality] = (ids[order], emb[order].astype(np.float32))
      print(f"Cached the frozen {modality} tower's embeddings of {len(ids)} training items.",
            flush=True)
    return cls(tables)

  def apply(self, batch):
    """`batch` with each cached modality's inputs replaced by its embeddings, looked up by
    the rows' item ids (zeros where a row lacks the modality)."""
    batch = dict(batch)
    for modality, (ids, emb) in self.tables.items():
      rows = np.minimum(np.searchsorted(ids, batch["_id"]), len(ids) - 1)
      present = batch["_mask"][modality]
      missing = present & (ids[rows] != batch["_id"])
      if missing.any():
        raise ValueError(f"{modality}: items {batch['_id'][missing][:5].tolist()} are not in "
                         "the embedding cache of the training split")
      batch[modality] = {"cached_embedding": np.where(present[:, None], emb[rows], 0.0)}
    return batch

  def batches(self, iterator):
    for batch in iterator:
      yield self.apply(batch)


def abstract(config, batch):
  """A data.source.abstract_batch with cached modalities as the train step sees them."""
  import jax  # pylint: disable=g-import-not-at-top
  out = dict(batch)
  for modality in cached_modalities(config):
    out[modality] = {"cached_embedding": jax.ShapeDtypeStruct(
        (batch["_id"].shape[0], config.model.embed_dim), np.float32)}
  return out
