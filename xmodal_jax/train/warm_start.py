"""Starting from another run (config.init): the parameters of its checkpoint, mapped onto
this model's by regex rules, replace the initializer's where a rule sends them.

Paths are "/"-joined parameter names ("towers_image/encoder/block0/mlp/fc1/kernel"). A rule
(pattern, replacement) applies to this model's path when the pattern matches all of it; the
replacement (re's \\1 or \\g<name>) names the checkpoint's path. The first matching rule
wins; with no rules every path maps to itself, and a path the checkpoint lacks starts from
its initializer. `skip` patterns keep paths at their initializer whatever the rules say.
"""

import dataclasses
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from xmodal_jax import files
from xmodal_jax.train import checkpoint as checkpoint_lib
from xmodal_jax.parallel import sharding


def item_folder(checkpoint):
  """The Orbax item folder of `checkpoint`: a run's workdir (its newest complete step), a
  step folder, or the item folder itself."""
  where = f"config.init.checkpoint={checkpoint!r}"
  steps = os.path.join(checkpoint, "checkpoints")
  if files.exists(steps):
    manager = ocp.CheckpointManager(files.absolute(steps),
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{where}: the run has no complete checkpoint")
    checkpoint = os.path.join(steps, str(step))
  for folder in (os.path.join(checkpoint, "default"), checkpoint):
    if files.exists(os.path.join(folder, "_METADATA")):
      problem = checkpoint_lib.damage(os.path.dirname(folder) if folder.endswith(
          "default") else folder)
      if problem:
        raise ValueError(f"{where}: its files do not match its digest ({problem})")
      return folder
  raise FileNotFoundError(f"{where}: neither a run's workdir nor an Orbax checkpoint folder")


def params_metadata(folder):
  """The Orbax item `folder`'s params as a tree of array metadata (shape, dtype)."""
  tree = ocp.StandardCheckpointer().metadata(files.absolute(folder)).item_metadata.tree
  if "params" not in tree:
    raise ValueError(f"{folder}: the checkpoint holds no params (keys {sorted(tree)})")
  return tree["params"]


def parameter_shapes(folder):
  """{path: shape} of the params saved in the Orbax item `folder`."""
  return {sharding.path_name(path): tuple(meta.shape)
          for path, meta in jax.tree_util.tree_leaves_with_path(params_metadata(folder))}


@dataclasses.dataclass
class Plan:
  """What config.init loads: {this model's path: the checkpoint's path}, and the paths
  skipped or left to the initializer."""
  folder: str
  loads: dict
  skipped: list
  initialized: list

  def loads_head(self, modality):
    return f"heads_{modality}/kernel" in self.loads


def make_plan(init, target_shapes):
  """The Plan of `init` (config.init) for a model whose params have `target_shapes`; None
  when no checkpoint is named. A rule that sends a path to one the checkpoint lacks, or to
  one of another shape, is an error naming both."""
  if not init.checkpoint:
    return None
  folder = item_folder(init.checkpoint)
  source_shapes = parameter_shapes(folder)
  try:
    rules = [(re.compile(p), r) for p, r in init.rules]
    skips = [re.compile(p) for p in init.skip]
  except (re.error, TypeError, ValueError) as e:
    raise ValueError(f"config.init.rules / skip: expected (regex, replacement) pairs and "
                     f"regexes ({e})") from e
  loads, skipped, initialized = {}, [], []
  for target, shape in target_shapes.items():
    if any(p.fullmatch(target) for p in skips):
      skipped.append(target)
      continue
    match = next((m for m in (p.fullmatch(target) for p, _ in rules) if m), None)
    source = target if not rules else (
        match.expand(dict(rules)[match.re]) if match else None)
    if source is None or (not rules and source not in source_shapes):
      initialized.append(target)
    elif source not in source_shapes:
      raise ValueError(f"config.init.rules send {target} to {source}, which {folder} does not "
                       f"hold (its paths look like {next(iter(source_shapes))!r})")
    elif source_shapes[source] != tuple(shape):
      raise ValueError(f"config.init: {target} {tuple(shape)} cannot take {source} "
                       f"{source_shapes[source]} from {folder}: the shapes differ")
    else:
      loads[target] = source
  if not loads:
    raise ValueError(f"config.init: nothing of {folder} maps onto the model (its paths look "
                     f"like {next(iter(source_shapes))!r}, the model's like "
                     f"{next(iter(target_shapes))!r})")
  return Plan(folder, loads, skipped, initialized)


def saved_params(folder):
  """{path: np.ndarray} of the params saved in the Orbax item `folder` (nothing else of
  the state is read)."""
  abstract = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                                     params_metadata(folder))}
  restored = ocp.PyTreeCheckpointer().restore(
      files.absolute(folder), args=ocp.args.PyTreeRestore(
          item=abstract, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    abstract)))
  return {sharding.path_name(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def load(plan, params):
  """`params` with the plan's paths taken from its checkpoint (each placed as the param it
  replaces), and a summary line for the console."""
  source = saved_params(plan.folder)

  def take(path, value):
    name = sharding.path_name(path)
    if name not in plan.loads:
      return value
    return jax.device_put(source[plan.loads[name]].astype(value.dtype), value.sharding)
  loaded = jax.tree_util.tree_map_with_path(take, params)
  count = sum(int(np.prod(v.shape)) for p, v in jax.tree_util.tree_leaves_with_path(params)
              if sharding.path_name(p) in plan.loads)
  line = (f"Initialized from {plan.folder}: {len(plan.loads)} arrays loaded ({count / 1e6:.2f}M "
          f"parameters), {len(plan.skipped)} skipped, {len(plan.initialized)} from their "
          "initializer" + (f" ({summary(plan.initialized)})" if plan.initialized else ""))
  return loaded, line


def summary(paths):
  """The top-level parts of `paths`, e.g. "towers_audio, heads_audio"."""
  return ", ".join(sorted({p.split("/")[0] for p in paths}))
