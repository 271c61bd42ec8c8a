"""Forward+backward throughput per tower at B/16 size, and a two-tower train step's MFU.

  python benchmarks/encoders.py --size=B --batch=32 --out=encoders.json
  python benchmarks/encoders.py --towers= --two_tower_batch=256   # only the train step

Variants are "dtype[:flag...]": compute dtype (params stay float32) and flags remat (per
block), fp8 (the blocks' matrix products in float8, models/fp8.py) and an attention
implementation (xla, cudnn, auto; cudnn variants are skipped off GPU).
Per tower: samples/s of value_and_grad(sum of pooled outputs^2) w.r.t. the tower's params,
per variant; ratios are to the first variant in the same run. Two-tower: one full train
step of our
MultiModalModel (ViT image tower + CLIP-style text tower, contrastive loss in shard_map,
AdamW update) at --two_tower_batch; model FLOPs per step counted analytically (3x the
forward's matmuls), MFU against the device's bf16 dense peak. open_clip
reports 2,535 samples/s for ViT-B/16 on one H100 with torch.compile; the table gives our
ratio to it. --profile_dir adds where the device time goes, per kernel and kind of kernel.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import profiling
from configs import sizes
from xmodal_jax import parallel
from xmodal_jax.models import attention, towers
from xmodal_jax.train import state as state_lib, step as step_lib

OPEN_CLIP_B16_H100 = 2535.0  # samples/s, ViT-B/16 train step, torch.compile, one H100
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense TFLOP/s


def tower_configs(size):
  """{name: (tower config, example inputs(batch))}."""
  image = 224 if size != "tiny" else 32
  return {
      "vit": (sizes.vit(size, image),
              lambda b: {"pixels": random((b, image, image, 3))}),
      "bert_text": (sizes.bert(size), lambda b: tokens(b, 64, 30522)),
      "clip_text": (sizes.clip_text(size), lambda b: tokens(b, 77, 49408)),
      "ast": (sizes.ast(size, max_frames=1024 if size != "tiny" else 64),
              lambda b: {"spectrogram": random((b, 1024 if size != "tiny" else 64, 128))}),
      "video_frames": (sizes.frames(size, num_frames=8, image_size=image),
                       lambda b: {"frames": random((b, 8, image, image, 3))}),
      "features_mlp": (sizes.features(size), lambda b: {"features": random((b, 2048))}),
  }


def random(shape):
  """Standard-normal float32 inputs (zeros can time faster than real data)."""
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def tokens(batch, length, vocab):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab - 1, size=(batch, length)).astype(np.int32)
  ids[:, -1] = vocab - 1
  return {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int32)}


def parse_variant(text):
  """"dtype[:flag...]" -> tower options {dtype, remat, fp8, attention_impl}."""
  dtype, *flags = text.split(":")
  try:
    jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"variant {text!r}: {dtype!r} is not a dtype") from e
  options = dict(dtype=dtype, remat=False, fp8=False, attention_impl="auto")
  for flag in flags:
    if flag in ("remat", "fp8"):
      options[flag] = True
    elif flag in attention.ATTENTION_IMPLS:
      options["attention_impl"] = flag
    else:
      raise ValueError(f"variant {text!r}: unknown flag {flag!r}; expected remat, fp8 or one "
                       f"of {attention.ATTENTION_IMPLS}")
  return options


def variant_name(options):
  flags = [options["attention_impl"]] + [f for f in ("fp8", "remat") if options[f]]
  return ":".join([options["dtype"]] + flags)


def seconds_per_call(call, repeats, rounds=3):
  """(median over `rounds`, each round's) mean seconds per call of `repeats` calls dispatched
  back to back, as training runs them, with one wait at the end. `call` returns what to wait
  on; the caller has run it once to compile."""
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      out = call()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / repeats)
  return float(np.median(times)), times


def with_options(config, options):
  """A tower config with variant `options`; a frames tower passes them on to its image tower
  (the frames module itself takes only dtype and remat, for its temporal encoder)."""
  if config["name"] != "frames":
    return dict(config) | options
  return dict(config) | dict(image=dict(config["image"]) | options, dtype=options["dtype"],
                             remat=options["remat"])


def tower_row(name, config, make_inputs, batch, options, repeats):
  tower, _ = towers.build_tower(with_options(config, options), name)
  inputs = jax.tree.map(jnp.asarray, make_inputs(batch))
  params = state_lib.init_on_devices(
      lambda x: tower.init(jax.random.key(0), x, train=False)["params"], inputs, None)

  @jax.jit
  def fwd_bwd(params, inputs):
    loss = lambda p: jnp.sum(
        tower.apply({"params": p}, inputs, train=False)["pooled"].astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss)(params)
  jax.block_until_ready(fwd_bwd(params, inputs))  # Compile and warm up.
  seconds, times = seconds_per_call(lambda: fwd_bwd(params, inputs), repeats)
  return {"tower": name, "batch": batch, "variant": variant_name(options), **options,
          "params_M": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
          "ms": 1e3 * seconds, "ms_each_timing": [1e3 * t for t in times],
          "samples_per_s": batch / seconds}


def two_tower_step(size, batch, options, image_activation="gelu"):
  """(jitted step, state, batch) for ViT + CLIP text at `size` (CLIP's B/16 pair) with tower
  `options` (parse_variant's)."""
  image = 224 if size != "tiny" else 32
  model_config = ml_collections.ConfigDict(dict(embed_dim=512, towers=dict(
      image=sizes.vit(size, image, activation=image_activation, **options),
      text=sizes.clip_text(size, **options))))
  model, _ = towers.build_model(model_config)
  loss_config = ml_collections.ConfigDict(dict(
      weights=dict(contrastive=1.0), kind="softmax", pair_weights={}, impl="dense",
      block_size=0))
  mesh = parallel.make_mesh()
  example = {"image": {"pixels": random((batch, image, image, 3))},
             "text": tokens(batch, 77, 49408),
             "_mask": {"image": np.ones(batch, bool), "text": np.ones(batch, bool)},
             "_id": np.arange(batch, dtype=np.int32)}
  tx = optax.adamw(1e-4, weight_decay=0.1)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  start = time.perf_counter()
  state = state_lib.init_on_devices(
      functools.partial(state_lib.create_train_state, model, tx, seed=0),
      jax.tree.map(lambda x: x[:1], example), replicated)
  jax.block_until_ready(state)
  print(f"  init (compile and run): {time.perf_counter() - start:.1f} s", flush=True)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   loss_config=loss_config, mesh=mesh, seed=0),
                 donate_argnums=(0,))
  return step, state, parallel.shard_batch(example, mesh)


def encoder_flops(num_layers, width, mlp_dim, tokens, batch):
  """Forward matmul FLOPs of a transformer encoder: q/k/v/out and MLP projections (2 FLOPs a
  multiply-add) plus the two attention products."""
  per_token = num_layers * (2 * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens * width)
  return batch * tokens * per_token


def step_flops(size, batch, image=224, text_length=77):
  """Model FLOPs of one train step: 3x the forward (forward + backward), image and text.

  Analytic, because XLA's cost analysis on GPU does not count cuBLAS matmuls.
  """
  vit, text = sizes.TRUNKS[size], sizes.CLIP_TEXT_TRUNKS[size]
  patches = (image // sizes.PATCH[size]) ** 2
  forward = (encoder_flops(vit["num_layers"], vit["width"], vit["mlp_dim"], patches + 1, batch)
             + 2 * batch * patches * sizes.PATCH[size] ** 2 * 3 * vit["width"]
             + encoder_flops(text["num_layers"], text["width"], text["mlp_dim"], text_length,
                             batch))
  return 3.0 * forward


def two_tower_row(size, batch, options, repeats, flops, profile_dir="",
                  image_activation="gelu"):
  """Times train steps with `seconds_per_call` (the state threads through them)."""
  start = time.perf_counter()
  step, state, batch_ = two_tower_step(size, batch, options, image_activation)
  state, metrics = step(state, batch_)  # Compile and warm up.
  first_loss = float(metrics["loss"])
  print(f"  compile and first step: {time.perf_counter() - start:.1f} s; first loss "
        f"{first_loss:.5f}", flush=True)
  current = {"state": state}

  def call():
    current["state"], metrics = step(current["state"], batch_)
    return metrics["loss"]
  seconds, times = seconds_per_call(call, repeats)
  state = current["state"]
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  row = {"model": f"vit_{size}+clip_text_{size}", "batch": batch,
         "variant": variant_name(options), **options, "image_activation": image_activation,
         "first_loss": first_loss, "ms": 1e3 * seconds,
         "ms_each_timing": [1e3 * t for t in times], "samples_per_s": batch / seconds,
         "tflops_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
         "mfu": flops / seconds / peak if peak else None,
         "vs_open_clip_h100": batch / seconds / OPEN_CLIP_B16_H100}
  if profile_dir:
    directory = os.path.join(profile_dir, variant_name(options).replace(":", "_"))
    profiling.trace(step, state, batch_, 3, directory)
    kernels, kinds, busy = profiling.summarize(directory, 3)
    profiling.print_summary(kernels, kinds, busy)
    row.update(profile_kernels=kernels, profile_kinds=kinds, device_busy_ms=busy)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="B", choices=sizes.SIZES)
  parser.add_argument("--towers", default="vit,bert_text,clip_text,ast,video_frames,"
                      "features_mlp", help="comma-separated; empty for none")
  parser.add_argument("--batch", type=int, default=32, help="per-tower benchmark batch")
  parser.add_argument("--tower_variants", default="float32,bfloat16,bfloat16:remat",
                      help="dtype[:flag...] entries per tower (see the module docstring); "
                      "times are ratios to the first")
  parser.add_argument("--two_tower_batch", type=int, default=256, help="0 to skip")
  parser.add_argument("--two_tower_variants", default="float32:xla,bfloat16:xla",
                      help="dtype[:flag...] entries, e.g. bfloat16:cudnn:fp8")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="")
  parser.add_argument("--image_activation", default="gelu",
                      help="the ViT's MLP activation (gelu: exact, as ViT and open_clip; "
                      "gelu_new: tanh approximation, as big_vision)")
  parser.add_argument("--profile_dir", default="",
                      help="trace 3 two-tower steps per variant here and print where the "
                      "device time goes (GPU)")
  args = parser.parse_args()
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; size {args.size}", flush=True)

  runnable = lambda options: (options["attention_impl"] != "cudnn"
                              or jax.default_backend() == "gpu")  # cuDNN: GPUs only
  tower_variants, two_tower_variants = (
      [o for o in map(parse_variant, text.split(",")) if runnable(o)]
      for text in (args.tower_variants, args.two_tower_variants))
  configs = tower_configs(args.size)
  rows = []
  for name in filter(None, args.towers.split(",")):
    config, make_inputs = configs[name]
    base = None
    for options in tower_variants:
      batch = args.batch if name != "video_frames" else max(1, args.batch // 8)
      row = tower_row(name, config, make_inputs, batch, options, args.repeats)
      base = base or row["ms"]
      row["time_vs_first_variant"] = row["ms"] / base
      rows.append(row)
      print(f"{name:13s} B={row['batch']:4d} {row['variant']:22s} "
            f"{row['params_M']:7.1f}M  {row['ms']:9.1f} ms  {row['samples_per_s']:9.1f}/s  "
            f"x{row['time_vs_first_variant']:.2f} time vs the first variant", flush=True)

  two_tower = []
  if args.two_tower_batch:
    flops = step_flops(args.size, args.two_tower_batch, 224 if args.size != "tiny" else 32)
    print(f"two-tower step: {flops / 1e12:.2f} TFLOP of model FLOPs (analytic)", flush=True)
    for options in two_tower_variants:
      row = two_tower_row(args.size, args.two_tower_batch, options, args.repeats, flops,
                          args.profile_dir, args.image_activation)
      two_tower.append(row)
      mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "n/a"
      print(f"two-tower {row['model']} B={row['batch']} {row['variant']}: "
            f"{row['ms']:.1f} ms/step, {row['samples_per_s']:.0f} samples/s, "
            f"{row['achieved_tflops']:.1f} TFLOP/s, MFU {mfu}, "
            f"x{row['vs_open_clip_h100']:.2f} open_clip's H100 figure", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
                 "jax": jax.__version__, "towers": rows, "two_tower": two_tower}, f, indent=1)


if __name__ == "__main__":
  main()
