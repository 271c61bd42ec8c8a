"""The train state: everything a checkpoint holds."""

import contextlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step, params, optimizer state; with momentum objectives (ITC, IMS) also the EMA copy of
  the params and the queues {modality: {"emb": [Q, D], "ids": [Q]}, "pointer": []}."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  momentum_params: Any = None
  queues: Any = None


def create_train_state(model, tx, example_batch, seed, queue_size=0):
  """Initializes params from an example batch (shapes only matter) and the optimizer state;
  with `queue_size`, the momentum params (a copy) and empty queues (ids -1)."""
  variables = model.init(jax.random.key(seed), example_batch, train=False,
                         method=model.init_all)
  params = variables["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  if not queue_size:
    return state
  queues = {m: {"emb": jnp.zeros((queue_size, model.embed_dim), jnp.float32),
                "ids": jnp.full((queue_size,), -1, jnp.int32)} for m in model.towers}
  queues["pointer"] = jnp.zeros((), jnp.int32)
  return state.replace(momentum_params=jax.tree.map(jnp.copy, params), queues=queues)


def init_on_devices(create, example_batch, shardings=None):
  """Runs `create(example_batch)` (e.g. a partial of create_train_state) jitted into
  `shardings`.

  On GPU, XLA inlines and fuses one copy of the ThreeFry hash per initialized array, which
  took 3 min 20 s to compile for ViT-B/16 + text-B on an H100; jax's ThreeFry kernel (the
  same hash as one custom call) compiles in seconds. Elsewhere the flag changes nothing.
  """
  with config_value("jax_threefry_gpu_kernel_lowering", True):
    return jax.jit(create, out_shardings=shardings)(example_batch)


@contextlib.contextmanager
def config_value(name, value):
  """A context with JAX config option `name` set to `value`."""
  previous = getattr(jax.config, name)
  jax.config.update(name, value)
  try:
    yield
  finally:
    jax.config.update(name, previous)


def ema(momentum_params, params, momentum):
  """momentum * EMA + (1 - momentum) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, momentum_params,
                      params)
