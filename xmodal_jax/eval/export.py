"""Embedding export: every item of a split, every modality it has, as NumPy files.

  {out}/ids.npy               int64[N] item ids, in dataset order
  {out}/{modality}.npy        float32[N, D] L2-normalized (zero rows where the item lacks it)
  {out}/mask_{modality}.npy   bool[N] which rows hold an embedding
  {out}/meta.json             model config, checkpoint step, split, dims, count, masks

Batches are written to {out}/parts/ as they are computed, so an interrupted export resumes
where it stopped; parts from another checkpoint or config are refused, not mixed.
"""

import io
import json
import os

import numpy as np

from xmodal_jax import files


def write_export(out, batches, num_batches, signature, meta):
  """Writes the export files from `batches` (an iterable of Embedder.batches dicts).

  `signature` (a JSON-able dict) identifies what produced the parts; `meta` goes to
  meta.json with dims, count and masks added. Returns meta.
  """
  parts_dir = os.path.join(out, "parts")
  files.makedirs(parts_dir)
  signature_path = os.path.join(parts_dir, "signature.json")
  if files.exists(signature_path):
    previous = json.loads(files.read_text(signature_path))
    if previous != signature:
      raise ValueError(f"{out}: holds parts of another export ({previous}); use a new --out "
                       f"or delete it to export {signature}")
  else:
    files.write_atomically(signature_path, json.dumps(signature))
  paths = []
  for index, batch in enumerate(batches):
    path = os.path.join(parts_dir, f"{index:06d}.npz")
    paths.append(path)
    if files.exists(path):
      continue  # Written before an interruption.
    flat = {"_id": batch["_id"]}
    flat.update({f"emb/{m}": v for m, v in batch["emb"].items()})
    flat.update({f"mask/{m}": v for m, v in batch["_mask"].items()})
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    files.write_atomically(path, buffer.getvalue())  # A part exists only once complete.
    print(f"export: batch {index + 1}/{num_batches}", flush=True)
  parts = [files.load_arrays(p) for p in paths]
  ids = np.concatenate([p["_id"] for p in parts]).astype(np.int64)
  modalities = sorted(k.split("/", 1)[1] for k in parts[0] if k.startswith("emb/"))
  meta = dict(meta, count=int(len(ids)), dims={}, masks={})
  files.save_array(os.path.join(out, "ids.npy"), ids)
  for m in modalities:
    emb = np.concatenate([p[f"emb/{m}"] for p in parts]).astype(np.float32)
    mask = np.concatenate([p[f"mask/{m}"] for p in parts]).astype(bool)
    emb[~mask] = 0.0
    files.save_array(os.path.join(out, f"{m}.npy"), emb)
    files.save_array(os.path.join(out, f"mask_{m}.npy"), mask)
    meta["dims"][m] = int(emb.shape[1])
    meta["masks"][m] = {"file": f"mask_{m}.npy", "items_with_modality": int(mask.sum())}
  files.write_atomically(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
  return meta


def read_export(out):
  """(ids, {modality: emb}, {modality: mask}, meta) from an export folder."""
  meta_path = os.path.join(out, "meta.json")
  if not files.exists(meta_path):
    raise FileNotFoundError(f"{out}: no meta.json, so not a finished export")
  meta = json.loads(files.read_text(meta_path))
  ids = files.load_arrays(os.path.join(out, "ids.npy"))
  embeddings = {m: files.load_arrays(os.path.join(out, f"{m}.npy")) for m in meta["dims"]}
  masks = {m: files.load_arrays(os.path.join(out, f"mask_{m}.npy")) for m in meta["dims"]}
  return ids, embeddings, masks, meta
