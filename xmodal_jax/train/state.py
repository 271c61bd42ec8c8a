"""The train state: everything a checkpoint holds."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any


def create_train_state(model, tx, example_batch, seed):
  """Initializes params from an example batch (shapes only matter) and the optimizer state."""
  variables = model.init(jax.random.key(seed), example_batch, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
