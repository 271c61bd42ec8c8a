"""Where device time goes: a jax.profiler trace summarized per kernel and per kind of kernel.

Reads the trace's XSpace with jax.profiler.ProfileData (no TensorBoard needed). Kernel
events are taken from the device plane's stream lines, so each kernel counts once.
"""

import collections
import glob
import os
import re

import jax

# First match wins; lower-case substrings of kernel names.
KINDS = (
    ("attention (cuDNN)", ("fmha", "flash", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("triton fusion", ("triton",)),
    ("reduction fusion", ("reduce", "input_")),
    ("elementwise fusion", ("fusion", "loop_")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset")),
)


def kind_of(kernel_name):
  lower = kernel_name.lower()
  return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def trace(step_fn, state, batch, steps, directory):
  """Runs `steps` calls of state = step_fn(state, batch)[0] under the profiler."""
  jax.block_until_ready(state)
  with jax.profiler.trace(directory):
    for _ in range(steps):
      state = step_fn(state, batch)[0]
    jax.block_until_ready(state)
  return state


def summarize(directory, steps, top=25):
  """(rows per kernel, rows per kind, device-busy ms per step) from the newest trace."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"{directory}: no *.xplane.pb trace found")
  data = jax.profiler.ProfileData.from_file(paths[-1])
  per_kernel = collections.Counter()
  calls = collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.lower().startswith("stream"):
        continue
      for event in line.events:
        per_kernel[event.name] += event.duration_ns
        calls[event.name] += 1
  total = sum(per_kernel.values()) or 1  # CPU traces have no device plane.
  per_kind = collections.Counter()
  for name, ns in per_kernel.items():
    per_kind[kind_of(name)] += ns
  kernels = [{"kernel": name[:90], "kind": kind_of(name), "ms_per_step": ns / 1e6 / steps,
              "calls_per_step": calls[name] / steps, "share": ns / total}
             for name, ns in per_kernel.most_common(top)]
  kinds = [{"kind": kind, "ms_per_step": ns / 1e6 / steps, "share": ns / total}
           for kind, ns in per_kind.most_common()]
  return kernels, kinds, total / 1e6 / steps


def print_summary(kernels, kinds, busy_ms):
  print(f"  device busy {busy_ms:.1f} ms/step; by kind:")
  for row in kinds:
    print(f"    {row['kind']:20s} {row['ms_per_step']:8.2f} ms  {100 * row['share']:5.1f}%")
  print("  top kernels:")
  for row in kernels:
    print(f"    {row['ms_per_step']:7.2f} ms {row['calls_per_step']:5.0f}x "
          f"{row['kind'][:12]:12s} {row['kernel']}")


def describe_fusions(dump_dir, kernel_names, max_lines=12):
  """The optimized-HLO text of each named fusion (from an --xla_dump_to folder): the
  instruction that calls it and the first lines of its fused computation."""
  paths = glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt"))
  if len(paths) != 1:
    # Fusion names repeat across modules: with two variants' steps they would be ambiguous.
    raise ValueError(f"{dump_dir}: expected the dump of one train step, found {len(paths)}; "
                     "dump one variant per run")
  with open(paths[0]) as f:
    lines = f.read().splitlines()
  out = []
  for name in kernel_names:
    hlo_name = re.sub(r"_(\d+)$", r".\1", name)  # Kernels are named after HLO, "." -> "_".
    call = next((l for l in lines if l.strip().startswith((f"%{hlo_name} =", f"%{name} ="))),
                None)
    if call is None:
      continue
    out.append(f"== {name}\n{call.strip()[:400]}")
    if "calls=%" not in call:
      continue
    called = call.split("calls=%")[-1].split(",")[0].split(" ")[0]
    start = next((i for i, l in enumerate(lines) if l.startswith(f"%{called} (")), None)
    body = [] if start is None else lines[start + 1:start + 1 + max_lines]
    body = body[:body.index("}")] if "}" in body else body
    out.extend("    " + l.strip()[:200] for l in body)
  return "\n".join(out)


if __name__ == "__main__":
  import argparse
  import json
  parser = argparse.ArgumentParser(description="Describe a profile's top fusions.")
  parser.add_argument("--dump", required=True, help="an --xla_dump_to folder")
  parser.add_argument("--json", required=True, help="a benchmark JSON with profile_kernels")
  args = parser.parse_args()
  with open(args.json) as f:
    rows = json.load(f)["two_tower"]
  for row in rows:
    names = [k["kernel"] for k in row.get("profile_kernels", [])]
    print(f"### {row['dtype']} {row['attention']}")
    print(describe_fusions(args.dump, names))
