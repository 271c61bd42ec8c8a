"""Runs the config's evaluators (config.evals) on a trained checkpoint.

  python launch/evaluate.py --config=configs/audio_video_text.py --workdir=runs/avt
  python launch/evaluate.py ... --split=train --step=1000 --out=eval.json

Restores the newest checkpoint in --workdir (or --step), runs every entry of config.evals
(retrieval between every modality pair and fused query, re-ranking, ...) on --split
(default: each entry's own split), prints the tables and writes the metrics as JSON
(default: {workdir}/eval_{split}_step{step}.json).

As a benchmark suite (one checkpoint, every evaluation of config.evals: retrieval and
zero-shot over several datasets), --results_dir=DIR also writes one JSON per evaluation,
DIR/{dataset}_{split}_{evaluator}.json:
  {"dataset": ..., "split": ..., "task": "retrieval" | "zeroshot" | "rerank",
   "evaluator": its config.evals name, "checkpoint": {"workdir": ..., "step": ...},
   "metrics": {metric name: value}}
and DIR/summary.json, the list of {dataset, split, task, evaluator, headline metric and
value}, printed as one table (headline: mean R@1 over the single-modality pairs for
retrieval and re-ranking, top-1 accuracy for zero-shot).
"""

import re

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from common import ALLOW_CONFIG_CHANGE, CONFIG, WORKDIR, join_runtime  # launch/common.py
import jax
from xmodal_jax import files
from xmodal_jax.eval import evaluators, retrieval
from xmodal_jax import experiment as experiment_lib

_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: each evaluator's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Metrics JSON path.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Also write one JSON per evaluation "
                                   "and a summary here (see the module docstring).")


def headline(result):
  """(name, value) of the number that sums up one evaluation."""
  if result.task == "zeroshot":
    values = [v for k, v in result.metrics.items() if k.endswith("/top1")]
    return "top1", sum(values) / max(len(values), 1)
  values = [v for k, v in result.metrics.items()
            if k.endswith("/R@1") and "+" not in k.split("/")[-2]]
  return "mean R@1", sum(values) / max(len(values), 1)


def write_results(results, results_dir, workdir, step):
  """The per-evaluation JSON files and the summary (process 0 only)."""
  summary = []
  for result in results:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{result.dataset}_{result.split}_{result.name}")
    record = {"dataset": result.dataset, "split": result.split, "task": result.task,
              "evaluator": result.name, "checkpoint": {"workdir": workdir, "step": step},
              "metrics": result.metrics}
    files.write_atomically(os.path.join(results_dir, f"{name}.json"),
                           json.dumps(record, indent=1))
    metric, value = headline(result)
    summary.append({"dataset": result.dataset, "split": result.split, "task": result.task,
                    "evaluator": result.name, "metric": metric, "value": value,
                    "file": f"{name}.json"})
  files.write_atomically(os.path.join(results_dir, "summary.json"),
                         json.dumps(summary, indent=1))
  print(f"\n{'dataset':20} {'split':12} {'task':10} {'evaluator':16} {'metric':10} "
        f"{'value':>8}")
  for row in summary:
    print(f"{row['dataset']:20} {row['split']:12} {row['task']:10} {row['evaluator']:16} "
          f"{row['metric']:10} {row['value']:8.2f}")
  print(f"wrote {len(summary)} results and summary.json in {results_dir}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  out_folder = os.path.dirname(_OUT.value or "") or "."
  if _OUT.value and (not files.exists(out_folder) or files.isdir(_OUT.value)):
    raise app.UsageError(f"--out={_OUT.value}: expected a file path in an existing folder "
                         "(checked before evaluating, so the results have a place)")
  join_runtime()
  experiment = experiment_lib.setup(CONFIG.value, WORKDIR.value, step=_STEP.value,
                                    require_checkpoint=True,
                                    allow_config_change=ALLOW_CONFIG_CHANGE.value)
  split = _SPLIT.value or experiment.config.data.eval_split
  results = evaluators.run_entries(experiment.config, experiment.embedder,
                                   experiment.state.params, split=_SPLIT.value)
  metrics = {k: v for result in results for k, v in result.metrics.items()}
  print(f"step {experiment.step}")
  print(retrieval.format_tables(metrics), flush=True)
  out = _OUT.value or os.path.join(WORKDIR.value, f"eval_{split}_step{experiment.step}.json")
  if jax.process_index() == 0:
    files.write_atomically(out, json.dumps({"step": experiment.step, "split": split, **metrics},
                                           indent=1))
    print(f"wrote {out}")
    if _RESULTS_DIR.value:
      files.makedirs(_RESULTS_DIR.value)
      write_results(results, _RESULTS_DIR.value, WORKDIR.value, experiment.step)


if __name__ == "__main__":
  app.run(main)
