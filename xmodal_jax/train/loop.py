"""The training loop: validate config, build, restore, step, log, checkpoint, evaluate."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from xmodal_jax import losses, parallel
from xmodal_jax.eval import retrieval
from xmodal_jax.models import towers
from xmodal_jax.train import checkpoint, metrics as metrics_lib, optimizer, state as state_lib
from xmodal_jax.train import step as step_lib


def validate_config(config):
  """Stops on an inconsistent config before any data is read or anything compiled."""
  modalities = list(config.modalities)
  if len(modalities) < 2:
    raise ValueError(f"config.modalities: need at least 2 modalities, got {modalities}")
  tower_names = list(config.model.towers)
  if set(tower_names) != set(modalities):
    raise ValueError(f"config.model.towers has {sorted(tower_names)} but config.modalities has "
                     f"{sorted(modalities)}: every modality needs exactly one tower")
  loss = config.loss
  for name in loss.weights:
    if name not in step_lib.OBJECTIVES:
      raise ValueError(f"config.loss.weights.{name}: no such objective; expected names among "
                       f"{step_lib.OBJECTIVES}")
  if not any(loss.weights.values()):
    raise ValueError("config.loss.weights: every objective has weight 0")
  if loss.kind not in losses.contrastive.KINDS:
    raise ValueError(f"config.loss.kind={loss.kind!r}: expected one of "
                     f"{losses.contrastive.KINDS}")
  if loss.kind == "sigmoid" and config.model.get("logit_bias_init") is None:
    raise ValueError("config.loss.kind='sigmoid' needs config.model.logit_bias_init "
                     "(SigLIP uses -10)")
  if loss.impl not in losses.contrastive.IMPLS:
    raise ValueError(f"config.loss.impl={loss.impl!r}: expected one of "
                     f"{losses.contrastive.IMPLS}")
  if loss.regression.target not in losses.regression.TARGETS:
    raise ValueError(f"config.loss.regression.target={loss.regression.target!r}: expected "
                     f"one of {losses.regression.TARGETS}")
  if loss.regression.loss not in losses.regression.LOSSES:
    raise ValueError(f"config.loss.regression.loss={loss.regression.loss!r}: expected one "
                     f"of {losses.regression.LOSSES}")
  pairs = {losses.contrastive.pair_name(m, n) for m, n in losses.modality_pairs(modalities)}
  for name in loss.pair_weights:
    if name not in pairs:
      raise ValueError(f"config.loss.pair_weights.{name}: no such pair; expected names among "
                       f"{sorted(pairs)}")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} does not divide by the "
                     f"{jax.device_count()} devices")
  if config.eval_batch_size % jax.device_count():
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} does not divide by the "
                     f"{jax.device_count()} devices")
  if "eval" in config:
    try:
      retrieval.fused_query_sets(modalities, config.eval.fused)
    except ValueError as e:
      raise ValueError(f"config.eval.fused: {e}") from e
  validate_alignment(config)
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]}: expected a positive number of steps")


def validate_alignment(config):
  """Seed 001's objectives need their parts: queues for itc/ims, local heads for lmim, fusion
  pairs for itm and re-ranking."""
  weights = config.loss.weights
  if step_lib.uses(config.loss, step_lib.MOMENTUM):
    if "alignment" not in config:
      raise ValueError("config.loss.weights uses itc/ims: set config.alignment = "
                       "dict(momentum=0.995, queue_size=65536, ...)")
    size = config.alignment.queue_size
    if size <= 0 or size % config.batch_size or size % jax.device_count():
      raise ValueError(f"config.alignment.queue_size={size}: expected a positive multiple of "
                       f"config.batch_size={config.batch_size} and of the "
                       f"{jax.device_count()} devices")
    if not 0.0 <= config.alignment.get("momentum", 0.995) < 1.0:
      raise ValueError(f"config.alignment.momentum={config.alignment.momentum}: expected "
                       "0 <= momentum < 1")
  if weights.get("lmim") and not config.model.get("local_features"):
    raise ValueError("config.loss.weights.lmim needs config.model.local_features > 0 "
                     "(local features per sample)")
  pairs = (config.model.get("fusion") or {}).get("pairs") or []
  if weights.get("itm") and not pairs:
    raise ValueError("config.loss.weights.itm needs config.model.fusion.pairs, e.g. "
                     "['text:video']")
  if config.get("eval", {}).get("rerank_k", 0) and not pairs:
    raise ValueError("config.eval.rerank_k needs config.model.fusion.pairs (a matching head)")


def state_shardings(state, mesh):
  """Queues are sharded by rows over the data axis; everything else is replicated."""
  def spec(path, leaf):
    keys = [getattr(p, "name", getattr(p, "key", None)) for p in path]
    rows = "queues" in keys and getattr(leaf, "ndim", 0) >= 1
    spec = (parallel.DATA_AXIS,) if rows else ()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  return jax.tree_util.tree_map_with_path(spec, state)


def resolve_tokenizers(config):
  """A copy of `config` where each text modality without a `tokenizer` takes its pretrained
  tower's folder (a Hugging Face model folder holds its tokenizer)."""
  config = config.copy_and_resolve_references()
  for name, modality in config.modalities.items():
    if modality.kind != "text" or modality.get("tokenizer"):
      continue
    tower = config.model.towers[name]
    if tower.get("name") != "pretrained":
      raise ValueError(f"config.modalities.{name}.tokenizer is unset and its tower is not "
                       "pretrained: name a tokenizer (a shipped name or a Hugging Face folder)")
    with modality.unlocked():
      modality.tokenizer = tower.path
  return config


def embed_batches(embed_fn, params, batches, mesh):
  """Yields, per eval batch, {"emb": {modality: [n, D]}, "_mask": {...}, "_id": [n]} (and
  "tokens" when `embed_fn` returns them) as NumPy on every host, padding rows removed."""
  for batch in batches:
    batch = parallel.shard_batch(batch, mesh)
    result = embed_fn(params, batch)
    out = {"_mask": batch["_mask"], "_id": batch["_id"]}
    if isinstance(result, tuple):
      out["emb"], out["tokens"] = result
    else:
      out["emb"] = result
    out = jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
    keep = out["_id"] >= 0
    yield jax.tree.map(lambda x: x[keep], out)


def embed_split(embed_fn, params, batches, mesh):
  """Runs `embed_fn` over eval batches; returns ({modality: emb[N, D]}, masks, ids) and, when
  `embed_fn` gives tokens, {modality: {"tokens", "valid"}} last."""
  joined = jax.tree.map(lambda *xs: np.concatenate(xs),
                        *embed_batches(embed_fn, params, batches, mesh))
  if "tokens" in joined:
    return joined["emb"], joined["_mask"], joined["_id"], joined["tokens"]
  return joined["emb"], joined["_mask"], joined["_id"]


def rerank_pairs(config):
  """Fusion pairs "a:b" to re-rank with at evaluation ([] when config.eval.rerank_k is 0)."""
  if not config.get("eval", {}).get("rerank_k", 0):
    return []
  return list((config.model.get("fusion") or {}).get("pairs") or [])


def matching_scores(match_fn, params, pair, tokens, query_modality, query_rows, gallery_rows,
                    top, chunk=32):
  """float[Q, k] matching scores of each query row with its `top` gallery candidates, in
  chunks of `chunk` queries (the last one padded, so one compiled shape serves all)."""
  a, b = pair.split(":")
  num_queries, k = top.shape
  out = np.zeros((num_queries, k), np.float32)
  for start in range(0, num_queries, chunk):
    rows = np.arange(start, start + chunk).clip(max=num_queries - 1)
    query = np.repeat(query_rows[rows], k)
    gallery = gallery_rows[top[rows].reshape(-1)]
    items_a, items_b = (query, gallery) if query_modality == a else (gallery, query)
    scores = match_fn(params, pair, tokens[a]["tokens"][items_a], tokens[a]["valid"][items_a],
                      tokens[b]["tokens"][items_b], tokens[b]["valid"][items_b])
    n = min(chunk, num_queries - start)
    out[start:start + n] = np.asarray(scores).reshape(chunk, k)[:n]
  return out


def evaluate(config, builder, embed_fn, params, mesh, split=None, match_fn=None):
  """Retrieval metrics of every pair and fused query on `split`; with `match_fn` and
  config.eval.rerank_k, also each fusion pair's re-ranked retrieval in both directions,
  named "{split}/{query}->{gallery} (rerank)/{metric}"."""
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import rerank  # pylint: disable=g-import-not-at-top
  split = split or config.data.eval_split
  out = embed_split(embed_fn, params, pipeline.eval_iterator(config, builder, split), mesh)
  embeddings, masks, ids = out[:3]
  metrics = retrieval.evaluate_pairs(embeddings, masks, ids, split,
                                     fused=config.get("eval", {}).get("fused", "all"))
  if len(out) == 4 and match_fn is not None:
    k = config.eval.rerank_k
    for pair in rerank_pairs(config):
      for query, gallery in (pair.split(":"), pair.split(":")[::-1]):
        query_rows, gallery_rows = np.flatnonzero(masks[query]), np.flatnonzero(masks[gallery])
        scores = functools.partial(matching_scores, match_fn, params, pair, out[3], query,
                                   query_rows, gallery_rows)
        values = rerank.rerank_metrics(embeddings[query][query_rows],
                                       embeddings[gallery][gallery_rows], ids[query_rows],
                                       ids[gallery_rows], scores, k)
        values["chance_R@1"] = metrics[f"{split}/{query}->{gallery}/chance_R@1"]
        for name, value in values.items():
          metrics[f"{split}/{query}->{gallery} (rerank)/{name}"] = value
  return metrics


@dataclasses.dataclass
class Experiment:
  """Everything built from a config and a workdir: what train, evaluate, export and search
  share. `state` is the newest checkpoint's (or a fresh one at `step` 0)."""
  config: Any
  builder: Any
  model: Any
  tx: Any
  mesh: Any
  state: Any
  step: int
  manager: Any

  def embed_fn(self, tokens=None):
    """The jitted eval embedding step: (params, batch) -> {modality: embeddings}; with
    `tokens` (default: what re-ranking needs), also the towers' tokens."""
    if tokens is None:
      tokens = sorted({m for pair in rerank_pairs(self.config)
                       for m in pair.split(":")})
    return jax.jit(functools.partial(step_lib.embed_step, model=self.model,
                                     tokens=tuple(tokens)))

  def match_fn(self):
    """The jitted matching head, (params, pair, a tokens, a valid, b tokens, b valid) ->
    scores, for `matching_scores`."""
    return jax.jit(lambda params, pair, *args: step_lib.match_step(
        params, *args, model=self.model, pair=pair), static_argnums=(1,))


def setup(config, workdir, *, step=None, require_checkpoint=False):
  """Validates `config`, builds the dataset builder, model, optimizer and mesh, initializes
  the state (pretrained towers in place) and restores checkpoint `step` (default: newest)."""
  validate_config(config)
  config = resolve_tokenizers(config)
  from xmodal_jax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top
  builder = pipeline.get_builder(config.data)
  pipeline.check_modalities(config, builder)
  vocab_sizes = {name: len(preprocess.load_tokenizer(m.tokenizer))
                 for name, m in config.modalities.items() if m.kind == "text"}
  model, pretrained = towers.build_model(config.model, vocab_sizes)
  tx = optimizer.make_optimizer(config)
  mesh = parallel.make_mesh()

  # Init needs shapes only: one row keeps its compile and run small.
  example = jax.tree.map(lambda x: x[:1],
                         next(pipeline.eval_iterator(config, builder, config.data.eval_split)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  queue_size = (config.alignment.queue_size
                if step_lib.uses(config.loss, step_lib.MOMENTUM) else 0)
  create = functools.partial(state_lib.create_train_state, model, tx, seed=config.seed,
                             queue_size=queue_size)
  abstract = jax.eval_shape(create, example)
  shardings = state_shardings(abstract, mesh)
  manager = checkpoint.make_manager(workdir, config)
  if step is None:
    step = manager.latest_step() or 0
  if step:  # Restored into shapes and shardings: nothing to initialize or compile.
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state = checkpoint.restore(manager, target, step)
  else:
    if require_checkpoint:
      raise FileNotFoundError(f"{workdir}: no checkpoint to restore (train first)")
    state = state_lib.init_on_devices(create, example, shardings)
    if pretrained:  # Outside jit: the weights would otherwise become compiled-in constants.
      state = state.replace(params=towers.insert_pretrained(
          state.params, jax.device_put(pretrained, replicated)))
      if state.momentum_params is not None:  # The EMA starts from the loaded weights too.
        state = state.replace(momentum_params=jax.tree.map(jnp.copy, state.params))
  return Experiment(config, builder, model, tx, mesh, state, step, manager)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  experiment = setup(config, workdir)
  config, builder, model, tx, mesh = (experiment.config, experiment.builder, experiment.model,
                                      experiment.tx, experiment.mesh)
  state, start_step, manager = experiment.state, experiment.step, experiment.manager
  if start_step:
    print(f"Resuming from the checkpoint of step {start_step}.", flush=True)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{num_params / 1e6:.2f}M parameters; {jax.device_count()} devices; global batch "
        f"{config.batch_size}", flush=True)

  writer = metrics_lib.MetricWriter(workdir, start_step)
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, tx=tx, loss_config=config.loss,
                        mesh=mesh, seed=config.seed,
                        alignment_config=config.get("alignment")),
      donate_argnums=(0,))
  embed_fn, match_fn = experiment.embed_fn(), experiment.match_fn()
  batches = pipeline.train_iterator(config, builder, start_step=start_step)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  eval_metrics = None
  for step in range(start_step + 1, config.total_steps + 1):
    state, train_metrics = train_fn(state, parallel.shard_batch(next(batches), mesh))
    if step % config.log_every == 0 or step == config.total_steps:
      train_metrics = jax.device_get(train_metrics)
      writer.write(step, {f"train/{k}": v for k, v in train_metrics.items()}
                   | {"train/learning_rate": optimizer.learning_rate_schedule(config)(step)})
      print(progress.line(step, float(train_metrics["loss"])), flush=True)
    checkpoint.save(manager, step, state, force=step == config.total_steps)
    if step % config.eval_every == 0 or step == config.total_steps:
      eval_metrics = evaluate(config, builder, embed_fn, state.params, mesh,
                              match_fn=match_fn)
      writer.write(step, eval_metrics)
      print(retrieval.format_table(eval_metrics, config.data.eval_split), flush=True)
  manager.wait_until_finished()
  if eval_metrics is None:  # Already trained: report the final checkpoint.
    eval_metrics = evaluate(config, builder, embed_fn, state.params, mesh, match_fn=match_fn)
    print(retrieval.format_table(eval_metrics, config.data.eval_split), flush=True)
  writer.close()
  manager.close()
  return eval_metrics
