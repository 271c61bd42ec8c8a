"""Sharding rules and the (data, fsdp) mesh: known answers for which dimension each rule
splits, and clear errors for rules and mesh shapes that cannot work."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xmodal_jax import parallel
from xmodal_jax.parallel import sharding


def test_fsdp_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((768, 3072), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((3072, 768), 4) == P("fsdp", None)
  assert sharding.fsdp_spec((6, 10), 4) == P()  # nothing divides by 4: replicated
  assert sharding.fsdp_spec((10, 8), 4) == P(None, "fsdp")  # 10 does not divide
  assert sharding.fsdp_spec((), 4) == P()
  assert sharding.fsdp_spec((768, 3072), 1) == P()


def test_rules_apply_first_match_to_params_optimizer_state_and_queues():
  mesh = parallel.make_mesh(shape=dict(data=2, fsdp=4))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  state = {"params": {"towers": {"text": {"embed": leaf(1000, 64), "ln": leaf(64)},
                                 "audio": {"kernel": leaf(64, 128)}}},
           "opt_state": [{"mu": {"towers": {"text": {"embed": leaf(1000, 64)}}}}],
           "queues": {"text": {"emb": leaf(4096, 64)}, "pointer": leaf()}}
  rules = [(r"towers/text/ln", "replicate"), (r"towers/audio/", ("fsdp", None)), (".*", "fsdp")]
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh, rules))
  assert specs["params"]["towers"]["text"] == {"embed": P("fsdp", None), "ln": P()}
  assert specs["params"]["towers"]["audio"]["kernel"] == P("fsdp", None)
  assert specs["opt_state"][0]["mu"]["towers"]["text"]["embed"] == P("fsdp", None)
  assert specs["queues"]["text"]["emb"] == P(("data", "fsdp"))
  assert specs["queues"]["pointer"] == P()


def test_bad_rules_and_mesh_shapes_are_named():
  with pytest.raises(ValueError, match=r"config.sharding\[0\]: rule 'shard'"):
    sharding.check_rules([(".*", "shard")])
  with pytest.raises(ValueError, match=r"config.sharding\[0\]: '\(' is not a regex"):
    sharding.check_rules([("(", "fsdp")])
  with pytest.raises(ValueError, match=r"mesh axes \('data', 'fsdp'\)"):
    sharding.check_rules([(".*", ("model", None))])
  mesh = parallel.make_mesh(shape=dict(fsdp=8))
  with pytest.raises(ValueError, match=r"does not fit params/w of shape \(6, 8\)"):
    sharding.state_shardings({"params": {"w": jax.ShapeDtypeStruct((6, 8), np.float32)}},
                             mesh, [(".*", ("fsdp", None))])
  assert parallel.mesh_shape(dict(fsdp=2), 8) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match=r"config.mesh.*8 devices do not divide by 3"):
    parallel.mesh_shape(dict(fsdp=3), 8)
  with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
    parallel.mesh_shape(dict(model=2), 8)
  with pytest.raises(ValueError, match=r"16 devices, but there are 8"):
    parallel.mesh_shape(dict(data=4, fsdp=4), 8)
