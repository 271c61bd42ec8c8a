"""Trains named variants of the default experiment for several seeds and tabulates test R@1
(mean ± std over seeds) of every pair, the fused queries and the re-ranked rows, with wall
time per run.

  python benchmarks/ablation.py --variants=cls,gpo,align_fuse --seeds=0,1,2 \
      --out=benchmarks/results/ablation_cpu2.json

Each run is `launch/train.py` in its own process (the main job's command with overrides);
its result is kept in {--runs}/{variant}/seed{S}/result.json, so an interrupted ablation
picks up where it stopped and rows can be added later. Runs go one at a time: each uses
every core.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOWERS = ("audio", "video", "text")


def pooling(kind):
  return [f"--config.model.towers.{m}.pooling={kind}" for m in TOWERS]


def only(*terms, ema=None):
  """align_fuse with only `terms` of the alignment recipe weighted as TCL weighs them, no
  InfoNCE, IMS and LMIM on every modality, and the momentum settings `ema` (default
  ALBEF_EMA)."""
  weights = dict(itc=1 / 3, ims=1 / 3, lmim=1 / 3, itm=1.0)
  return [f"--config.loss.weights.{t}={w if t in terms else 0.0}" for t, w in weights.items()
          ] + [NO_INFONCE, ALL_INTRA, TEXT_FUSION] + (ema or ALBEF_EMA)


NO_AUDIO_INTRA = "--config.loss.intra_modalities=('text', 'video')"
ALL_INTRA = "--config.loss.intra_modalities=()"
# The momentum settings :align_fuse had before issue 19 (ALBEF's, the queue cut to 4,096),
# and the ones it has since.
ALBEF_EMA = ["--config.alignment.momentum=0.995", "--config.alignment.queue_size=4096",
             "--config.alignment.distill_alpha=0.4"]
FRESH = ["--config.alignment.momentum=0.9", "--config.alignment.queue_size=1024"]
NO_EMA = ["--config.alignment.momentum=0.0", "--config.alignment.queue_size=256",
          "--config.alignment.distill_alpha=0.0"]
DISTILL, NO_DISTILL = ("--config.alignment.distill_alpha=0.4",
                       "--config.alignment.distill_alpha=0.0")
# The fusion pairs :align_fuse had before the audio:video pair joined them.
TEXT_FUSION = "--config.model.fusion.pairs=('text:audio', 'text:video')"
INFONCE = "--config.loss.weights.contrastive=1.0"
AV_WEIGHT2 = "--config.loss.pair_weights['audio-video']=2.0"
NO_INFONCE = "--config.loss.weights.contrastive=0.0"

# name -> (config variant, overrides, what it tests)
VARIANTS = {
    "cls": ("", pooling("cls"), "InfoNCE, cls pooling (the default before issue 19)"),
    "mean": ("", pooling("mean"), "InfoNCE, mean pooling"),
    "gpo": ("", [], "InfoNCE, GPO pooling (the default since issue 19)"),
    "gpo_3000_steps": ("", ["--config.total_steps=3000"],
                       "InfoNCE, GPO pooling, twice the steps (3,000)"),
    "regression_gpo": ("regression", [], "similarity regression, GPO"),
    "sigmoid_gpo": ("sigmoid", [], "SigLIP's sigmoid loss, GPO"),
    "align_fuse": ("align_fuse", [], "as shipped: the alignment terms + InfoNCE, IMS and LMIM "
                   "on text and video, momentum 0.9, queue 1,024, no distillation, fusion "
                   "pairs text:audio, text:video and audio:video"),
    "align_fuse_av_fusion": ("align_fuse", [
        "--config.model.fusion.pairs=('text:audio', 'text:video', 'audio:video')"],
        "align_fuse with a third fusion encoder, audio:video, so that matching and "
        "re-ranking act on audio<->video too (= align_fuse since)"),
    "align_fuse_av_weight2": ("align_fuse", [AV_WEIGHT2, TEXT_FUSION],
                              "align_fuse (text fusion pairs) with audio-video's InfoNCE "
                              "weighted 2: the text pairs gain matching terms, audio-video "
                              "has only InfoNCE and ITC"),
    "gpo_av_weight2": ("", [AV_WEIGHT2], "InfoNCE, GPO, audio-video weighted 2 (the control)"),
    "alignment_terms": ("align_fuse", [NO_INFONCE, ALL_INTRA, TEXT_FUSION] + ALBEF_EMA,
                      "alignment alone: ITC + IMS + LMIM + ITM on every modality (GPO)"),
    "align_fuse+infonce": ("align_fuse", [INFONCE, ALL_INTRA, TEXT_FUSION] + ALBEF_EMA,
                           "the alignment terms on every modality + InfoNCE"),
    "itc": ("align_fuse", only("itc"), "ITC alone (queues, EMA, distillation)"),
    "itc_no_distill": ("align_fuse", only("itc", ema=ALBEF_EMA[:2] + [NO_DISTILL]),
                       "ITC alone without distillation"),
    "itc_fresh": ("align_fuse", only("itc", ema=FRESH + [DISTILL]),
                  "ITC alone, momentum 0.9, queue 1,024"),
    "itc_no_ema": ("align_fuse", only("itc", ema=NO_EMA),
                   "ITC alone, no EMA lag (momentum 0), the queue one batch, no distillation: "
                   "in-batch InfoNCE but for the keys' stopped gradient and one stale batch"),
    "itc+ims": ("align_fuse", only("itc", "ims"), "ITC + IMS"),
    "itc+lmim": ("align_fuse", only("itc", "lmim"), "ITC + LMIM"),
    "itc+itm": ("align_fuse", only("itc", "itm"), "ITC + ITM"),
    "itc+lmim_4_locals": ("align_fuse", only("itc", "lmim") + ["--config.model.local_features=4"],
                          "ITC + LMIM over 4 locals per sample (a digit's span of audio)"),
    "align_fuse_no_lmim": ("align_fuse", only("itc", "ims", "itm"),
                           "alignment without LMIM: ITC + IMS + ITM"),
    "align_fuse_no_audio_intra": ("align_fuse", [NO_INFONCE, NO_AUDIO_INTRA, TEXT_FUSION]
                                  + ALBEF_EMA,
                                  "alignment with IMS and LMIM on text and video only"),
    "align_fuse+infonce_no_audio_intra": (
        "align_fuse", [INFONCE, NO_AUDIO_INTRA, TEXT_FUSION] + ALBEF_EMA,
        "the alignment terms + InfoNCE, IMS and LMIM on text and video only, ALBEF's EMA"),
    "align_fuse_fresh": ("align_fuse", FRESH + [DISTILL, TEXT_FUSION],
                         "the same, momentum 0.9, queue 1,024, distillation 0.4"),
    "align_fuse_fresh_no_distill": ("align_fuse", FRESH + [NO_DISTILL, TEXT_FUSION],
                                    "the same without distillation (align_fuse before the "
                                    "audio:video fusion pair)"),
    "align_fuse_no_ema": ("align_fuse", NO_EMA + [TEXT_FUSION], "the same, no EMA lag "
                          "(momentum 0), the queue one batch, no distillation"),
}


def run(name, seed, args):
  """Trains variant `name` with `seed` (or reads its saved result)."""
  folder = os.path.join(args.runs, name, f"seed{seed}")
  result_file = os.path.join(folder, "result.json")
  if os.path.exists(result_file):
    with open(result_file, encoding="utf-8") as f:
      result = json.load(f)
    if "neighbours" not in result:  # saved before the probe existed
      result["neighbours"] = neighbour_probe(os.path.join(folder, "workdir"))
      with open(result_file, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result
  variant, overrides, _ = VARIANTS[name]
  config = os.path.join(REPO, "configs", "audio_video_text.py") + (f":{variant}" if variant
                                                                   else "")
  cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={config}",
         f"--workdir={os.path.join(folder, 'workdir')}", f"--config.seed={seed}",
         *overrides, *([f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []),
         *([f"--config.total_steps={args.steps}"] if args.steps else [])]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{name} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(folder, "workdir", "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if any(k.endswith("/R@1") for k in r)][-1]
  result = {"variant": name, "seed": seed, "step": final["step"], "seconds": seconds,
            "R@1": {k.split("/", 1)[1][:-len("/R@1")]: v for k, v in final.items()
                    if k.endswith("/R@1")},
            "train": {k: v for k, v in records[-2].items() if k.startswith("train/")},
            "neighbours": neighbour_probe(os.path.join(folder, "workdir"))}
  with open(result_file, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return result


def neighbour_probe(workdir):
  """What each modality's embedding space groups together on the test split: for every test
  item, its nearest other item of the same modality (cosine), the fraction of those that
  share the item's voice (a nuisance for retrieval: 5 voices, chance 0.2) and the mean number
  of digit positions they share (the content: 0.4 by chance). {modality: [voice, digits]}."""
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from xmodal_jax import experiment as experiment_lib
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  experiment = experiment_lib.setup(config, workdir, require_checkpoint=True)
  split = experiment.embedder.split(experiment.state.params, config.data.eval_split)
  meta = {int(ex["id"]): (ex["voice"], ex["digits"]) for ex in
          experiment.source.builder.as_dataset(split=config.data.eval_split).as_numpy_iterator()}
  voices = np.array([meta[int(i)][0] for i in split.ids])
  digits = np.stack([meta[int(i)][1] for i in split.ids])
  probe = {}
  for modality, emb in split.emb.items():
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    nearest = scores.argmax(axis=1)
    probe[modality] = [float(np.mean(voices == voices[nearest])),
                       float(np.mean(np.sum(digits == digits[nearest], axis=1)))]
  return probe


def summarize(results):
  """{variant: {row: (mean, std, n)}} over seeds, rows being the R@1 directions and
  "minutes"."""
  table = {}
  for name, runs in results.items():
    rows = sorted({row for r in runs for row in r["R@1"]})
    table[name] = {row: [r["R@1"][row] for r in runs if row in r["R@1"]] for row in rows}
    table[name]["minutes"] = [r["seconds"] / 60 for r in runs]
    for modality in TOWERS:
      for i, what in enumerate(("same voice", "shared digits")):
        table[name][f"{modality} NN {what}"] = [r["neighbours"][modality][i] for r in runs]
  return {name: {row: (float(np.mean(v)), float(np.std(v)), len(v)) for row, v in rows.items()}
          for name, rows in table.items()}


def format_table(summary, rows, minutes=True):
  rows = rows + ["minutes"] * minutes
  lines = ["| variant | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 1)]
  for name, stats in summary.items():
    cells = []
    for row in rows:
      if row not in stats:
        cells.append("")
        continue
      mean, std, n = stats[row]
      digits = 2 if " NN " in row else 1
      cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="cls,gpo,align_fuse,alignment_terms",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=0, help="total_steps (default: the config's)")
  parser.add_argument("--data_dir", default=None, help="config.data.data_dir (default: the "
                      "config's, where the embedded dataset is built on first use)")
  parser.add_argument("--runs", default=os.path.join(REPO, "runs", "ablation"),
                      help="where each run's workdir and result.json go")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  names = [n for n in args.variants.split(",") if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"--variants: unknown {unknown}; expected names among {list(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {}
  for name in names:
    results[name] = []
    for seed in seeds:
      print(f"{name} seed {seed}: {VARIANTS[name][2]}", flush=True)
      result = run(name, seed, args)
      pairs = " ".join(f"{k} {v:.1f}" for k, v in sorted(result["R@1"].items())
                       if "+" not in k and "rerank" not in k)
      print(f"  {result['seconds'] / 60:.1f} min; R@1 {pairs}", flush=True)
      results[name].append(result)
  summary = summarize(results)
  probe = [f"{m} NN {what}" for m in TOWERS for what in ("same voice", "shared digits")]
  rows = sorted({row for stats in summary.values() for row in stats
                 if row != "minutes" and row not in probe},
                key=lambda r: ("rerank" in r, "+" in r, r))
  print(format_table(summary, rows))
  print("\nNearest test neighbour within each modality (neighbour_probe):")
  print(format_table(summary, probe, minutes=False))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"seeds": seeds, "steps": args.steps or None, "summary": summary,
                 "runs": results}, f, indent=1)


if __name__ == "__main__":
  main()
