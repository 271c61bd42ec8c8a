"""The training loop: set up, step, log, checkpoint, run the evaluators that are due."""

import functools

import jax

from xmodal_jax import parallel
from xmodal_jax.eval import evaluators, retrieval
from xmodal_jax.train import checkpoint, experiment as experiment_lib, metrics as metrics_lib
from xmodal_jax.train import optimizer, preemption, run_config, step as step_lib


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite steps (config.nonfinite); the checkpoints are finite."""


class NonFiniteGuard:
  """Counts the steps whose update was not applied (train_step's metrics["nonfinite"]) and
  stops training as config.nonfinite says. Each step's flag is read once the next step is
  dispatched, so the host never waits on the device for it."""

  def __init__(self, config, manager):
    self.policy, self.limit = config.nonfinite.policy, config.nonfinite.max_in_a_row
    self.manager = manager
    self.in_a_row = self.total = 0
    self.pending = None

  def after(self, step, flag):
    """Takes step `step`'s flag (a device scalar) and checks the previous step's."""
    previous, self.pending = self.pending, (step, flag)
    if previous is not None:
      self.check(*previous)

  def finish(self):
    if self.pending is not None:
      self.check(*self.pending)
      self.pending = None

  def check(self, step, flag):
    if not int(flag):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    print(f"step {step}: the loss, gradients or update were not finite; the update was not "
          f"applied ({self.in_a_row} in a row)", flush=True)
    if self.policy == "stop" or self.in_a_row >= self.limit:
      self.manager.wait_until_finished()
      newest = self.manager.latest_step()
      where = (f"the newest checkpoint, step {newest}, holds finite params" if newest
               else "no checkpoint was written yet")
      raise NonFiniteError(
          f"training stopped at step {step}: {self.in_a_row} non-finite step(s) in a row "
          f"(config.nonfinite: policy={self.policy!r}, max_in_a_row={self.limit}); {where}. "
          "Lower the learning rate (or check the data) and re-run to resume from it.")


def evaluate(experiment, params, writer=None, step=None, *, final=False):
  """Runs the config.evals entries due at `step` (all of them when `final`), prints their
  tables and writes them at `step` when a `writer` is given; returns their metrics."""
  metrics = evaluators.run(experiment.config, experiment.embedder, params,
                           step=None if final else step)
  if metrics:
    if writer is not None:
      writer.write(step, metrics)
    print(retrieval.format_tables(metrics), flush=True)
  return metrics


def train_and_evaluate(config, workdir, *, allow_config_change=False):
  """Trains `config` in `workdir`, resuming from its latest checkpoint (with the same config
  in what shapes the run, unless `allow_config_change`); returns the last evaluation's
  metrics."""
  from xmodal_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  experiment = experiment_lib.setup(config, workdir)
  config, mesh, manager = experiment.config, experiment.mesh, experiment.manager
  state, start_step = experiment.state, experiment.step
  run_config.check_and_save(workdir, config, resuming=bool(start_step),
                            allow_changes=allow_config_change)
  if start_step:
    print(f"Resuming from the checkpoint of step {start_step}.", flush=True)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{num_params / 1e6:.2f}M parameters; {jax.device_count()} devices; global batch "
        f"{config.batch_size}", flush=True)

  writer = metrics_lib.MetricWriter(workdir, start_step)
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=experiment.model, tx=experiment.tx,
                        loss_config=config.loss, mesh=mesh, seed=config.seed,
                        alignment_config=config.get("alignment")),
      donate_argnums=(0,))
  batches = pipeline.train_iterator(config, experiment.builder, start_step=start_step)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  schedule = optimizer.learning_rate_schedule(config)
  guard = NonFiniteGuard(config, manager)
  eval_metrics = None
  with preemption.Watch().installed() as watch:
    for step in range(start_step + 1, config.total_steps + 1):
      state, train_metrics = train_fn(state, parallel.shard_batch(next(batches), mesh))
      guard.after(step, train_metrics["nonfinite"])
      last = step == config.total_steps
      if step % config.log_every == 0 or last:
        guard.finish()
        train_metrics = jax.device_get(train_metrics)
        writer.write(step, {f"train/{k}": v for k, v in train_metrics.items()}
                     | {"train/learning_rate": schedule(step),
                        "train/nonfinite_steps": guard.total})
        print(progress.line(step, float(train_metrics["loss"])), flush=True)
      preempted = watch.reached(step)
      checkpoint.save(manager, step, state, force=last or preempted)
      if preempted:
        guard.finish()
        manager.wait_until_finished()
        writer.close()
        manager.close()
        raise preemption.Preempted(step, watch.signal_number)
      eval_metrics = evaluate(experiment, state.params, writer, step, final=last) or eval_metrics
  guard.finish()
  manager.wait_until_finished()
  if eval_metrics is None:  # Already trained: report the final checkpoint.
    eval_metrics = evaluate(experiment, state.params, final=True)
  writer.close()
  manager.close()
  return eval_metrics
