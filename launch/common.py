"""Flags every launcher that works on a trained run shares: the config and its workdir."""

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.mark_flags_as_required(["config", "workdir"])
