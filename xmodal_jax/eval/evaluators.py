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

from xmodal_jax.eval import rerank, retrieval, zeroshot
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
  options: {name: (default, meaning)} of the options this type takes beside every entry's
    (type, every, split, prefix); default `...`: required. xmodal_jax/schema.py fills them.
  """
  run: Callable
  tokens: Callable = no_tokens
  validate: Callable = no_options
  options: dict = dataclasses.field(default_factory=dict)


# --- Retrieval between every ordered pair, and fused queries ---------------------------------


def retrieval_run(embedder, params, embedded, options, prefix):
  """Every pair and fused query (retrieval.evaluate_pairs); modalities in
  options.class_level match by the items' "label" (their class) instead of their id."""
  del params
  class_level, class_ids = tuple(options.class_level), None
  if class_level:
    labels = embedder.source.item_labels(embedded.split, "label")
    names = [labels[int(i)] for i in embedded.ids]
    unlabelled = [embedded.ids[i] for i, name in enumerate(names) if not name
                  and any(embedded.masks[m][i] for m in class_level)]
    if unlabelled:
      raise ValueError(f"{prefix}: class_level={class_level} needs every item's \"label\"; "
                       f"{len(unlabelled)} items have none (ids {unlabelled[:5]})")
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    class_ids = np.array([index[name] for name in names], np.int64)
  return retrieval.evaluate_pairs(embedded.emb, embedded.masks, embedded.ids, prefix,
                                  fused=options.fused, class_ids=class_ids,
                                  class_level=class_level)


def check_dataset(options, config, where):
  """An evaluator's own dataset: options.data {name, data_dir, split} and options.features
  {modality: feature} among the model's modalities."""
  data = options.data
  if data is not None and not data.get("name"):
    raise ValueError(f"{where}.data: expected a dataset, {{name, data_dir, split}}, got "
                     f"{data!r}")
  unknown = sorted(set(dataset_features(options, config.modalities)) - set(config.modalities))
  if unknown:
    raise ValueError(f"{where}.features names {unknown}, which the model does not have; its "
                     f"modalities are {list(config.modalities)}")


def dataset_features(options, modalities):
  """{modality: feature} an evaluator reads from its own dataset."""
  if options.type == "zeroshot":
    return {options.modality: options.feature or modalities[options.modality].feature}
  return dict(options.features) or {m: o.feature for m, o in modalities.items()}


def retrieval_validate(options, config, where):
  check_dataset(options, config, where)
  if options.data is not None and len(dataset_features(options, config.modalities)) < 2:
    raise ValueError(f"{where}.features: retrieval needs at least 2 modalities of "
                     f"{options.data.name!r}")
  try:
    retrieval.fused_query_sets(list(config.modalities), options.fused)
  except ValueError as e:
    raise ValueError(f"{where}.fused: {e}") from e
  for modality in options.class_level:
    if modality not in config.modalities:
      raise ValueError(f"{where}.class_level: {modality!r} is not one of "
                       f"{list(config.modalities)}")


# --- Re-ranked retrieval through a fusion pair's matching head (ALBEF) ----------------------


def rerank_pairs(options, model):
  """The fusion pairs "a:b" to re-rank with: options.pairs, or every pair of the model."""
  return list(options.pairs or towers.fusion_pairs(model))


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
  if not isinstance(options.k, int) or options.k <= 0:
    raise ValueError(f"{where}.k={options.k!r}: expected the number of candidates to "
                     "re-rank (> 0)")
  model_pairs = list(config.model.fusion.pairs)
  if not model_pairs:
    raise ValueError(f"{where}: re-ranking needs config.model.fusion.pairs (a matching head)")
  for pair in options.pairs:
    if pair not in model_pairs:
      raise ValueError(f"{where}.pairs: {pair!r} is not one of config.model.fusion.pairs "
                       f"{model_pairs}")


# --- Zero-shot classification (CLIP's protocol, any modality) --------------------------------


def zeroshot_text_modality(options, modalities):
  return options.text or next(
      (n for n, m in modalities.items() if m.kind == "text"), None)


def zeroshot_run(embedder, params, embedded, options, prefix):
  """Top-1/top-5 accuracy and mean per-class recall of classifying `options.modality`'s
  items among the classes (options.classes, or every label of the split) by prompts
  (options.templates, or DEFAULT_TEMPLATES of its kind) through text modality
  options.text; named "{prefix}/zeroshot/{modality}/{metric}". With options.data (name,
  data_dir, split), the items come from that dataset (its `feature`, by default the
  modality's own), as ESC-50 or ImageNet after training on pairs; the prefix is its name."""
  config, modality = embedder.config, options.modality
  labels_by_id = embedder.source.item_labels(embedded.split, options.label_feature)
  rows = np.flatnonzero(embedded.masks[modality])
  names = np.array([labels_by_id[int(i)] for i in embedded.ids[rows]])
  rows, names = rows[names != ""], names[names != ""]
  classes = list(options.classes or sorted(set(names)))
  unknown = sorted(set(names) - set(classes))
  if unknown:
    raise ValueError(f"zero-shot on {embedded.split!r}: labels {unknown[:5]} are not among "
                     f"the evaluator's classes")
  templates = list(options.templates or
                   zeroshot.DEFAULT_TEMPLATES[config.modalities[modality].kind])
  prompts = [template.format(name) for name in classes for template in templates]
  text = zeroshot_text_modality(options, embedder.prompt_modalities)
  prompt_emb = embedder.embed_texts(params, text, prompts)
  class_emb = zeroshot.class_embeddings(prompt_emb.reshape(len(classes), len(templates), -1))
  index = {name: i for i, name in enumerate(classes)}
  labels = np.array([index[name] for name in names], np.int64)
  metrics = zeroshot.classification_metrics(embedded.emb[modality][rows], labels, class_emb)
  metrics["chance_top1"] = 100.0 / len(classes)
  return {f"{prefix}/zeroshot/{modality}/{name}": value for name, value in metrics.items()}


def zeroshot_validate(options, config, where):
  modality = options.modality
  if modality not in config.modalities:
    raise ValueError(f"{where}.modality={modality!r}: expected one of "
                     f"{list(config.modalities)} (the modality to classify)")
  text = zeroshot_text_modality(options, config.modalities)
  if text not in config.modalities or config.modalities[text].kind != "text":
    raise ValueError(f"{where}.text={text!r}: expected a text modality to embed the prompts")
  for template in options.templates:
    if not isinstance(template, str) or "{}" not in template:
      raise ValueError(f"{where}.templates: {template!r} has no {{}} for the class name")
  classes = options.classes
  if any(not isinstance(c, str) or not c for c in classes):
    raise ValueError(f"{where}.classes: expected non-empty class names, got {classes!r}")
  check_dataset(options, config, where)


EVALUATORS = {
    "retrieval": Evaluator(retrieval_run, validate=retrieval_validate, options={
        "fused": ("all", "fused queries: \"all\" subsets of 2..M-1 modalities, \"none\", "
                  "or a list such as [\"audio+video\"]"),
        "class_level": ((), "modalities that describe an item's class: pairs with them "
                        "match by the items' label"),
        "data": (None, "another dataset to evaluate: {name, data_dir, split}; prefix "
                 "default: \"{name}/{split}\""),
        "features": ({}, "{modality: feature} of that dataset (the pairs of the others are "
                     "not evaluated); empty: every modality, under its own feature"),
    }),
    "rerank": Evaluator(rerank_run, tokens=rerank_tokens, validate=rerank_validate, options={
        "k": (..., "candidates re-scored by the matching head per query"),
        "pairs": ((), "fusion pairs to re-rank with; empty: every pair of the model"),
    }),
    "zeroshot": Evaluator(zeroshot_run, validate=zeroshot_validate, options={
        "modality": (..., "the modality whose items are classified"),
        "text": ("", "the text modality that embeds the prompts; empty: the first"),
        "templates": ((), "prompt templates with {} for the class name; empty: the "
                      "kind's defaults"),
        "classes": ((), "class names; empty: every label of the split"),
        "label_feature": ("label", "the dataset feature holding each item's class"),
        "data": (None, "another dataset to classify: {name, data_dir, split}"),
        "feature": ("", "that dataset's feature for the modality; empty: the modality's"),
    }),
}


def register(name, evaluator):
  """Adds `evaluator` to the table under `name` (a new name only)."""
  if name in EVALUATORS:
    raise ValueError(f"evaluator {name!r} exists already")
  EVALUATORS[name] = evaluator


def validate(config):
  """Checks every entry of config.evals (its type known, as xmodal_jax/schema.py found when
  filling its options): a positive period, its options."""
  for name, options in config.evals.items():
    where = f"config.evals.{name}"
    every = options.every
    if not isinstance(every, int) or every <= 0:
      raise ValueError(f"{where}.every={every!r}: expected a positive number of steps")
    EVALUATORS[options.type].validate(options, config, where)


_NOTED = set()


def note_missing_pairs(prefix, modalities, provided):
  """Says once per process which of the model's modalities an evaluator's dataset lacks (so
  their pairs are absent from its metrics by design, not by accident)."""
  missing = [m for m in modalities if m not in provided]
  if missing and len(provided) > 1 and prefix not in _NOTED:
    _NOTED.add(prefix)
    print(f"{prefix}: the dataset has no {', '.join(missing)}; its pairs with "
          f"{'them' if len(missing) > 1 else 'it'} are not evaluated", flush=True)


@dataclasses.dataclass(frozen=True)
class Result:
  """One config.evals entry's metrics, and what it evaluated."""
  name: str
  task: str
  dataset: str
  split: str
  metrics: dict


def run_entries(config, embedder, params, *, step=None, split=None):
  """[Result] of the config.evals entries due at `step` (every one when `step` is None, as
  at the end of training); `split` replaces every entry's split on config.data (an
  evaluate.py flag). Entries on the same split share one embedding pass."""
  groups, elsewhere = {}, []
  for name, options in config.evals.items():
    if step is None or step % options.every == 0:
      if options.get("data"):  # another dataset: embedded on its own
        elsewhere.append((name, options))
        continue
      split_name = split or options.split or config.data.eval_split
      groups.setdefault(split_name, []).append((name, options))
  results = []
  for name, options in elsewhere:
    provided = dataset_features(options, config.modalities)
    other = embedder.for_dataset(options.data, provided)
    data_split = options.data.get("split", "test")
    prefix = options.prefix or (options.data.name if options.type == "zeroshot"
                                else f"{options.data.name}/{data_split}")
    note_missing_pairs(prefix, config.modalities, provided)
    embedded = other.split(params, data_split)
    results.append(Result(name, options.type, options.data.name, data_split,
                          EVALUATORS[options.type].run(other, params, embedded, options,
                                                       prefix)))
  for split_name, group in groups.items():
    tokens = {m for _, options in group
              for m in EVALUATORS[options.type].tokens(options, embedder.model)}
    embedded = embedder.split(params, split_name, tokens=tokens)
    for name, options in group:
      prefix = options.prefix or split_name
      results.append(Result(name, options.type, config.data.name, split_name,
                            EVALUATORS[options.type].run(embedder, params, embedded, options,
                                                         prefix)))
  return results


def run(config, embedder, params, *, step=None, split=None):
  """The metrics of run_entries, merged into one mapping."""
  metrics = {}
  for result in run_entries(config, embedder, params, step=step, split=split):
    metrics.update(result.metrics)
  return metrics
