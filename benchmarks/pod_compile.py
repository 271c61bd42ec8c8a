"""The train step compiled ahead of time for a TPU pod slice on this host: per-chip memory
against the chip's HBM, XLA's flops and compile time, for the pod configs and, as the
baseline, the same B/16 config with today's replicated state.

  pip install -e ".[tpu]"   # libtpu: compiles for TPUs, needs none
  python benchmarks/pod_compile.py --topology=v5e:16x16 --out=benchmarks/results/pod_compile_v5e256.json

Text towers need only their vocabulary size and sequence length to compile, so a
placeholder tokenizer of CLIP's 49,408 tokens stands in for a CLIP folder. Each row runs
`launch/compile.py` in its own process.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROP_AND_ADAFACTOR = ["--config.model.towers.image.token_drop_rate=0.5",
                      "--config.optimizer.name=adafactor"]


def big_batch(batch, accum):
  """Overrides for a global batch of `batch` in `accum` gradient-caching micro-batches."""
  return [f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
          f"--config.grad_accum_steps={accum}"]


# (name, config, overrides); batch 32,768 unless a row says otherwise (OpenAI CLIP's).
ROWS = [
    ("ViT-B/16 + text-B, replicated state (baseline)", "configs/image_text.py",
     ["--config.batch_size=32768", "--config.eval_batch_size=32768"]),
    ("ViT-B/16 + text-B, fsdp=16", "configs/image_text.py",
     ["--config.batch_size=32768", "--config.eval_batch_size=32768", "--config.mesh.fsdp=16"]),
    ("image_text:L (ViT-L/14 + text-L), fsdp=16", "configs/image_text.py:L", []),
    ("image_text:L, fsdp=256 (every chip)", "configs/image_text.py:L",
     ["--config.mesh.data=1", "--config.mesh.fsdp=256"]),
    ("image_text:g (ViT-g/14 + text-g)", "configs/image_text.py:g", []),
    ("image_text:bigG (ViT-bigG/14 + text-bigG)", "configs/image_text.py:bigG", []),
    ("audio_video_text:pod without gradient caching", "configs/audio_video_text.py:pod",
     ["--config.grad_accum_steps=1"]),
    ("audio_video_text:pod (AST-B + ViT-B/16 frames + text-B)",
     "configs/audio_video_text.py:pod", []),
    ("image_text:g, Adafactor", "configs/image_text.py:g", ["--config.optimizer.name=adafactor"]),
    ("image_text:L, token_drop_rate=0.5", "configs/image_text.py:L",
     ["--config.model.towers.image.token_drop_rate=0.5"]),
    ("image_text:e (ViT-e/14 + text-bigG, batch 65,536, k=4, drop 0.5, Adafactor)",
     "configs/image_text.py:e", []),
    ("image_text:bigG, batch 131,072, k=4, drop 0.5, Adafactor", "configs/image_text.py:bigG",
     [*big_batch(131_072, 4), *DROP_AND_ADAFACTOR]),
]


def placeholder_tokenizer(folder, vocab_size=49_408):
  """A word-level tokenizer of `vocab_size` tokens saved as a Hugging Face folder."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {"[PAD]": 0, "[UNK]": 1} | {f"t{i}": i for i in range(2, vocab_size)}
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]",
                                       pad_token="[PAD]").save_pretrained(folder)
  return folder


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:16x16")
  parser.add_argument("--rows", default="", help="comma-separated row numbers (default all)")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args()
  wanted = [int(r) for r in args.rows.split(",") if r] or range(len(ROWS))
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = placeholder_tokenizer(os.path.join(tmp, "tokenizer"))
    for i in wanted:
      name, config, overrides = ROWS[i]
      out = os.path.join(tmp, f"{i}.json")
      cmd = [sys.executable, os.path.join(REPO, "launch", "compile.py"),
             f"--config={os.path.join(REPO, config)}", f"--topology={args.topology}",
             f"--config.modalities.text.tokenizer={tokenizer}", f"--out={out}", *overrides]
      print(f"[{i}] {name}", flush=True)
      proc = subprocess.run(cmd, capture_output=True, text=True)
      row = {"row": name, "config": config, "overrides": overrides}
      if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
          row |= json.load(f)
        row["fits"] = proc.returncode == 0
      else:
        row |= {"fits": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
      print("\n".join(line for line in proc.stdout.splitlines()[1:]) or row.get("error"),
            flush=True)
      results.append(row)
  gib = lambda b: f"{b / (1 << 30):.2f}"
  print(f"\n{args.topology}, per chip (GiB)")
  print(f"{'config':58} {'state':>6} {'temps':>6} {'total':>6} {'HBM':>6} {'free':>6} "
        f"{'TFLOP':>7} {'compile s':>9}")
  for r in results:
    if "total_bytes" not in r:
      print(f"{r['row']:58} does not compile: {r['error']}")
      continue
    free = 100 * (1 - r["total_bytes"] / r["hbm_bytes"]) if r["hbm_bytes"] else float("nan")
    print(f"{r['row']:58} {gib(r['state_bytes']):>6} {gib(r['temp_bytes']):>6} "
          f"{gib(r['total_bytes']):>6} {gib(r['hbm_bytes'] or 0):>6} {free:5.1f}% "
          f"{r['flops'] / 1e12:7.1f} {r['compile_seconds']:9.0f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"topology": args.topology, "rows": results}, f, indent=1)


if __name__ == "__main__":
  main()
