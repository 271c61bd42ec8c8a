"""The training loop: validate config, build, restore, step, log, checkpoint, evaluate."""

import dataclasses
import functools
from typing import Any

import jax
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
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]}: expected a positive number of steps")


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
  """Yields, per eval batch, {"emb": {modality: [n, D]}, "_mask": {...}, "_id": [n]} as NumPy
  on every host, padding rows removed."""
  for batch in batches:
    batch = parallel.shard_batch(batch, mesh)
    out = {"emb": embed_fn(params, batch), "_mask": batch["_mask"], "_id": batch["_id"]}
    out = jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
    keep = out["_id"] >= 0
    yield jax.tree.map(lambda x: x[keep], out)


def embed_split(embed_fn, params, batches, mesh):
  """Runs `embed_fn` over eval batches; returns ({modality: emb[N, D]}, masks, ids)."""
  joined = jax.tree.map(lambda *xs: np.concatenate(xs),
                        *embed_batches(embed_fn, params, batches, mesh))
  return joined["emb"], joined["_mask"], joined["_id"]


def evaluate(config, builder, embed_fn, params, mesh, split=None):
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  split = split or config.data.eval_split
  embeddings, masks, ids = embed_split(
      embed_fn, params, pipeline.eval_iterator(config, builder, split), mesh)
  return retrieval.evaluate_pairs(embeddings, masks, ids, split,
                                  fused=config.get("eval", {}).get("fused", "all"))


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

  def embed_fn(self):
    """The jitted eval embedding step: (params, batch) -> {modality: embeddings}."""
    return jax.jit(functools.partial(step_lib.embed_step, model=self.model))


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
  init = jax.jit(functools.partial(state_lib.create_train_state, model, tx, seed=config.seed),
                 out_shardings=replicated)
  state = init(example)
  if pretrained:  # Outside jit: the weights would otherwise become compiled-in constants.
    state = state.replace(params=towers.insert_pretrained(
        state.params, jax.device_put(pretrained, replicated)))
  manager = checkpoint.make_manager(workdir, config)
  if step is None:
    state, step = checkpoint.restore_latest(manager, state)
  else:
    state = checkpoint.restore(manager, state, step)
  if require_checkpoint and not step:
    raise FileNotFoundError(f"{workdir}: no checkpoint to restore (train first)")
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
                        mesh=mesh, seed=config.seed),
      donate_argnums=(0,))
  embed_fn = experiment.embed_fn()
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
      eval_metrics = evaluate(config, builder, embed_fn, state.params, mesh)
      writer.write(step, eval_metrics)
      print(retrieval.format_table(eval_metrics, config.data.eval_split), flush=True)
  manager.wait_until_finished()
  if eval_metrics is None:  # Already trained: report the final checkpoint.
    eval_metrics = evaluate(config, builder, embed_fn, state.params, mesh)
    print(retrieval.format_table(eval_metrics, config.data.eval_split), flush=True)
  writer.close()
  manager.close()
  return eval_metrics
