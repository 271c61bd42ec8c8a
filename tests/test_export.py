"""launch/export.py and launch/convert.py --to=jax on the suite's trained run
(conftest.trained_run) and its export (conftest.short_export): shards, resume, several
processes, readers without this package, FAISS against exact search."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from conftest import run_launcher, start_launchers

pytestmark = pytest.mark.slow


# A downstream reader with NumPy and pyarrow only: finds rows by key across the shards.
READ_WITH_NUMPY_AND_PYARROW = """
import json, sys
import numpy as np, pyarrow.parquet as pq
out, wanted = sys.argv[1], sys.argv[2:]
meta = json.load(open(f"{out}/meta.json"))
found = {}
for shard in meta["shards"]:
  keys = pq.read_table(f"{out}/items/{shard['name']}.parquet").column("key").to_pylist()
  text = np.load(f"{out}/embeddings/text/{shard['name']}.npy", mmap_mode="r")
  for i, key in enumerate(keys):
    if key in wanted:
      found[key] = {"row": shard["start"] + i, "text": text[i].tolist()}
assert not {"jax", "tensorflow", "xmodal_jax"} & set(sys.modules), sorted(sys.modules)
print(json.dumps(found))
"""


def test_metrics_from_exported_files_equal_evaluate(trained_run, short_export, tmp_path):
  args, _, _ = trained_run
  out = short_export
  report = str(tmp_path / "eval.json")
  results = str(tmp_path / "suite")
  printed = run_launcher("evaluate.py", args + [f"--out={report}", f"--results_dir={results}"],
                         devices=2).stdout
  assert "audio+video->text" in printed
  with open(report) as f:
    reported = json.load(f)
  with open(os.path.join(results, "summary.json")) as f:
    summary = json.load(f)
  assert [(r["dataset"], r["split"], r["task"]) for r in summary] == [
      ("digit_sequences", "test", "retrieval")]
  with open(os.path.join(results, summary[0]["file"])) as f:
    one = json.load(f)
  assert set(one) == {"dataset", "split", "task", "evaluator", "checkpoint", "metrics"}
  assert one["checkpoint"]["step"] == 150
  assert one["metrics"] == {k: v for k, v in reported.items() if k not in ("step", "split")}
  single = [v for k, v in one["metrics"].items()
            if k.endswith("/R@1") and "+" not in k.split("/")[1]]
  assert len(single) == 6 and summary[0]["value"] == pytest.approx(np.mean(single))
  assert "mean R@1" in printed
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  exported = export.read_export(out)
  meta = exported.meta
  assert meta["step"] == reported["step"] == 150 and meta["count"] == 1000
  assert [s["rows"] for s in meta["shards"]] == [512, 488]
  ids = exported.ids()
  assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and len(ids) == 1000
  emb = {m: exported.embeddings(m) for m in ("audio", "video", "text")}
  for m, e in emb.items():
    assert e.shape == (1000, meta["dims"][m])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-4)
    assert exported.mask(m).all()
  for q, g in [("audio", "text"), ("text", "video"), ("video", "audio")]:
    ranks = fixtures.numpy_ranks(emb[q], emb[g], ids, ids)
    assert reported[f"test/{q}->{g}/R@1"] == pytest.approx(100 * np.mean(ranks <= 1))
    assert reported[f"test/{q}->{g}/MnR"] == pytest.approx(np.mean(ranks), rel=1e-5)
  fused = emb["audio"] + emb["video"]
  fused /= np.linalg.norm(fused, axis=1, keepdims=True)
  ranks = fixtures.numpy_ranks(fused, emb["text"], ids, ids)
  assert reported["test/audio+video->text/R@5"] == pytest.approx(100 * np.mean(ranks <= 5))


def test_export_resumes_and_refuses_to_mix(trained_run, short_export, tmp_path):
  """A copy of the suite's export, as if killed before its last shard was complete,
  resumes with that shard alone; another batch size, or another checkpoint at the same step,
  is refused."""
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  args, _, _ = trained_run
  out = str(tmp_path / "emb")
  shutil.copytree(short_export, out)
  first = export.read_export(out).embeddings("text")
  os.remove(os.path.join(out, "items", "0000-00001.parquet"))
  os.remove(os.path.join(out, "meta.json"))
  printed = run_launcher("export.py", args + [f"--out={out}", "--shard_rows=500"],
                         devices=2).stdout
  assert "export: resuming after 1 of 2 shards" in printed
  assert printed.count("export: shard") == 1  # Only the missing shard was computed again.
  np.testing.assert_allclose(export.read_export(out).embeddings("text"), first, atol=1e-6)
  os.remove(os.path.join(out, "meta.json"))
  # The run's checkpoint replaced by another model's at the same step: its commit differs.
  with open(os.path.join(out, "signature.json")) as f:
    signature = json.load(f)
  assert signature["checkpoint"].startswith("step 150, committed at ")
  signature["checkpoint"] = "step 150, committed at 1 ns"
  with open(os.path.join(out, "signature.json"), "w") as f:
    json.dump(signature, f)
  proc = run_launcher("export.py", args + [f"--out={out}", "--shard_rows=500",
                                           "--config.eval_batch_size=256"],
                      devices=2, check=False)
  assert proc.returncode and "holds shards of another export" in proc.stderr
  assert "['checkpoint', 'eval_batch_size']" in proc.stderr, proc.stderr[-2000:]


def test_two_processes_write_the_rows_of_one(trained_run, short_export, tmp_path):
  """2 processes x 4 CPU devices each write their own shards; in name order they are the
  single-process export row for row."""
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  args, _, _ = trained_run
  out = str(tmp_path / "emb")
  procs = start_launchers("export.py", args + [f"--out={out}", "--shard_rows=200"], 2)
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
  two, one = export.read_export(out), export.read_export(short_export)
  assert [s["name"] for s in two.meta["shards"]] == [
      "0000-00000", "0000-00001", "0001-00000", "0001-00001"]  # 256 rows per process batch
  assert two.keys().tolist() == one.keys().tolist()
  rows = [999, 0, 300, 600, 255, 256, 300]  # across the 4 shards, unordered, repeated
  assert two.keys_at(rows).tolist() == [one.keys()[r] for r in rows]
  for m in one.modalities:
    np.testing.assert_array_equal(two.mask(m), one.mask(m))
    np.testing.assert_allclose(two.embeddings(m), one.embeddings(m), atol=1e-5)


def test_export_reads_with_numpy_and_pyarrow_alone(short_export):
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  exported = export.read_export(short_export)
  keys = exported.keys()
  wanted = [keys[3], keys[700]]  # one in each shard
  proc = subprocess.run([sys.executable, "-c", READ_WITH_NUMPY_AND_PYARROW, short_export,
                         *wanted], capture_output=True, text=True, check=True)
  found = json.loads(proc.stdout)
  text = exported.embeddings("text")
  assert [found[k]["row"] for k in wanted] == [3, 700]
  for key in wanted:
    np.testing.assert_array_equal(found[key]["text"], text[found[key]["row"]])


# A downstream user with jax and NumPy only: the converted embedding functions on inputs.
EMBED_WITH_JAX_ALONE = """
import sys
import jax, numpy as np
folder, inputs, out = sys.argv[1:]
inputs, result = np.load(inputs), {}
for modality in ("audio", "video", "text"):
  fn = jax.export.deserialize(open(f"{folder}/{modality}.jax_export", "rb").read())
  weights = np.load(f"{folder}/{modality}.params.npz")
  mine = {k.split("/", 1)[1]: inputs[k] for k in inputs.files if k.startswith(modality + "/")}
  result[modality] = np.asarray(fn.call([weights[k] for k in weights.files], mine))
assert not {"flax", "tensorflow", "xmodal_jax"} & set(sys.modules), sorted(sys.modules)
np.savez(out, **result)
"""


def test_converted_embedding_functions_embed_as_the_model(trained_run, short_export,
                                                          digit_data_dir, tmp_path):
  """launch/convert.py --to=jax, loaded with jax and NumPy alone, embeds the test split's
  first 16 items as the export (the model's own embedding step) did."""
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import schema  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data import source as source_lib  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  args, _, _ = trained_run
  folder = str(tmp_path / "model")
  printed = run_launcher("convert.py", args + ["--to=jax", f"--out={folder}"]).stdout
  assert "text:" in printed and f"{folder}/video.jax_export" in printed
  config = audio_video_text.get_config()
  config.data.data_dir = digit_data_dir
  src = source_lib.Source.open(source_lib.input_config(schema.resolve(config, 1)))
  batch = next(src.eval_batches("test"))
  inputs = {f"{m}/{k}": v[:16] for m in ("audio", "video", "text") for k, v in batch[m].items()}
  np.savez(tmp_path / "inputs.npz", **inputs)
  subprocess.run([sys.executable, "-c", EMBED_WITH_JAX_ALONE, folder,
                  str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")], check=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  embedded = np.load(tmp_path / "out.npz")
  exported = export.read_export(short_export)
  for m in ("audio", "video", "text"):
    np.testing.assert_allclose(embedded[m], exported.embeddings(m)[:16], atol=1e-6, err_msg=m)
  with open(os.path.join(folder, "text.json")) as f:
    described = json.load(f)
  assert described["inputs"]["input_ids"]["shape"][0] == "batch"
  assert described["preprocessing"]["kind"] == "text"
  # This run's small from-scratch towers have no Hugging Face layout: said, nothing written.
  refused = run_launcher("convert.py", args + ["--to=hf", "--modalities=text",
                                               f"--out={tmp_path / 'hf'}"], check=False)
  assert refused.returncode and "the text tower: TextTransformer has no Hugging Face" in (
      refused.stderr), refused.stderr[-2000:]
  assert not os.path.exists(tmp_path / "hf" / "text" / "model.safetensors")


def test_faiss_flat_index_returns_the_exact_top_10(short_export):
  """launch/export.py --index=flat against eval/search.topk: 1,000 text queries, the audio
  gallery."""
  from xmodal_jax.eval import export, index, search  # pylint: disable=g-import-not-at-top
  exported = export.read_export(short_export)
  queries, gallery = exported.embeddings("text"), exported.embeddings("audio")
  faiss_scores, faiss_rows = index.search(index.load(exported, "audio"), queries, 10)
  exact_scores, exact_rows = map(np.asarray, search.topk(queries, gallery, 10))
  np.testing.assert_allclose(faiss_scores, exact_scores, atol=1e-5)
  # The same rows, but for neighbours whose scores tie to float32 rounding (listed in
  # either order).
  differ = faiss_rows != exact_rows
  assert differ.mean() < 0.01
  row_scores = np.take_along_axis(queries @ gallery.T, faiss_rows, axis=1)
  np.testing.assert_allclose(row_scores[differ], exact_scores[differ], atol=1e-5)
