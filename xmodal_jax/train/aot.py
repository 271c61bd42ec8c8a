"""Ahead-of-time compilation of the real train step for any devices, including TPU
topologies that are not here (`jax.experimental.topologies`, with libtpu installed: a CPU
host compiles for a v5e-256), and what it needs per chip (docs/architecture.md,
"Compiling ahead of time"). The step itself is assembled as for training
(xmodal_jax/experiment.py: compile_train_step)."""

import dataclasses

import jax
import numpy as np

from xmodal_jax.models import attention
from xmodal_jax.train import state as state_lib

GIB = 1 << 30
# HBM per chip by device_kind; XLA keeps a little for itself (v5e: 15.75 of 16 GiB usable).
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5e": 16 * GIB,
             "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB, "TPU v6 lite": 32 * GIB,
             "TPU v6e": 32 * GIB}


def topology_devices(name):
  """The abstract devices of a TPU topology such as "v5e:16x16" (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(name, platform="tpu").devices
  except Exception as e:  # pylint: disable=broad-except  # libtpu's errors have no one type
    raise ValueError(f"--topology={name!r}: cannot describe it ({type(e).__name__}: {e}); "
                     "is libtpu installed (pip install -e '.[tpu]') and the name a TPU "
                     "topology such as v5e:16x16 or v4:2x2x2?") from e


@dataclasses.dataclass
class Report:
  """Per-chip figures of a compiled train step (bytes; flops of one step)."""
  devices: int
  device_kind: str
  mesh: dict
  params: int
  state_bytes: int  # params, optimizer state, EMA copy and queues: this chip's shards
  argument_bytes: int  # the state and this chip's rows of the batch
  temp_bytes: int  # activations and every other buffer XLA allocates for the step
  total_bytes: int  # arguments + temporaries + outputs not aliased to (donated) arguments
  hbm_bytes: int  # None when the device kind is not in HBM_BYTES
  flops: float  # as XLA counts them: a loop's body once (see grad_accum_steps)
  compile_seconds: float
  grad_accum_steps: int = 1  # > 1: `flops` holds one micro-batch of the towers, not k
  optimizer_bytes: int = 0  # the whole optimizer state, all shards (AdamW vs Adafactor)

  def fits(self):
    return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes


def shard_bytes(tree):
  """Bytes of one device's shards of abstract arrays with shardings (the largest shard)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def lower_and_compile(train_fn, state, batch, devices, mesh):
  """The jitted `train_fn` compiled for `devices` on abstract `state` and `batch` (with
  their shardings). attention_impl="auto" resolves for the target chips; kernels run per
  device (the mesh). No persistent compilation cache: an executable for chips that are not
  here cannot be read back from it (JAX warns on every later compile)."""
  with attention.target_platform(devices[0].platform), jax.set_mesh(mesh), \
      state_lib.config_value("jax_enable_compilation_cache", False):
    return train_fn.lower(state, batch).compile()


def report(compiled, devices, mesh, state, seconds, grad_accum_steps):
  """The Report of a compiled step whose state is `state` (ShapeDtypeStructs with
  shardings)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kind = devices[0].device_kind
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
           + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return Report(
      devices=len(devices), device_kind=kind, mesh=dict(mesh.shape),
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
      state_bytes=shard_bytes(state), argument_bytes=memory.argument_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, total_bytes=total, hbm_bytes=HBM_BYTES.get(kind),
      flops=float(cost.get("flops", 0.0)) if cost else 0.0, compile_seconds=seconds,
      grad_accum_steps=grad_accum_steps, optimizer_bytes=sum(
          int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
          for x in jax.tree.leaves(state.opt_state)))


def size(num_bytes):
  return (f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10
          else f"{num_bytes / (1 << 20):.2f} MiB")


def format_report(report):
  gib = size
  lines = [f"{report.devices} x {report.device_kind}, mesh {report.mesh}, "
           f"{report.params / 1e6:.2f}M parameters; per chip:",
           f"  state (params, optimizer, EMA, queues)  {gib(report.state_bytes)} (optimizer: "
           f"{report.optimizer_bytes / max(report.params, 1):.2f} bytes per parameter)",
           f"  arguments (state + batch rows)          {gib(report.argument_bytes)}",
           f"  temporaries                             {gib(report.temp_bytes)}",
           f"  total                                   {gib(report.total_bytes)}"]
  if report.hbm_bytes:
    free = 1 - report.total_bytes / report.hbm_bytes
    lines.append(f"  HBM                                     {gib(report.hbm_bytes)} "
                 f"({100 * free:.1f}% free)")
  flops = f"  XLA's flops per step                    {report.flops / 1e12:.2f} TFLOP"
  if report.grad_accum_steps > 1:
    flops += (f" (counting the towers' loop over {report.grad_accum_steps} micro-batches "
              "once: XLA counts a loop's body once)")
  lines += [flops, f"compiled in {report.compile_seconds:.1f} s"]
  return "\n".join(lines)
