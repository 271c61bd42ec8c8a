"""Embedding a dataset split with a trained model over the mesh: what evaluation, export and
search share, and the matching head's scores for re-ranking."""

import dataclasses
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from xmodal_jax import parallel


def embed_step(params, batch, *, model, tokens=()):
  """{"emb": {modality: L2-normalized [B, D]}, "tokens": {m: {"tokens", "valid"}}} for an
  eval batch; "tokens" holds the modalities in `tokens` (re-ranking needs them), else {}."""
  if not tokens:
    return {"emb": model.apply({"params": params}, batch, train=False), "tokens": {}}
  out = model.apply({"params": params}, batch, train=False, local_features=False,
                    method="details")
  return {"emb": out["emb"], "tokens": {m: {"tokens": out["tokens"][m][0],
                                            "valid": out["tokens"][m][1]} for m in tokens}}


def match_step(params, pair, query_tokens, query_valid, context_tokens, context_valid, *,
               model):
  """Matching scores (log-odds of "matched") of fusion pair "a:b" at evaluation."""
  logits = model.apply({"params": params}, pair, query_tokens, query_valid, context_tokens,
                       context_valid, train=False, method="match")
  return logits[:, 1] - logits[:, 0]


@dataclasses.dataclass
class EmbeddedSplit:
  """Every eval example of a split: emb {modality: float32[N, D]}, masks {modality:
  bool[N]}, ids int64[N], tokens {modality: {"tokens", "valid"}} when asked for, and the
  split's name."""
  emb: dict
  masks: dict
  ids: np.ndarray
  tokens: dict
  split: str = ""


class Embedder:
  """A model's jitted embedding and matching steps over `mesh`, fed by a data source's eval
  batches (data/source.py: Source); compiled once per set of token modalities."""

  def __init__(self, source, model, mesh, prompt_modalities=None):
    self.source, self.model, self.mesh = source, model, mesh
    self.config = source.config  # the input slice: data, modalities, batch sizes
    # The model's modalities, for embed_texts even when this one reads a dataset with fewer.
    self.prompt_modalities = prompt_modalities or self.config.modalities
    self._embed_fns = {}
    self._text_fn = None
    self._match_fn = jax.jit(functools.partial(match_step, model=model), static_argnums=(1,))
    self._others = {}

  def for_dataset(self, data_config, provided):
    """An Embedder of the same model reading the modalities of `provided` ({modality:
    feature}) of another dataset: `data_config` {name, data_dir} as config.data takes them.
    Kept, so that evaluating it again compiles nothing."""
    key = (data_config.get("name"), data_config.get("data_dir"),
           tuple(sorted(provided.items())))
    if key not in self._others:
      self._others[key] = Embedder(self.source.for_dataset(data_config, provided),
                                   self.model, self.mesh, self.config.modalities)
    return self._others[key]

  def embed_fn(self, tokens=()):
    """The jitted (params, sharded batch) -> embed_step output."""
    tokens = tuple(sorted(tokens))
    if tokens not in self._embed_fns:
      self._embed_fns[tokens] = jax.jit(functools.partial(embed_step, model=self.model,
                                                          tokens=tokens))
    return self._embed_fns[tokens]

  def embed_one(self, params, modality, inputs, *, tokens=False):
    """(float32[1, D], (tokens, valid) or None) of one prepared input of `modality`
    (Source.prepare); compiled once per modality and `tokens`."""
    with jax.set_mesh(self.mesh):
      out = self.embed_fn((modality,) if tokens else ())(params, {modality: inputs})
    out = jax.tree.map(np.asarray, out)
    found = out["tokens"].get(modality)
    return out["emb"][modality], (found["tokens"], found["valid"]) if found else None

  def batches(self, params, split, *, tokens=(), ids=None):
    """Yields, per eval batch of `split` (only items `ids` when given), {"emb", "tokens",
    "_mask", "_id"} as NumPy on every host, padding rows removed."""
    embed = self.embed_fn(tokens)
    for batch in self.source.eval_batches(split, ids=ids):
      batch = parallel.shard_batch(batch, self.mesh)
      with jax.set_mesh(self.mesh):  # kernels such as Pallas attention run per device
        out = dict(embed(params, batch), _mask=batch["_mask"], _id=batch["_id"])
      out = jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
      keep = out["_id"] >= 0
      yield jax.tree.map(lambda x: x[keep], out)

  def local_batches(self, params, split, *, start_batch=0):
    """Yields, per eval batch of `split` from `start_batch` on, this process's own rows:
    {"emb", "_mask", "_id", "_key"} as NumPy, padding rows removed. Nothing is gathered
    across processes: each process keeps the rows it read."""
    embed = self.embed_fn()
    for batch in self.source.eval_batches(split, keys=True, start_batch=start_batch):
      keys = batch.pop("_key")
      sharded = parallel.shard_batch(batch, self.mesh)
      with jax.set_mesh(self.mesh):
        emb = embed(params, sharded)["emb"]
      emb = multihost_utils.global_array_to_host_local_array(
          emb, self.mesh, PartitionSpec(parallel.BATCH_AXES))
      keep = batch["_id"] >= 0
      yield jax.tree.map(lambda x: np.asarray(x)[keep], {
          "emb": emb, "_mask": batch["_mask"], "_id": batch["_id"], "_key": keys})

  def split(self, params, split, *, tokens=()):
    """The whole of `split` as one EmbeddedSplit."""
    joined = jax.tree.map(lambda *xs: np.concatenate(xs),
                          *self.batches(params, split, tokens=tokens))
    return EmbeddedSplit(joined["emb"], joined["_mask"], joined["_id"], joined["tokens"],
                         split)

  def embed_texts(self, params, modality, texts):
    """float32[len(texts), D] embeddings of `texts` through text modality `modality`'s
    preprocessing and tower (the same on every host)."""
    options = self.prompt_modalities[modality]
    inputs = [self.source.prepare(modality, options, text) for text in texts]
    batch = {key: np.concatenate([x[key] for x in inputs]) for key in inputs[0]}
    if self._text_fn is None:
      self._text_fn = jax.jit(lambda p, b: self.model.apply({"params": p}, b, train=False))
    with jax.set_mesh(self.mesh):
      return np.asarray(self._text_fn(params, {modality: batch})[modality])

  def matching_scores(self, params, pair, tokens, query_modality, query_rows, gallery_rows,
                      top, chunk=32):
    """float[Q, k] matching scores of each query row with its `top` gallery candidates
    (indices into `gallery_rows`), in chunks of `chunk` queries (the last one padded, so one
    compiled shape serves all). `tokens`: {modality: {"tokens", "valid"}} by row."""
    a, b = pair.split(":")
    num_queries, k = top.shape
    out = np.zeros((num_queries, k), np.float32)
    for start in range(0, num_queries, chunk):
      rows = np.arange(start, start + chunk).clip(max=num_queries - 1)
      query = np.repeat(query_rows[rows], k)
      gallery = gallery_rows[top[rows].reshape(-1)]
      items_a, items_b = (query, gallery) if query_modality == a else (gallery, query)
      scores = self._match_fn(params, pair, tokens[a]["tokens"][items_a],
                              tokens[a]["valid"][items_a], tokens[b]["tokens"][items_b],
                              tokens[b]["valid"][items_b])
      n = min(chunk, num_queries - start)
      out[start:start + n] = np.asarray(scores).reshape(chunk, k)[:n]
    return out
