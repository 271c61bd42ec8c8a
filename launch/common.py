"""Flags every launcher shares: the config, the run's workdir, and how the processes of a
multi-host job find each other (docs/architecture.md, "Several hosts")."""

from absl import app, flags
from ml_collections import config_flags

from xmodal_jax.parallel import distributed

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.mark_flags_as_required(["config", "workdir"])
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Go on although the config differs from the run's "
    "({workdir}/config.json): train.py in what shapes the run (batch size, model, data, "
    "schedule), the launchers that read a run in its model or input preprocessing.")

DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES, "Join JAX's distributed runtime: 'auto' when "
    "SLURM, Open MPI or a multi-host TPU slice started several processes or the three flags "
    "below are given, 'on' always (JAX detects the cluster: also Kubernetes), 'off' never.")
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for clusters JAX does not detect.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")


def join_runtime():
  """Joins JAX's distributed runtime as the flags and the environment say; bad flags are a
  usage error."""
  try:
    distributed.initialize(DISTRIBUTED.value, COORDINATOR_ADDRESS.value, NUM_PROCESSES.value,
                           PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
