"""Evaluators by name: `config.evals = {name: {type, every, split, prefix, ...}}`.

Each entry of `config.evals` runs evaluator `type` (a key of EVALUATORS) every `every`
steps and at the end of training, on `split` (default: config.data.eval_split), and names
its metrics "{prefix}/..." (default prefix: the split). Evaluators due at the same step on
the same split share one embedding pass. Adding an evaluator is one function and one entry
(docs/architecture.md, "Adding an evaluator").
"""

import dataclasses
from typing import Callable

import numpy as np

from xmodal_jax.eval import rerank, retrieval
from xmodal_jax.models import towers


def no_tokens(options, model):
  del options, model
  return ()


def no_options(options, config, where):
  del options, config, where


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """run(embedder, params, embedded split, options, prefix) -> {metric name: value}.

  tokens(options, model): modalities whose token features `run` needs in the split.
  validate(options, config, where): raises ValueError naming `where` + the bad field.
  """
  run: Callable
  tokens: Callable = no_tokens
  validate: Callable = no_options


# --- Retrieval between every ordered pair, and fused queries ---------------------------------


def retrieval_run(embedder, params, embedded, options, prefix):
  del embedder, params
  return retrieval.evaluate_pairs(embedded.emb, embedded.masks, embedded.ids, prefix,
                                  fused=options.get("fused", "all"))


def retrieval_validate(options, config, where):
  try:
    retrieval.fused_query_sets(list(config.modalities), options.get("fused", "all"))
  except ValueError as e:
    raise ValueError(f"{where}.fused: {e}") from e


# --- Re-ranked retrieval through a fusion pair's matching head (seed 001) --------------------


def rerank_pairs(options, model):
  """The fusion pairs "a:b" to re-rank with: options.pairs, or every pair of the model."""
  return list(options.get("pairs") or towers.fusion_pairs(model))


def rerank_tokens(options, model):
  return sorted({m for pair in rerank_pairs(options, model) for m in pair.split(":")})


def rerank_run(embedder, params, embedded, options, prefix):
  """Both directions of each pair: the embedding top `k` re-scored by the matching head,
  named "{prefix}/{query}->{gallery} (rerank)/{metric}"."""
  emb, masks, ids = embedded.emb, embedded.masks, embedded.ids
  metrics = {}
  for pair in rerank_pairs(options, embedder.model):
    a, b = pair.split(":")
    for query, gallery in ((a, b), (b, a)):
      query_rows, gallery_rows = np.flatnonzero(masks[query]), np.flatnonzero(masks[gallery])

      def scores(top, pair=pair, query=query, query_rows=query_rows,
                 gallery_rows=gallery_rows):
        return embedder.matching_scores(params, pair, embedded.tokens, query, query_rows,
                                        gallery_rows, top)
      values = rerank.rerank_metrics(emb[query][query_rows], emb[gallery][gallery_rows],
                                     ids[query_rows], ids[gallery_rows], scores, options.k)
      values["chance_R@1"] = retrieval.chance_recall(ids[query_rows], ids[gallery_rows], 1)
      metrics.update({f"{prefix}/{query}->{gallery} (rerank)/{name}": value
                      for name, value in values.items()})
  return metrics


def rerank_validate(options, config, where):
  if options.get("k", 0) <= 0:
    raise ValueError(f"{where}.k={options.get('k')}: expected the number of candidates to "
                     "re-rank (> 0)")
  model_pairs = list((config.model.get("fusion") or {}).get("pairs") or [])
  if not model_pairs:
    raise ValueError(f"{where}: re-ranking needs config.model.fusion.pairs (a matching head)")
  for pair in options.get("pairs") or []:
    if pair not in model_pairs:
      raise ValueError(f"{where}.pairs: {pair!r} is not one of config.model.fusion.pairs "
                       f"{model_pairs}")


EVALUATORS = {
    "retrieval": Evaluator(retrieval_run, validate=retrieval_validate),
    "rerank": Evaluator(rerank_run, tokens=rerank_tokens, validate=rerank_validate),
}


def register(name, evaluator):
  """Adds `evaluator` to the table under `name` (a new name only)."""
  if name in EVALUATORS:
    raise ValueError(f"evaluator {name!r} exists already")
  EVALUATORS[name] = evaluator


def validate(config):
  """Checks every entry of config.evals: a known type, a positive period, its options."""
  for name, options in config.get("evals", {}).items():
    where = f"config.evals.{name}"
    kind = options.get("type")
    if kind not in EVALUATORS:
      raise ValueError(f"{where}.type={kind!r}: expected one of {sorted(EVALUATORS)}")
    every = options.get("every")
    if not isinstance(every, int) or every <= 0:
      raise ValueError(f"{where}.every={every!r}: expected a positive number of steps")
    EVALUATORS[kind].validate(options, config, where)


def run(config, embedder, params, *, step=None, split=None):
  """Metrics of the config.evals entries due at `step` (every one when `step` is None, as at
  the end of training); `split` replaces every entry's split (an evaluate.py flag)."""
  groups = {}
  for options in config.get("evals", {}).values():
    if step is None or step % options.every == 0:
      name = split or options.get("split") or config.data.eval_split
      groups.setdefault(name, []).append(options)
  metrics = {}
  for name, group in groups.items():
    tokens = {m for options in group
              for m in EVALUATORS[options.type].tokens(options, embedder.model)}
    embedded = embedder.split(params, name, tokens=tokens)
    for options in group:
      prefix = options.get("prefix") or name
      metrics.update(EVALUATORS[options.type].run(embedder, params, embedded, options, prefix))
  return metrics
