"""Orbax checkpoints of the train state under {workdir}/checkpoints/, each sealed with a
digest of its files once saved, and verified before it is restored."""

import contextlib
import hashlib
import importlib
import json
import os
import sys

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


DIGEST_FILE = "xmodal_digest.json"  # in the step's folder: {"sha256": {file: hex digest}}


def step_folder(workdir, step):
  return os.path.join(folder(workdir), str(step))


def file_digests(path):
  """{file under folder `path`: SHA-256 hex} of every file but the digest itself."""
  digests = {}
  for name in files.walk_files(path):
    if name == DIGEST_FILE:
      continue
    sha = hashlib.sha256()
    with files.open_file(os.path.join(path, name), "rb") as f:
      while chunk := f.read(16 << 20):
        sha.update(chunk)
    digests[name] = sha.hexdigest()
  return digests


def seal(workdir, step):
  """Writes the digest of checkpoint `step`'s files (after Orbax finished saving it)."""
  path = step_folder(workdir, step)
  files.write_atomically(os.path.join(path, DIGEST_FILE),
                         json.dumps({"sha256": file_digests(path)}, indent=0))


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (a full disk, a storage error); one line."""


@contextlib.contextmanager
def reporting_saves(step):
  """Turns whatever Orbax or the storage raised while saving into SaveFailed, naming the
  step at which it was found."""
  try:
    yield
  except SaveFailed:
    raise
  except Exception as e:  # pylint: disable=broad-except  # whatever the writer raised
    raise SaveFailed(f"step {step}: saving a checkpoint failed: {first_line(e)}") from e


def check_saves(manager, step):
  """Raises SaveFailed when a background save failed (checked every step, so a full disk
  stops the run at the step that finds it). Orbax keeps a failed save's error in its
  finalizing thread, which only waiting raises; once no save is in progress, that wait
  does not block."""
  with reporting_saves(step):
    manager.check_for_errors()
    if not manager.is_saving_in_progress():
      manager.wait_until_finished()


def wait_for_saves(manager, step):
  """Waits for the background save to finish; SaveFailed when it failed."""
  with reporting_saves(step):
    manager.wait_until_finished()


def seal_finished(manager, workdir, step):
  """Seals (process 0) every finished checkpoint that has no digest yet, after checking
  that no background save failed. Called after each save and at the end of a run."""
  check_saves(manager, step)
  if jax.process_index():
    return
  steps = sorted(manager.all_steps())
  if manager.is_saving_in_progress():
    steps = steps[:-1]
  for saved in steps:
    if not files.exists(os.path.join(step_folder(workdir, saved), DIGEST_FILE)):
      seal(workdir, saved)


def damage(path):
  """What is wrong with the files of the checkpoint in step folder `path` against its digest
  ("" when they match; a checkpoint saved before digests existed, or killed before it was
  sealed, has none)."""
  digest_path = os.path.join(path, DIGEST_FILE)
  if not files.exists(digest_path):
    return ""
  expected = json.loads(files.read_text(digest_path))["sha256"]
  found = file_digests(path)
  missing = sorted(set(expected) - set(found))
  changed = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
  parts = [f"{len(missing)} file(s) missing ({missing[0]}...)" if missing else "",
           f"{len(changed)} file(s) changed ({changed[0]}...)" if changed else ""]
  return "; ".join(p for p in parts if p)


class DamagedCheckpoint(ValueError):
  """A checkpoint whose files do not match its digest."""


def first_line(error):
  """The error's type and first line; a long line keeps its start and its end (where
  storage errors name the cause)."""
  text = str(error).strip()
  if not text:
    return type(error).__name__
  line = text.splitlines()[0]
  if len(line) > 300:
    line = f"{line[:150]} ... {line[-150:]}"
  return f"{type(error).__name__}: {line}"


def restore(manager, state, step):
  """The state saved at `step`, shaped and sharded like `state` (arrays or
  jax.ShapeDtypeStructs with shardings), after checking its files against its digest
  (DamagedCheckpoint); the error lists the steps there are."""
  steps = manager.all_steps()
  if step not in steps:
    raise FileNotFoundError(f"{manager.directory}: no checkpoint of step {step}; there are "
                            f"{sorted(steps)}")
  problem = damage(os.path.join(str(manager.directory), str(step)))
  if problem:
    raise DamagedCheckpoint(f"checkpoint {step}: its files do not match its digest "
                            f"({problem})")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_newest(manager, state, fallback=True):
  """(step, state) of the newest checkpoint that passes its digest and restores; each one
  that does not is reported in a line on stderr and, with `fallback`, the next older one is
  tried (without: the first failure stops). (0, None) without checkpoints."""
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, restore(manager, state, step)
    except DamagedCheckpoint as e:
      reason = str(e)
    except Exception as e:  # pylint: disable=broad-except  # TensorStore's, Orbax's
      reason = f"checkpoint {step}: it does not restore ({first_line(e)})"
    failures.append(reason)
    if not fallback:
      raise ValueError(f"{reason} (config.checkpoint_fallback=False: stopping)")
    print(f"Not using {reason}; trying an older one.", file=sys.stderr, flush=True)
  if failures:
    raise ValueError(f"{manager.directory}: no usable checkpoint: " + "; ".join(failures))
  return 0, None


def save(manager, step, state, *, force=False):
  """Saves asynchronously when `step` is due (or `force`); returns whether it saved."""
  with reporting_saves(step):  # Orbax first waits for the previous save, which may fail
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def identity(workdir, step):
  """What tells step `step`'s checkpoint from another saved at the same step (a rerun, a
  replaced folder): its step, Orbax's commit time and, once sealed, a digest of its files."""
  path = os.path.join(step_folder(workdir, step), "_CHECKPOINT_METADATA")
  meta = json.loads(files.read_text(path)) if files.exists(path) else {}
  digest_path = os.path.join(step_folder(workdir, step), DIGEST_FILE)
  sealed = ""
  if files.exists(digest_path):
    sealed = ", files sha256 " + hashlib.sha256(files.read_bytes(digest_path)).hexdigest()[:16]
  return (f"step {step}, committed at {meta.get('commit_timestamp_nsecs', 'unknown')} ns"
          + sealed)
