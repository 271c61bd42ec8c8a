"""One process of the multi-process tests: `python distributed_worker.py PORT RANK OUT
[DATA_DIR]`.

Two such processes with 4 CPU devices each form one 8-device mesh. Without DATA_DIR, each
feeds only its own half of the global batch, and process 0 writes the losses of every mode
as JSON to OUT. With DATA_DIR (holding digit_sequences), each writes its share of the tiny
mixture's batch at step 2, read from a fresh stream resumed there, to OUT.RANK.npz.
"""

import json
import os
import sys

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xmodal_jax import losses, parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = [("dense", None), ("blockwise", 4), ("ring", 4)]


def global_inputs():
  """The same global batch in every process (and in the test): 3 modalities, 48 rows."""
  rng = np.random.default_rng(7)
  emb = {}
  for name in ("audio", "video", "text"):
    x = rng.normal(size=(48, 8))
    emb[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  masks = {name: rng.random(48) < 0.8 for name in emb}
  return emb, masks


FAILURES = ("before", "first", "last", "after")  # where process 1's work raises, if at all


def failure_outcomes():
  """For each place in FAILURES (and "none"), what every process's work over an InStep
  stream came to on this process (process 1's work fails there): the total of the items,
  or the error's type; and whether a later collective still works."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from xmodal_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  outcomes = {}
  for where in FAILURES + ("none",):
    def items():  # each item is made by a collective, as gathered embeddings are
      for i in range(3):
        yield int(np.asarray(multihost_utils.process_allgather(np.int32(i))).sum())

    def work(stream, where=where):
      fails = jax.process_index() == 1
      if fails and where == "before":
        raise OSError("cannot create the output folder")
      total = 0
      for i, value in enumerate(stream):
        if fails and (where, i) in (("first", 0), ("last", 2)):
          raise OSError("disk full")
        total += value
      if fails and where == "after":
        raise OSError("cannot write meta.json")
      return total
    try:
      with distributed.InStep(items()) as stream:
        outcomes[where] = work(stream)
    except (OSError, distributed.HostFailed) as e:
      outcomes[where] = type(e).__name__
  # Every process is still in step: one more collective completes.
  outcomes["in_step"] = int(np.asarray(multihost_utils.process_allgather(np.int32(1))).sum())
  return outcomes


def mixture_share(rank, out, data_dir):
  """This process's rows of the tiny mixture's batch at step 2, from a resumed stream."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import schema  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import source as source_lib  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny,mixture")
  config.data.data_dir = data_dir
  config = schema.resolve(config, jax.device_count())
  batch = next(source_lib.Source.open(source_lib.input_config(config)).train_batches(
      start_step=2))
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  np.savez(f"{out}.{rank}.npz", **{jax.tree_util.keystr(k): v for k, v in leaves})


def main(port, rank, out, data_dir=None):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=rank)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  if data_dir:
    mixture_share(rank, out, data_dir)
    jax.distributed.shutdown()
    return
  with open(f"{out}.failures{rank}", "w") as f:
    json.dump(failure_outcomes(), f)
  emb, masks = global_inputs()
  mesh = parallel.make_mesh()
  rows = slice(24 * rank, 24 * (rank + 1))
  local = jax.tree.map(lambda x: x[rows], (emb, masks))
  emb_g, masks_g = parallel.shard_batch(local, mesh)
  results = {}
  for impl, block_size in MODES:
    for objective in ("softmax", "regression"):
      if objective == "softmax":
        fn = lambda e, m: losses.contrastive_loss(  # pylint: disable=cell-var-from-loop
            e, 9.0, masks=m, impl=impl, block_size=block_size, axis_name="data")[0]
      else:
        fn = lambda e, m: losses.similarity_regression_loss(  # pylint: disable=cell-var-from-loop
            e, masks=m, impl=impl, block_size=block_size, axis_name="data")[0]
      sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data")),
                                      out_specs=P()))
      value = sharded(emb_g, masks_g)
      results[f"{objective}/{impl}"] = float(jax.device_get(
          jax.device_put(value, NamedSharding(mesh, P()))).item())
  if rank == 0:
    with open(out, "w") as f:
      json.dump(results, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  # Before jax creates its backend; a test importing this module keeps its own devices.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
