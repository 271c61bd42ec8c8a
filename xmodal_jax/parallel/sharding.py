"""Sharding rules: regex on a state leaf's path -> how that leaf is split over the mesh.

`config.sharding` is a list of (regex, rule) pairs, big_vision style; the first regex found
(re.search) in a leaf's path ("params/towers/audio/block_0/attn/query/kernel",
"opt_state/0/mu/towers/...", "momentum_params/...") decides:
  "fsdp"       split the leaf's largest dimension that divides by the fsdp axis' size over
               it (replicated when none does);
  "replicate"  a full copy on every device;
  a tuple      a PartitionSpec, one entry per dimension: a mesh axis name or None.
The momentum queues are not subject to rules: their rows are split over the batch axes.
"""

import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from xmodal_jax.parallel.mesh import BATCH_AXES, FSDP_AXIS

DEFAULT_RULES = ((".*", "fsdp"),)


def path_name(path):
  """A tree path as 'a/b/0/c'."""
  parts = []
  for p in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(p, attribute):
        parts.append(str(getattr(p, attribute)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def fsdp_spec(shape, size):
  """P splitting `shape`'s largest dimension divisible by `size` over fsdp (P() if none)."""
  if size == 1:
    return P()
  divisible = [i for i, d in enumerate(shape) if d % size == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda i: (shape[i], -i))
  return P(*[FSDP_AXIS if i == dim else None for i in range(len(shape))])


def check_rules(rules, where="config.sharding"):
  """Each rule is (regex, "fsdp" | "replicate" | tuple of axis names or None)."""
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"{where}[{i}]={rule!r}: expected (regex, rule)")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{where}[{i}]: {pattern!r} is not a regex ({e})") from e
    if isinstance(spec, str):
      if spec not in ("fsdp", "replicate"):
        raise ValueError(f"{where}[{i}]: rule {spec!r}; expected 'fsdp', 'replicate' or a "
                         "tuple of mesh axes")
    elif not (isinstance(spec, (tuple, list))
              and all(a is None or a in BATCH_AXES for a in spec)):
      raise ValueError(f"{where}[{i}]: rule {spec!r}; a PartitionSpec tuple holds mesh axes "
                       f"{BATCH_AXES} or None")


def leaf_spec(name, shape, mesh, rules, where="config.sharding"):
  for pattern, rule in rules:
    if re.search(pattern, name):
      if rule == "fsdp":
        return fsdp_spec(shape, mesh.shape[FSDP_AXIS])
      if rule == "replicate":
        return P()
      spec = tuple(rule)
      if len(spec) > len(shape) or any(
          axis is not None and shape[i] % mesh.shape[axis] for i, axis in enumerate(spec)):
        raise ValueError(f"{where}: rule {pattern!r} -> {spec} does not fit {name} of shape "
                         f"{tuple(shape)} on mesh {dict(mesh.shape)}")
      return P(*spec)
  return P()


def state_shardings(state, mesh, rules=DEFAULT_RULES):
  """NamedShardings for every leaf of `state` (arrays or ShapeDtypeStructs): queue rows over
  the batch axes, the rest by `rules`."""
  def sharding(path, leaf):
    name = path_name(path)
    shape = getattr(leaf, "shape", ())
    if name.startswith("queues/") and len(shape) >= 1:
      return NamedSharding(mesh, P(BATCH_AXES))
    return NamedSharding(mesh, leaf_spec(name, shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(sharding, state)


def bytes_per_device(tree):
  """Bytes of `tree`'s arrays held by the most loaded device."""
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0
