"""Every config option with its default and meaning, in one place, and `resolve`: the one door
a config passes before anything is built. It rejects unknown keys, fills every default, and runs
each part's checks against an explicit device count (the target topology's when compiling ahead
of time); modules then read options directly, restating no default. `defaults()` is what a
config file starts from; docs/config.md is generated from here (config_doc.py, kept current).
"""

import copy
import dataclasses
from typing import Any

import ml_collections

from xmodal_jax import parallel, tokenizers
from xmodal_jax.data import mixture
from xmodal_jax.eval import evaluators
from xmodal_jax.losses import objectives
from xmodal_jax.parallel import sharding
from xmodal_jax.train import embedding_cache, metrics, nonfinite, optimizer

REQUIRED = "(required)"


@dataclasses.dataclass(frozen=True)
class Option:
  default: Any
  doc: str


@dataclasses.dataclass(frozen=True)
class Entries:
  """A mapping of user-named entries (modalities, evaluators, towers), each under `schema`
  (a function of the entry and where it is, since a modality's options depend on its kind);
  `open` entries also take the keyword arguments of the module they build."""
  schema: Any
  doc: str
  open: bool = False


@dataclasses.dataclass(frozen=True)
class Open:
  """A section that also takes the keyword arguments of the module it builds."""
  schema: dict
  doc: str


_o = Option


SOURCE = {
    "name": _o(REQUIRED, "the TFDS dataset of this source"),
    "data_dir": _o(None, "where it is built (None: TFDS's default)"),
    "split": _o("train", "the split this source contributes"),
    "weight": _o(1.0, "relative share of training rows (0: left out)"),
    "features": _o({}, "{modality: feature} this source provides (the other modalities are "
                   "masked for its rows); empty: every modality, under its own feature"),
}

DATA = {
    "name": _o(REQUIRED, "the TFDS dataset (a builder name, or a manifest build's name)"),
    "data_dir": _o(None, "where it is built (None: ~/tensorflow_datasets); gs://... too"),
    "train_split": _o("train", "the split training reads"),
    "eval_split": _o("test", "the split evaluators read unless they name their own"),
    "shuffle_buffer": _o(10_000, "tf.data shuffle buffer (only when captions are expanded; "
                         "otherwise training reads a seeded permutation by index)"),
    "cache": _o(False, "keep the training split's serialized records in memory"),
    "threads": _o(0, "tf.data private thread pool size; 0: tf.data's default"),
    "ram_budget_gb": _o(0.0, "tf.data autotune RAM budget; 0: tf.data's default"),
    "sources": Entries(lambda entry, where: SOURCE, "{name: dataset and weight}: a training "
                       "mixture (docs/guide.md, \"Mixtures\"); empty: config.data.name's "
                       "train_split alone"),
}


MODALITY = {
    "kind": _o(REQUIRED, "text | audio | image | video | features: picks the preprocessing"),
    "feature": _o(REQUIRED, "the dataset feature the modality reads"),
    "augment": _o(True, "random augmentation in training (False: as at evaluation)"),
    "second_view": _o(False, "draw a second augmented view per example (IMS positives)"),
}
MODALITY_KINDS = {
    "text": {
        "tokenizer": _o("", "a shipped tokenizer name (digit_words) or a Hugging Face folder; "
                        "empty: the pretrained tower's folder"),
        "max_length": _o(REQUIRED, "tokens per caption (padded or truncated)"),
        "captions": _o("sample", "several captions per item: sample one per step, or "
                       "\"expand\" (one example per caption)"),
    },
    "audio": {
        "num_samples": _o(REQUIRED, "samples per clip (a random window in training)"),
        "random_crop": _o(True, "a random window in training (False: the start)"),
    },
    "image": {
        "image_size": _o(REQUIRED, "square crop side in pixels"),
        "crop_scale": _o((0.5, 1.0), "random-resized crop's area fraction in training"),
        "flip": _o(True, "random horizontal flips in training"),
        "mean": _o((0.48145466, 0.4578275, 0.40821073), "per-channel mean (CLIP's)"),
        "std": _o((0.26862954, 0.26130258, 0.27577711), "per-channel std (CLIP's)"),
    },
    "video": {
        "num_frames": _o(REQUIRED, "frames per clip"),
        "frame_size": _o(REQUIRED, "square frame side in pixels"),
        "channels": _o(3, "channels per frame"),
        "sampling": _o("uniform", "uniform (segment centres) or random (training only)"),
        "max_shift": _o(0, "random shift of each frame in training, in pixels"),
        "mean": _o(0.5, "normalization mean (all channels)"),
        "std": _o(0.5, "normalization std (all channels)"),
    },
    "features": {
        "shape": _o(None, "the features' shape, when known without reading the dataset"),
    },
}

TRAIN_POLICY = {
    "trainable": _o("all", "\"all\", \"none\" (the tower frozen), or a tuple of regexes on "
                    "the tower's parameter paths that train"),
    "head": _o("auto", "auto: the head trains unless its tower is frozen and the head was "
               "loaded or cached; train; freeze (whatever the tower does: SigLIP's heads)"),
    "lr_multiplier": _o(1.0, "scales the learning rate of the tower's trainable parameters "
                        "and its head"),
    "cache_embeddings": _o(False, "a frozen, non-augmenting tower's training embeddings are "
                           "computed once (ImageBind's recipe)"),
}

EVALUATOR = {
    "type": _o(REQUIRED, "a name in xmodal_jax/eval/evaluators.py: EVALUATORS"),
    "every": _o(REQUIRED, "period in steps (also run at the end of training)"),
    "split": _o("", "the split to evaluate; empty: config.data.eval_split"),
    "prefix": _o("", "metric name prefix; empty: the split (or the other dataset's name)"),
}

COMMON = {
    "seed": _o(0, "seeds initialization, dropout and the input order"),
    "batch_size": _o(REQUIRED, "global training batch (all devices and hosts)"),
    "eval_batch_size": _o(REQUIRED, "global evaluation batch"),
    "total_steps": _o(REQUIRED, "training steps"),
    "grad_accum_steps": _o(1, "k micro-batches per step (gradient caching: same gradients)"),
    "profile": _o((0, 0), "(first, last) step traced by jax.profiler into {workdir}/profile "
                  "(host and devices; Python functions are not traced)"),
    "log_every": _o(50, "steps between logged train metrics"),
    "checkpoint_every": _o(250, "steps between checkpoints"),
    "keep_checkpoints": _o(2, "checkpoints kept (the newest is what a re-run resumes)"),
    "checkpoint_fallback": _o(True, "a newest checkpoint that fails its digest or does not "
                              "restore is reported and the next older one restored (False: "
                              "stop)"),
    "mesh": {
        "data": _o(-1, "data-parallel axis size (-1: the devices left)"),
        "fsdp": _o(1, "FSDP axis size: the state is sharded this many ways"),
    },
    "sharding": _o(list(sharding.DEFAULT_RULES), "(regex, rule) pairs on state paths: "
                   "\"fsdp\", \"replicate\" or a PartitionSpec tuple; first match wins"),
    "data": DATA,
    "modalities": Entries(lambda entry, where: MODALITY | MODALITY_KINDS.get(entry.get("kind"),
                                                                             {}),
                          "{name: options}: the inputs, each read from a dataset feature"),
    "model": {
        "embed_dim": _o(REQUIRED, "dimension D of the shared embedding space"),
        "logit_scale_init": _o(None, "initial log logit scale; None: log(1 / 0.07), as CLIP"),
        "logit_bias_init": _o(None, "initial sigmoid-loss bias (SigLIP: -10); None: no bias"),
        "per_pair_temperature": _o(False, "one logit scale per modality pair"),
        "local_features": _o(0, "local features per sample for LMIM; 0: none"),
        "towers": Entries(lambda entry, where: {"name": _o(REQUIRED, "a tower name in "
                                                           "xmodal_jax/models/towers.py")},
                          "{modality: tower options}: the tower's own fields "
                          "(xmodal_jax/models/), or name=\"pretrained\" with a folder path",
                          open=True),
        "fusion": Open({
            "pairs": _o((), "fusion encoders \"a:b\" (a's tokens attend to b's) for "
                        "matching (itm) and re-ranking"),
        }, "and FusionEncoder's fields (xmodal_jax/models/fusion.py): width, num_layers, "
           "num_heads, mlp_dim, dropout, dtype"),
    },
    "train_policy": Entries(lambda entry, where: TRAIN_POLICY,
                            "{modality: options}: what of each tower trains and how fast"),
    "init": {
        "checkpoint": _o("", "another run's workdir or checkpoint folder to start from"),
        "rules": _o([], "(regex on our param path, the checkpoint's path); none: the same "
                    "paths (train/warm_start.py)"),
        "skip": _o([], "regexes on our param paths left to their initializer"),
    },
    "loss": {
        "weights": _o({"contrastive": 1.0}, "{objective name: weight} "
                      "(xmodal_jax/losses/objectives.py: OBJECTIVES)"),
        "kind": _o("softmax", "pairwise contrastive form: softmax (InfoNCE) or sigmoid "
                   "(SigLIP; set model.logit_bias_init)"),
        "pair_weights": _o({}, "{\"a-b\": weight}; unnamed pairs weigh 1"),
        "impl": _o("dense", "pairwise loss over devices: dense | blockwise | ring"),
        "block_size": _o(0, "columns per tile for blockwise/ring; 0: a whole shard"),
        "intra_modalities": _o((), "modalities IMS and LMIM run on; empty: all"),
        "regression": {
            "target": _o("intra", "similarity regression target off the diagonal: intra "
                         "or zero"),
            "margin": _o(0.2, "delta: off-diagonal targets are at most 1 - delta"),
            "loss": _o("mse", "mse or smooth_l1"),
            "balance": _o(False, "weigh the diagonal against the off-diagonal (B-1 to 1)"),
        },
    },
    "alignment": {
        "momentum": _o(0.995, "EMA rate of the momentum model (itc, ims)"),
        "queue_size": _o(65_536, "queued momentum embeddings per modality"),
        "distill_alpha": _o(0.0, "momentum distillation's alpha; 0: off"),
        "distill_ramp_steps": _o(0, "steps over which alpha ramps up linearly; 0: none"),
    },
    "optimizer": {
        "name": _o("adamw", "adamw or adafactor (factored second moment)"),
        "learning_rate": _o(REQUIRED, "peak learning rate"),
        "schedule": _o("warmup_cosine", "warmup_cosine, warmup_rsqrt or warmup_stable_decay"),
        "warmup_steps": _o(0, "linear warmup steps"),
        "cooldown_steps": _o(0, "rsqrt, stable_decay: linear decay over the last N steps"),
        "rsqrt_timescale": _o(10_000, "rsqrt: peak / sqrt(1 + (step - warmup) / this)"),
        "end_learning_rate_ratio": _o(0.0, "the schedule ends at this fraction of the peak"),
        "weight_decay": _o(0.0, "decoupled weight decay (not on 1-D parameters)"),
        "b1": _o(0.9, "Adam beta1; Adafactor's momentum (0: none)"), "b2": _o(0.999, "Adam beta2"),
        "momentum_dtype": _o("bfloat16", "Adafactor's momentum in memory: bfloat16 or float32"),
        "grad_clip_norm": _o(1.0, "global gradient norm clip"),
    },
    "nonfinite": {
        "policy": _o("skip", "skip: go on, stop after max_in_a_row; stop: stop at the first"),
        "max_in_a_row": _o(10, "non-finite steps in a row that stop training"),
    },
    "evals": Entries(lambda entry, where: EVALUATOR | evaluator_options(entry.get("type"),
                                                                        where),
                     "{name: options}: evaluators by type, each with its period"),
}


def evaluator_options(kind, where="evaluator"):
  """An evaluator type's own options, as its entry in EVALUATORS declares them (`...`:
  required); an unknown type is an error naming `where`.type."""
  if kind not in evaluators.EVALUATORS:
    raise ValueError(f"{where}.type={kind!r}: expected one of {sorted(evaluators.EVALUATORS)}")
  return {key: Option(REQUIRED if default is ... else default, doc)
          for key, (default, doc) in evaluators.EVALUATORS[kind].options.items()}


MOVED = dict.fromkeys(("trainable", "lr_multiplier", "cache_embeddings"), "train_policy")


def _is_mapping(value):
  return isinstance(value, (dict, ml_collections.ConfigDict))


def _fill(node, schema, where, open_=False, required=True):
  """Checks `node`'s keys against `schema` and fills its defaults in place; a missing
  required option is an error unless `required` is False (then it stays unset)."""
  for key in list(node.keys()):
    if key not in schema and (not open_ or key in MOVED):
      hint = (f" (moved: config.{MOVED[key]}.<modality>.{key})" if key in MOVED else "")
      raise ValueError(f"{where}.{key}: no such option{hint}; expected one of "
                       f"{sorted(schema)} (docs/config.md)")
  for key, spec in schema.items():
    if isinstance(spec, (dict, Open)):
      if key not in node or node[key] is None:
        node[key] = {}
      inner = spec.schema if isinstance(spec, Open) else spec
      _fill(node[key], inner, f"{where}.{key}", isinstance(spec, Open), required)
    elif isinstance(spec, Entries):
      entries = node.get(key)
      if entries is None:
        node[key] = entries = {}
      for name in list(entries.keys()):
        if not _is_mapping(entries[name]):
          raise ValueError(f"{where}.{key}.{name}: expected a mapping of options, got "
                           f"{entries[name]!r}")
        entry_where = f"{where}.{key}.{name}"
        _fill(entries[name], spec.schema(entries[name], entry_where), entry_where, spec.open)
    elif key not in node:
      if spec.default != REQUIRED:
        node[key] = copy.deepcopy(spec.default)
      elif required:
        raise ValueError(f"{where}.{key} is unset: {spec.doc}")


def defaults():
  """A config holding every top-level default (required options left to the config file)."""
  config = {}
  _fill(config, COMMON, "config", required=False)
  return ml_collections.ConfigDict(config)


def fill_defaults(config):
  """A plain, filled copy of `config` (unknown keys are errors); no cross-field checks."""
  config = config.copy_and_resolve_references().to_dict()
  policy = config.setdefault("train_policy", {})
  for name in config.get("modalities") or {}:  # every modality has a training policy
    policy.setdefault(name, {})
  _fill(config, COMMON, "config")
  return ml_collections.ConfigDict(config)


def modality(options):
  """One modality's options with its kind's defaults filled (for code that prepares a
  single modality, and tests)."""
  options = (options.to_dict() if isinstance(options, ml_collections.ConfigDict)
             else dict(options))
  _fill(options, COMMON["modalities"].schema(options, "modality"), "modality")
  return ml_collections.ConfigDict(options)


def evaluator(kind, **options):
  """A `config.evals` entry of type `kind` with all its defaults written out, so that each
  option can be overridden on the command line (`--config.evals.retrieval.fused=none`)."""
  entry = dict(options, type=kind)
  _fill(entry, EVALUATOR | evaluator_options(kind), "evaluator")
  return ml_collections.ConfigDict(entry)


def check(config, device_count):
  """The cross-field checks of a filled config, each part checking its own slice."""
  modalities = list(config.modalities)
  if len(modalities) < 2:
    raise ValueError(f"config.modalities: need at least 2 modalities, got {modalities}")
  for section, entries in (("model.towers", config.model.towers),
                           ("train_policy", config.train_policy)):
    if set(entries) != set(modalities):
      raise ValueError(f"config.{section} has {sorted(entries)} but config.modalities has "
                       f"{sorted(modalities)}: every modality needs exactly one entry")
  for key in ("batch_size", "eval_batch_size", "total_steps", "log_every",
              "checkpoint_every", "keep_checkpoints"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"config.{key}={config[key]!r}: expected a positive integer")
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % device_count:
      raise ValueError(f"config.{key}={config[key]} does not divide by the "
                       f"{device_count} devices")
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1 or config.batch_size % (device_count * accum):
    raise ValueError(f"config.grad_accum_steps={accum!r}: expected a positive integer k with "
                     f"config.batch_size={config.batch_size} a multiple of k x the "
                     f"{device_count} devices (each micro-batch takes rows of every device)")
  mixture.validate(config)
  objectives.validate(config, device_count)
  evaluators.validate(config)
  optimizer.validate(config)
  embedding_cache.validate(config)
  nonfinite.validate(config.nonfinite)
  metrics.validate_profile(config.profile)
  parallel.mesh_shape(config.mesh, device_count)
  sharding.check_rules(config.sharding)


def resolve(config, device_count, *, read_data=True):
  """The config as every module reads it: filled, checked for `device_count` devices,
  tokenizers resolved (without `read_data`, a tower that states its vocab_size needs none),
  and locked."""
  config = fill_defaults(config)
  check(config, device_count)
  tokenizers.resolve(config, required=read_data)
  config.lock()
  return config
