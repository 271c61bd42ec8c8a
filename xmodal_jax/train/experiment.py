"""An experiment built from a config and a workdir: the checked config, dataset builder,
model, optimizer, mesh and the newest checkpoint's state. Training, evaluate, export and
search all start here."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax import parallel, pretrained as pretrained_lib
from xmodal_jax.parallel import sharding
from xmodal_jax.eval import embed, evaluators
from xmodal_jax.losses import objectives
from xmodal_jax.models import towers
from xmodal_jax.train import (checkpoint, embedding_cache, nonfinite, optimizer,
                              state as state_lib)


def validate_config(config, device_count=None):
  """Stops on an inconsistent config before any data is read or anything compiled; each
  objective and evaluator checks its own options. `device_count`: of the mesh to be (default:
  every device)."""
  device_count = device_count or jax.device_count()
  modalities = list(config.modalities)
  if len(modalities) < 2:
    raise ValueError(f"config.modalities: need at least 2 modalities, got {modalities}")
  tower_names = list(config.model.towers)
  if set(tower_names) != set(modalities):
    raise ValueError(f"config.model.towers has {sorted(tower_names)} but config.modalities has "
                     f"{sorted(modalities)}: every modality needs exactly one tower")
  objectives.validate(config)
  evaluators.validate(config)
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % device_count:
      raise ValueError(f"config.{key}={config[key]} does not divide by the "
                       f"{device_count} devices")
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1 or config.batch_size % (device_count * accum):
    raise ValueError(f"config.grad_accum_steps={accum!r}: expected a positive integer k with "
                     f"config.batch_size={config.batch_size} a multiple of k x the "
                     f"{device_count} devices (each micro-batch takes rows of every device)")
  for key in ("total_steps", "log_every", "checkpoint_every"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]}: expected a positive number of steps")
  if config.keep_checkpoints < 1:
    raise ValueError(f"config.keep_checkpoints={config.keep_checkpoints}: expected at least 1 "
                     "(the newest checkpoint is what a re-run resumes from)")
  optimizer.validate(config)
  embedding_cache.validate(config)
  nonfinite.validate(config)
  parallel.mesh_shape(config.get("mesh"), device_count)
  sharding.check_rules(config.get("sharding", sharding.DEFAULT_RULES))


def state_shardings(state, mesh, config):
  """The state's shardings: `config.sharding` rules (parallel/sharding.py), queue rows over
  the batch axes."""
  return sharding.state_shardings(state, mesh, config.get("sharding", sharding.DEFAULT_RULES))


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


@dataclasses.dataclass
class Experiment:
  """Everything built from a config and a workdir. `state` is the newest checkpoint's (or a
  fresh one at `step` 0); `embedder` embeds splits with the model (eval/embed.py)."""
  config: Any
  builder: Any
  model: Any
  tx: Any
  mesh: Any
  state: Any
  shardings: Any  # the state's, as config.mesh and config.sharding say
  step: int
  manager: Any
  embedder: embed.Embedder


def build_model_and_optimizer(config, shapes_only=False):
  """(model, pretrained params by path, optax optimizer) of a config whose tokenizers are
  resolved; text towers take their vocabulary size from their tokenizers. `shapes_only`:
  pretrained towers from their folders' config.json, no weights read (no params)."""
  from xmodal_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  vocab_sizes = {name: len(preprocess.load_tokenizer(m.tokenizer))
                 for name, m in config.modalities.items() if m.kind == "text"}
  model, pretrained = towers.build_model(
      config.model, vocab_sizes, loader=pretrained_lib.Loader(shapes_only=shapes_only))
  return model, pretrained, optimizer.make_optimizer(config)


def state_creator(config, model, tx):
  """example batch -> a fresh train state (with seed 001's EMA copy and queues when the
  objectives use them)."""
  queue_size = (config.alignment.queue_size if objectives.uses(config.loss, "momentum")
                else 0)
  return functools.partial(state_lib.create_train_state, model, tx, seed=config.seed,
                           queue_size=queue_size)


def setup(config, workdir, *, step=None, require_checkpoint=False):
  """Validates `config`, builds the dataset builder, model, optimizer and mesh, initializes
  the state (pretrained towers in place) and restores checkpoint `step` (default: newest)."""
  checkpoint.check_workdir(workdir)
  validate_config(config)
  config = resolve_tokenizers(config)
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  builder = pipeline.get_builder(config.data)
  pipeline.check_modalities(config, builder)
  model, pretrained, tx = build_model_and_optimizer(config)
  mesh = parallel.make_mesh(shape=config.get("mesh"))

  # Init needs shapes only: one row keeps its compile and run small.
  example = jax.tree.map(lambda x: x[:1],
                         next(pipeline.eval_iterator(config, builder, config.data.eval_split)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  create = state_creator(config, model, tx)
  abstract = jax.eval_shape(create, example)
  shardings = state_shardings(abstract, mesh, config)
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
  return Experiment(config, builder, model, tx, mesh, state, shardings, step, manager,
                    embed.Embedder(config, builder, model, mesh))
