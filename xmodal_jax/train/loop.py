"""The training loop: set up, step, log, checkpoint, run the evaluators that are due."""

import jax

from xmodal_jax import parallel
from xmodal_jax.eval import evaluators, retrieval
from xmodal_jax.train import checkpoint, metrics as metrics_lib
from xmodal_jax.train import nonfinite, optimizer, preemption, run_config
from xmodal_jax.train import step as step_lib


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


def step_flops(train_fn, state, batch):
  """The train step's FLOPs as XLA counts them before partitioning (all devices; a loop's
  body, such as gradient caching's, once), or None when the backend gives none."""
  cost = train_fn.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


def announce(start_step, state, batch_size, rules):
  """The run's first lines: where it resumes, its size (and what of it is frozen), devices."""
  if start_step:
    print(f"Resuming from the checkpoint of step {start_step}.", flush=True)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  frozen = sum(x.size for x, f in zip(jax.tree.leaves(state.params), jax.tree.leaves(
      optimizer.frozen(rules, state.params))) if f) if optimizer.has_frozen(rules) else 0
  devices = jax.device_count()
  print(f"{num_params / 1e6:.2f}M parameters" + (
      f" ({(num_params - frozen) / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen)"
      if frozen else "") + f"; {devices} device{'s' * (devices > 1)}; global batch "
      f"{batch_size}", flush=True)


def timed_step(train_fn, state, batch, step, first, throughput, profiler):
  """One train step, traced when config.profile names it. The first of a session also counts
  the step's FLOPs (for MFU, on chips of known peak) and starts the throughput clock once it
  has run, so the compile is not counted."""
  profiler.before(step)
  if first and throughput.peak:
    throughput.flops = step_flops(train_fn, state, batch)
  state, train_metrics = train_fn(state, batch)
  profiler.after(step)
  if first:
    jax.block_until_ready(train_metrics)
    throughput.start()
  else:
    throughput.add_step()
  return state, train_metrics


def train_and_evaluate(experiment, workdir, *, allow_config_change=False):
  """Trains an experiment set up in `workdir` (xmodal_jax/experiment.py), from its state's
  step on (with the same config in what shapes the run, unless `allow_config_change`);
  returns the last evaluation's metrics."""
  config, mesh, manager = experiment.config, experiment.mesh, experiment.manager
  state, start_step = experiment.state, experiment.step
  run_config.check_and_save(workdir, config, resuming=bool(start_step),
                            allow_changes=allow_config_change)
  announce(start_step, state, config.batch_size, experiment.rules)

  writer = metrics_lib.MetricWriter(workdir, start_step)
  train_fn = step_lib.jit_train_step(config, experiment.model, experiment.tx, mesh,
                                     experiment.shardings, experiment.rules)
  batches = experiment.train_batches(start_step)
  progress = metrics_lib.Progress(config.total_steps, start_step)
  schedule = optimizer.learning_rate_schedule(config.optimizer, config.total_steps)
  guard = nonfinite.Guard(config.nonfinite, manager)
  tally = metrics_lib.SourceTally(experiment.source.mixture_names)
  throughput = metrics_lib.Throughput(
      config.batch_size, metrics_lib.peak_flops(jax.devices()[0].device_kind),
      jax.device_count())
  profiler = metrics_lib.Profiler(config.profile, workdir)
  eval_metrics = None
  with preemption.Watch().installed() as watch:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = parallel.shard_batch(next(batches), mesh)
      with jax.set_mesh(mesh):  # kernels such as Pallas attention run per device
        state, train_metrics = timed_step(train_fn, state, batch, step, step == start_step + 1,
                                          throughput, profiler)
      guard.after(step, train_metrics["nonfinite"])
      tally.add(train_metrics)
      last = step == config.total_steps
      if step % config.log_every == 0 or last:
        guard.finish()
        train_metrics = jax.device_get(train_metrics)
        named = {k: v for k, v in train_metrics.items() if k not in tally.KEYS}
        named |= tally.pop(train_metrics)
        named |= throughput.pop()
        writer.write(step, {f"train/{k}": v for k, v in named.items()}
                     | {"train/learning_rate": schedule(step),
                        "train/nonfinite_steps": guard.total})
        print(progress.line(step, float(train_metrics["loss"])), flush=True)
      preempted = watch.reached(step)
      if checkpoint.save(manager, step, state, force=last or preempted):
        checkpoint.seal_finished(manager, workdir, step)
      else:
        checkpoint.check_saves(manager, step)
      if preempted:
        guard.finish()
        checkpoint.wait_for_saves(manager, step)
        checkpoint.seal_finished(manager, workdir, step)
        manager.close()
        raise preemption.Preempted(step, watch.signal_number)
      eval_metrics = evaluate(experiment, state.params, writer, step, final=last) or eval_metrics
  guard.finish()
  checkpoint.wait_for_saves(manager, config.total_steps)
  checkpoint.seal_finished(manager, workdir, config.total_steps)
  if eval_metrics is None:  # Already trained: report the final checkpoint.
    eval_metrics = evaluate(experiment, state.params, final=True)
  manager.close()
  return eval_metrics
