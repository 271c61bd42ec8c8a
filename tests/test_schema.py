"""The config schema: every shipped config resolves under it, every default is written there
once, the reference in docs/ is current, and checks use the target's device count."""

import ast
import importlib
import os
import re

import pytest

from conftest import REPO
from xmodal_jax import config_doc, schema

SHIPPED = {"audio_video_text": ("", "tiny", "regression", "sigmoid", "align_fuse", "pod"),
           "image_text": ("", "clip", "flickr30k", "tiny", "align_fuse", "fp8", "L", "g", "bigG",
                          "e"),
           "flickr8k": ("", "regression", "tiny"), "cub": ("", "regression", "tiny")}
POD = {"pod", "L", "g", "bigG", "e"}
# Mappings the code reads that are not the config: a built dataset's sidecar, an export's
# meta.json, a Hugging Face feature extractor's JSON, a free-form {name, data_dir, split}.
NOT_CONFIG = {"built", "meta", "features", "data_config"}


def option_names():
  """Every option name the schema declares, at any depth."""
  names = set()

  def walk(options):
    for key, spec in options.items():
      names.add(key)
      if isinstance(spec, dict):
        walk(spec)
      elif isinstance(spec, schema.Open):
        walk(spec.schema)
  walk(schema.COMMON)
  for options in [schema.MODALITY, schema.TRAIN_POLICY, schema.EVALUATOR,
                  *schema.MODALITY_KINDS.values()]:
    walk(options)
  for kind in schema.evaluators.EVALUATORS:
    walk(schema.evaluator_options(kind))
  return names


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_resolves_with_only_known_options(name):
  module = importlib.import_module(f"configs.{name}")
  for variant in SHIPPED[name]:
    config = schema.fill_defaults(module.get_config(variant))  # unknown keys raise here
    schema.check(config, 256 if variant in POD else 8)
    for modality in config.modalities.values():  # every kind's options are filled
      assert set(schema.MODALITY_KINDS[modality.kind]) <= set(modality)


def test_the_e_variant_is_the_vit_e_override_of_bigg_that_was_compiled():
  """:e is :bigG with the command-line overrides whose v5e-256 fit benchmarks/README.md
  reports (a ViT-e/14-class image tower, batch 65,536 in 4 micro-batches, drop 0.5,
  Adafactor): the variant names that row and nothing else."""
  image_text = importlib.import_module("configs.image_text")
  measured = image_text.get_config("bigG")
  measured.update_from_flattened_dict({
      "model.towers.image.width": 1792, "model.towers.image.num_layers": 56,
      "model.towers.image.mlp_dim": 15360, "batch_size": 65_536, "eval_batch_size": 65_536,
      "grad_accum_steps": 4, "model.towers.image.token_drop_rate": 0.5,
      "optimizer.name": "adafactor"})
  assert image_text.get_config("e").to_dict() == measured.to_dict()


def test_no_module_restates_a_default():
  """The package reads options directly: no `.get("<option>", <default>)` (nor
  `.get("<option>")` whose None stands for a default) outside the schema."""
  names = option_names() - {"name", "data", "split"}  # also keys of non-config dicts
  found = []
  for root, _, files in os.walk(os.path.join(REPO, "xmodal_jax")):
    for file in files:
      path = os.path.join(root, file)
      if not file.endswith(".py") or file == "schema.py":
        continue
      for node in ast.walk(ast.parse(open(path).read())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get" and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value in names
            and ast.unparse(node.func.value) not in NOT_CONFIG):
          found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: "
                       f".get({node.args[0].value!r})")
  assert not found, "\n".join(found)


def test_the_config_reference_is_current():
  with open(os.path.join(REPO, "docs", "config.md")) as f:
    assert f.read() == config_doc.reference(), (
        "docs/config.md is stale: python -m xmodal_jax.config_doc > docs/config.md")


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("batch_size", -8),
                                        ("eval_batch_size", 0), ("log_every", -1)])
def test_counts_that_are_not_positive_integers_name_the_field(key, value):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config[key] = value
  with pytest.raises(ValueError, match=re.escape(
      f"config.{key}={value!r}: expected a positive integer")):
    schema.resolve(config, 8)


def test_unknown_and_moved_keys_name_the_field():
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.eval_every = 100  # a renamed key in an old config file
  with pytest.raises(ValueError, match=r"config.eval_every: no such option"):
    schema.resolve(config, 8)
  config = audio_video_text.get_config("tiny")
  config.model.towers.text.trainable = "none"
  with pytest.raises(ValueError, match=re.escape(
      "config.model.towers.text.trainable: no such option (moved: "
      "config.train_policy.<modality>.trainable)")):
    schema.resolve(config, 8)
  config = audio_video_text.get_config("tiny")
  del config.model["embed_dim"]
  with pytest.raises(ValueError, match=r"config.model.embed_dim is unset"):
    schema.resolve(config, 8)


def test_the_momentum_queue_is_checked_against_the_target_devices():
  """Checks run against the devices a step is built for, not this host's: a batch of 12
  and a queue of 36 rows fit 4 chips (3 queue rows per chip per step) and not this host's
  8 devices; the assembly for 4 of them (ahead of time, nothing read) takes it."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment  # pylint: disable=g-import-not-at-top
  from xmodal_jax.losses import objectives  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,align_fuse")
  config.update(batch_size=12, eval_batch_size=12)
  config.alignment.queue_size = 36
  assert jax.device_count() == 8
  resolved = schema.resolve(config, 4)
  with pytest.raises(ValueError, match=r"queue_size=36: expected a positive multiple of "
                     r"config.batch_size=12 and of the 8 devices"):
    objectives.check_queue(resolved, 8)
  with pytest.raises(ValueError, match=r"does not divide by the 8 devices"):
    schema.resolve(config, 8)
  assembly = experiment.assemble(config, jax.devices()[:4], read_data=False)
  assert assembly.mesh.size == 4
  assert assembly.abstract_state.queues["text"]["emb"].shape[0] == 36


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_patch_tower_of_a_shipped_config_takes_a_token_drop_flag(name):
  """A locked config (as the launchers' --config flag holds it) takes
  --config.model.towers.<m>.token_drop_rate=0.5 for every tower that drops tokens, also
  a frames tower's image tower."""
  from xmodal_jax.models import towers  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"configs.{name}")
  for variant in SHIPPED[name]:
    config = module.get_config(variant)
    config.lock()
    for tower in config.model.towers.values():
      tower = tower.image if tower.name == "frames" else tower
      if getattr(towers.TOWERS.get(tower.name), "DROPS_TOKENS", False):
        tower.token_drop_rate = 0.5  # an unknown key of a locked config raises
