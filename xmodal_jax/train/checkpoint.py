"""Orbax checkpoints of the train state under {workdir}/checkpoints/."""

import importlib
import json
import os

import jax
import orbax.checkpoint as ocp

from xmodal_jax import files


def check_workdir(workdir):
  """Orbax lists the checkpoints of a gs:// workdir through google-cloud-storage: say which
  extra installs it before anything is built."""
  if str(workdir).startswith("gs://"):
    try:
      importlib.import_module("google.cloud.storage")
    except ImportError as e:
      raise ImportError(f"--workdir={workdir}: checkpoints in Cloud Storage need "
                        "google-cloud-storage: pip install -e \".[gcs]\"") from e


def folder(workdir):
  """The run's checkpoints folder."""
  return os.path.join(files.absolute(workdir), "checkpoints")


def make_manager(workdir, config, create=True):
  """Saves every `checkpoint_every` steps, keeps the newest `keep_checkpoints`; `create`
  makes the folder when absent (a reader passes False and checks it exists).

  Orbax finalizes a step's folder only once the save completed, so `latest_step()` always
  names a complete checkpoint, even after the process was killed mid-save.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every,
      create=create)
  return ocp.CheckpointManager(folder(workdir), options=options)


def restore(manager, state, step):
  """The state saved at `step`, shaped and sharded like `state` (arrays or
  jax.ShapeDtypeStructs with shardings); the error lists the steps there are."""
  steps = manager.all_steps()
  if step not in steps:
    raise FileNotFoundError(f"{manager.directory}: no checkpoint of step {step}; there are "
                            f"{sorted(steps)}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def save(manager, step, state, *, force=False):
  """Saves asynchronously when `step` is due (or `force`); returns whether it saved."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def identity(workdir, step):
  """What tells step `step`'s checkpoint from another saved at the same step (a rerun, a
  replaced folder): its step and Orbax's commit time, from the step's metadata file."""
  path = os.path.join(folder(workdir), str(step), "_CHECKPOINT_METADATA")
  meta = json.loads(files.read_text(path)) if files.exists(path) else {}
  return f"step {step}, committed at {meta.get('commit_timestamp_nsecs', 'unknown')} ns"
