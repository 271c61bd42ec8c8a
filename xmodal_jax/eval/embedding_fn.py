"""A trained model's embedding function per modality, serialized with `jax.export`: what a
user needs to embed new items with jax and NumPy alone, for any tower (the from-scratch
ones and fusion-free runs have no Hugging Face layout to go to).

  {out}/{modality}.jax_export   jax.export.serialize of (params, inputs) -> float32[B, D]
                                (L2-normalized, batch size free)
  {out}/{modality}.params.npz   the params that function takes, a list in the file's order
  {out}/{modality}.json         the inputs' names, shapes and dtypes, and the modality's
                                preprocessing options (what turns a file or text into inputs)

Loading (docs/guide.md, "Taking the model elsewhere"):

  fn = jax.export.deserialize(open("text.jax_export", "rb").read())
  weights = np.load("text.params.npz")
  emb = fn.call([weights[k] for k in weights.files], {"input_ids": ..., ...})
"""

import io
import json
import os

import jax
import numpy as np
from jax import export as jax_export

from xmodal_jax import files


def modality_params(params, modality):
  """The part of the model's params that embedding `modality` reads."""
  keep = (f"towers_{modality}", f"heads_{modality}", "logit_scale", "logit_bias")
  return {k: v for k, v in params.items() if k in keep}


def embedding_function(model, modality, treedef):
  """(list of param leaves, inputs) -> embeddings of `modality`, as model.apply gives them."""
  def embed(leaves, inputs):
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return model.apply({"params": params}, {modality: inputs}, train=False)[modality]
  return embed


def export_modality(model, params, modality, input_spec, options, out):
  """Serializes `modality`'s embedding function with a symbolic batch size and writes the
  three files. `input_spec`: {name: ShapeDtypeStruct} of one batch's inputs."""
  subset = modality_params(params, modality)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(subset)
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in paths_leaves]
  leaves = [np.asarray(leaf) for _, leaf in paths_leaves]
  batch = jax_export.symbolic_shape("batch")[0]
  inputs = {name: jax.ShapeDtypeStruct((batch,) + tuple(spec.shape[1:]), spec.dtype)
            for name, spec in input_spec.items()}
  leaf_specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
  exported = jax_export.export(jax.jit(embedding_function(model, modality, treedef)))(
      leaf_specs, inputs)
  files.makedirs(out)
  files.write_atomically(os.path.join(out, f"{modality}.jax_export"),
                         bytes(exported.serialize()))
  buffer = io.BytesIO()
  np.savez(buffer, **dict(zip(names, leaves)))
  files.write_atomically(os.path.join(out, f"{modality}.params.npz"), buffer.getvalue())
  description = {
      "modality": modality,
      "inputs": {name: {"shape": ["batch"] + list(spec.shape[1:]),
                        "dtype": np.dtype(spec.dtype).name}
                 for name, spec in input_spec.items()},
      "output": {"shape": ["batch", int(exported.out_avals[0].shape[1])],
                 "dtype": "float32", "l2_normalized": True},
      "preprocessing": options,
      "params": len(leaves)}
  files.write_atomically(os.path.join(out, f"{modality}.json"),
                         json.dumps(description, indent=1))
  return description
