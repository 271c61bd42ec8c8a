"""The config a run trains with, saved beside its checkpoints ({workdir}/config.json): a
resume whose config changes what shapes the run stops and lists the changes."""

import json
import os

import jax

from xmodal_jax import files

# Fields a resumed run must keep: each changes the model, the data it sees, or the
# optimization it continues. Where data lives, periods and evaluators may change freely.
SHAPING = ("seed", "batch_size", "total_steps", "data.name", "data.train_split", "modalities",
           "model", "loss", "optimizer", "alignment")
FILE = "config.json"
# What a run's model and its inputs are: launchers that read a run (evaluate, export, search,
# convert) must build the same model and prepare inputs the same way; the data they read and
# everything about optimization may differ.
READING = ("model", "modalities")


def as_dict(config):
  return json.loads(config.to_json_best_effort(sort_keys=True))


def flatten(tree, prefix=""):
  """{"a.b.c": leaf} of nested dicts."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
  return out


def changes(saved, config, fields=SHAPING):
  """["field: saved -> now"] for the `fields` that differ between the saved dict and
  `config`."""
  before, now = flatten(saved), flatten(as_dict(config))
  shaping = lambda key: any(key == f or key.startswith(f + ".") for f in fields)
  keys = sorted(k for k in set(before) | set(now) if shaping(k) and before.get(k) != now.get(k))
  return [f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys]


def check_and_save(workdir, config, *, resuming, allow_changes=False):
  """On resume, stops when the config differs from the saved one in SHAPING fields (unless
  `allow_changes`); then saves `config` as the run's (process 0, atomically)."""
  path = os.path.join(workdir, FILE)
  if resuming and files.exists(path):
    different = changes(json.loads(files.read_text(path)), config)
    if different and not allow_changes:
      raise ValueError(f"{path}: this run was trained with another config; resuming would "
                       "change:\n  " + "\n  ".join(different) + "\nuse the run's config, a new "
                       "--workdir, or --allow_config_change to continue with these changes")
  if jax.process_index() == 0:
    files.makedirs(workdir)
    files.write_atomically(path, config.to_json_best_effort(indent=1, sort_keys=True))


def check_reading(workdir, config, *, allow_changes=False):
  """For a launcher that reads a trained run: stops when `config` builds another model or
  prepares inputs otherwise than the run's saved config (unless `allow_changes`)."""
  path = os.path.join(workdir, FILE)
  if not files.exists(path):
    return
  different = changes(json.loads(files.read_text(path)), config, READING)
  if different and not allow_changes:
    raise ValueError(f"{path}: the run was trained with another model or input "
                     "preprocessing than this config describes:\n  " + "\n  ".join(different)
                     + "\nuse the run's config, or --allow_config_change to read it this way")
