"""An experiment assembled from a config: the one path that every launcher and the
ahead-of-time compiler take.

`assemble` resolves the config for the devices it will run on (xmodal_jax/schema.py), opens
its data source (or only describes its shapes), builds the model, optimizer and mesh, and
the train state's shapes and shardings. `setup` adds a workdir: it initializes or restores
the state. `compile_train_step` lowers the same assembly for devices that may not be here.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax import files, parallel, pretrained as pretrained_lib, schema, tokenizers
from xmodal_jax.data import source as source_lib
from xmodal_jax.eval import embed
from xmodal_jax.losses import objectives
from xmodal_jax.models import towers
from xmodal_jax.parallel import sharding
from xmodal_jax.train import (aot, checkpoint, embedding_cache, loop, optimizer, run_config,
                              run_lock, state as state_lib, step as step_lib, warm_start)


@dataclasses.dataclass
class Assembly:
  """What a config builds before any state exists: the resolved config, its data source,
  the model (and pretrained params by path), optimizer, mesh, the train state's abstract
  shapes and shardings, and the one-row abstract batch they were derived from."""
  config: Any
  source: source_lib.Source
  model: Any
  pretrained: dict
  tx: Any
  mesh: Any
  abstract_state: Any
  shardings: Any
  example: Any
  rules: dict  # what trains: optimizer.tower_rules
  init_plan: Any = None  # config.init's warm_start.Plan


@dataclasses.dataclass
class Experiment:
  """An assembly with a workdir: `state` is the newest checkpoint's (or a fresh one at
  `step` 0); `embedder` embeds splits with the model (eval/embed.py)."""
  config: Any
  source: source_lib.Source
  model: Any
  tx: Any
  mesh: Any
  state: Any
  shardings: Any
  step: int
  manager: Any
  embedder: embed.Embedder
  rules: dict

  def train_batches(self, start_step):
    """The training input from `start_step` on, with cached towers' embeddings in place."""
    batches = self.source.train_batches(start_step)
    if embedding_cache.cached_modalities(self.config):
      batches = embedding_cache.Cache.compute(self, self.state.params).batches(batches)
    return batches


def build_model_and_optimizer(config, shapes_only=False, example=None):
  """(model, pretrained params by path, optax optimizer, tower rules, config.init's plan)
  of a resolved config; text towers take their vocabulary size from their tokenizers.
  `shapes_only`: pretrained towers from their folders' config.json, no weights read (no
  params); `example`, a batch, is needed with config.init. A head loaded (CLIP's
  projection, or by config.init) freezes with its tower."""
  vocab_sizes = {name: len(tokenizers.load(m.tokenizer))
                 for name, m in config.modalities.items() if m.kind == "text" and m.tokenizer}
  model, pretrained = towers.build_model(
      config.model, vocab_sizes, loader=pretrained_lib.Loader(shapes_only=shapes_only))
  plan = None
  if config.init.checkpoint:
    shapes = jax.eval_shape(lambda batch: model.init(jax.random.key(0), batch, train=False,
                                                    method=model.init_all)["params"], example)
    plan = warm_start.make_plan(config.init, {
        sharding.path_name(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(shapes)})
  loaded_heads = {m for m in config.modalities
                  if (f"heads_{m}",) in pretrained or (plan and plan.loads_head(m))}
  rules = optimizer.tower_rules(config.train_policy, loaded_heads)
  tx = optimizer.make_optimizer(config.optimizer, config.total_steps, rules)
  return model, pretrained, tx, rules, plan


def state_creator(config, model, tx):
  """example batch -> a fresh train state (with the EMA copy and queues when the objectives
  use them)."""
  queue_size = (config.alignment.queue_size if objectives.uses(config.loss, "momentum")
                else 0)
  return functools.partial(state_lib.create_train_state, model, tx, seed=config.seed,
                           queue_size=queue_size)


def assemble(config, devices=None, *, read_data=True):
  """The Assembly of `config` for `devices` (default: every device). Without `read_data`
  nothing is read: no dataset (a features modality states its shape) and no pretrained
  weights (their folders' config.json)."""
  devices = devices or jax.devices()
  config = schema.resolve(config, len(devices), read_data=read_data)
  inputs = source_lib.input_config(config)
  rates = source_lib.tower_sample_rates(config.model)
  source = (source_lib.Source.open(inputs, rates) if read_data
            else source_lib.Source(inputs, None, rates))
  example = source.abstract_batch(1)
  model, pretrained, tx, rules, plan = build_model_and_optimizer(
      config, shapes_only=not read_data, example=example)
  mesh = parallel.make_mesh(devices, shape=config.mesh)
  abstract = jax.eval_shape(state_creator(config, model, tx), example)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding)
  return Assembly(config, source, model, pretrained, tx, mesh, abstract, shardings, example,
                  rules, plan)


def fresh_state(assembly):
  """A new state in the assembly's shardings, pretrained towers in place (the params depend
  on the example's shapes only, so zeros serve)."""
  example = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), assembly.example)
  state = state_lib.init_on_devices(state_creator(assembly.config, assembly.model, assembly.tx),
                                    example, assembly.shardings)
  if assembly.pretrained:  # Outside jit: the weights would otherwise become compiled-in constants.
    replicated = jax.sharding.NamedSharding(assembly.mesh, jax.sharding.PartitionSpec())
    state = state.replace(params=towers.insert_pretrained(
        state.params, jax.device_put(assembly.pretrained, replicated)))
  if assembly.init_plan:
    params, line = warm_start.load(assembly.init_plan, state.params)
    print(line, flush=True)
    state = state.replace(params=params)
  if (assembly.pretrained or assembly.init_plan) and state.momentum_params is not None:
    state = state.replace(momentum_params=jax.tree.map(jnp.copy, state.params))  # the EMA too
  return state


def placed(abstract, shardings):
  """jax.ShapeDtypeStructs of `abstract` with `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def setup(config, workdir, *, step=None, require_checkpoint=False, allow_config_change=False):
  """Assembles `config`, then restores checkpoint `step` of `workdir` (default: the newest)
  or initializes a fresh state. With `require_checkpoint` (a launcher reading a trained run)
  the workdir must hold checkpoints, nothing is created in it, and `config` must describe the
  run's model and inputs (train/run_config.py) unless `allow_config_change`."""
  checkpoint.check_workdir(workdir)
  if require_checkpoint and not files.exists(checkpoint.folder(workdir)):
    raise FileNotFoundError(f"{workdir}: no checkpoints folder, so not a trained run's "
                            "workdir (a misspelt --workdir?)")
  assembly = assemble(config)
  if require_checkpoint:
    run_config.check_reading(workdir, assembly.config, allow_changes=allow_config_change)
  manager = checkpoint.make_manager(workdir, assembly.config, create=not require_checkpoint)
  abstract = placed(assembly.abstract_state, assembly.shardings)
  state = None
  if step is None:  # Restored into shapes and shardings: nothing to initialize or compile.
    step, state = checkpoint.restore_newest(manager, abstract,
                                            assembly.config.checkpoint_fallback)
  elif step:
    state = checkpoint.restore(manager, abstract, step)
  if state is None and require_checkpoint:
    raise FileNotFoundError(f"{workdir}: no checkpoint to restore (train first)")
  if state is None:
    state = fresh_state(assembly)
  return Experiment(assembly.config, assembly.source, assembly.model, assembly.tx,
                    assembly.mesh, state, assembly.shardings, step, manager,
                    embed.Embedder(assembly.source, assembly.model, assembly.mesh),
                    assembly.rules)


def train(config, workdir, *, allow_config_change=False):
  """Trains `config` in `workdir` (resuming from its newest checkpoint), holding the
  workdir's lock (train/run_lock.py) on the first process; returns the last evaluation's
  metrics (train/loop.py)."""
  first = jax.process_index() == 0
  with run_lock.hold(workdir) if first else contextlib.nullcontext():
    return loop.train_and_evaluate(setup(config, workdir), workdir,
                                   allow_config_change=allow_config_change)


def compile_train_step(config, devices):
  """Compiles `config`'s train step for `devices` at `config.batch_size` (nothing read);
  returns the executable and an aot.Report. An executable that does not fit the chips'
  memory is an XLA error (RESOURCE_EXHAUSTED), raised as is."""
  assembly = assemble(config, devices, read_data=False)
  config, mesh = assembly.config, assembly.mesh
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows),
                       embedding_cache.abstract(
                           config, assembly.source.abstract_batch(config.batch_size)))
  train_fn = step_lib.jit_train_step(config, assembly.model, assembly.tx, mesh,
                                     assembly.shardings, assembly.rules)
  state = placed(assembly.abstract_state, assembly.shardings)
  start = time.perf_counter()
  compiled = aot.lower_and_compile(train_fn, state, batch, devices, mesh)
  return compiled, aot.report(compiled, devices, mesh, state, time.perf_counter() - start,
                              config.grad_accum_steps)
