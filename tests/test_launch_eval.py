"""launch/export.py, launch/evaluate.py and launch/search.py on the suite's trained run
(conftest.trained_run: the default config cut to 300 steps, enough to retrieve)."""

import json
import os
import shutil

import numpy as np
import pytest

import fixtures
from conftest import run_launcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_export(trained_run, tmp_path_factory):
  args, _, _ = trained_run
  out = str(tmp_path_factory.mktemp("export"))
  run_launcher("export.py", args + [f"--out={out}"], devices=2)
  return out


def numpy_ranks(query, gallery, query_ids, gallery_ids):
  """1 + #gallery items scoring strictly above the best positive, written out plainly."""
  scores = query @ gallery.T
  ranks = []
  for i in range(len(query)):
    positive = scores[i][gallery_ids == query_ids[i]].max()
    ranks.append(1 + int((scores[i] > positive).sum()))
  return np.array(ranks)


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
  assert one["checkpoint"]["step"] == 300
  assert one["metrics"] == {k: v for k, v in reported.items() if k not in ("step", "split")}
  single = [v for k, v in one["metrics"].items()
            if k.endswith("/R@1") and "+" not in k.split("/")[1]]
  assert len(single) == 6 and summary[0]["value"] == pytest.approx(np.mean(single))
  assert "mean R@1" in printed
  with open(os.path.join(out, "meta.json")) as f:
    meta = json.load(f)
  assert meta["step"] == reported["step"] == 300 and meta["count"] == 1000
  ids = np.load(os.path.join(out, "ids.npy"))
  assert sorted(ids.tolist()) == sorted(set(ids.tolist())) and len(ids) == 1000
  emb = {m: np.load(os.path.join(out, f"{m}.npy")) for m in ("audio", "video", "text")}
  for m, e in emb.items():
    assert e.dtype == np.float32 and e.shape == (1000, meta["dims"][m])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-4)
    assert np.load(os.path.join(out, f"mask_{m}.npy")).all()
  for q, g in [("audio", "text"), ("text", "video"), ("video", "audio")]:
    ranks = numpy_ranks(emb[q], emb[g], ids, ids)
    assert reported[f"test/{q}->{g}/R@1"] == pytest.approx(100 * np.mean(ranks <= 1))
    assert reported[f"test/{q}->{g}/MnR"] == pytest.approx(np.mean(ranks), rel=1e-5)
  fused = emb["audio"] + emb["video"]
  fused /= np.linalg.norm(fused, axis=1, keepdims=True)
  ranks = numpy_ranks(fused, emb["text"], ids, ids)
  assert reported["test/audio+video->text/R@5"] == pytest.approx(100 * np.mean(ranks <= 5))


def test_export_resumes_and_refuses_to_mix(trained_run, short_export, tmp_path):
  """A copy of the suite's export, as if killed before its last batch, resumes."""
  args, _, _ = trained_run
  out = str(tmp_path / "emb")
  shutil.copytree(short_export, out)
  first = np.load(os.path.join(out, "text.npy"))
  parts = sorted(os.listdir(os.path.join(out, "parts")))
  os.remove(os.path.join(out, "parts", parts[-2]))  # As if killed before the last batch.
  os.remove(os.path.join(out, "meta.json"))
  printed = run_launcher("export.py", args + [f"--out={out}"], devices=2).stdout
  assert printed.count("export: batch") == 1  # Only the missing batch was computed again.
  np.testing.assert_allclose(np.load(os.path.join(out, "text.npy")), first, atol=1e-6)
  from xmodal_jax.eval import export  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, "parts", "signature.json")) as f:
    signature = json.load(f)
  with pytest.raises(ValueError, match="holds parts of another export"):
    export.write_export(out, [], 0, dict(signature, step=1), {})
  # Parts record the batch size they were written with: resuming at another is refused.
  os.remove(os.path.join(out, "meta.json"))
  proc = run_launcher("export.py", args + [f"--out={out}", "--config.eval_batch_size=256"],
                      devices=2, check=False)
  assert proc.returncode and "holds parts of another export" in proc.stderr


def test_search_checks_that_the_export_is_the_runs(trained_run, short_export):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import query  # pylint: disable=g-import-not-at-top
  _, workdir, _ = trained_run
  with open(os.path.join(short_export, "meta.json")) as f:
    meta = json.load(f)
  model = audio_video_text.get_config().model
  for tower in model.towers.values():
    tower.pooling = "cls"  # as trained_run sets it
  assert query.export_mismatches(meta, workdir, model) == []
  assert "exported from run" in query.export_mismatches(meta, "/other/run", model)[0]
  model.embed_dim = 32
  assert query.export_mismatches(meta, workdir, model) == [
      "it was exported with another config.model"]


def test_search_lists_the_matching_item_first(trained_run, short_export):
  args, _, _ = trained_run
  printed = run_launcher("search.py", args + [
      f"--export={short_export}", "--query-text=three eight six one",
      "--gallery=text,video", "--k=3"]).stdout
  sections = printed.split("text query -> ")[1:]
  assert [s.split(" ")[0] for s in sections] == ["text", "video"]
  for section in sections:
    first = section.splitlines()[1]
    assert first.strip().startswith("1. id") and "'three eight six one'" in first, printed


def test_search_errors_name_the_flag(trained_run, short_export):
  args, _, _ = trained_run
  proc = run_launcher("search.py", args + [f"--export={short_export}"], check=False)
  assert proc.returncode and "exactly one of --query-text, --query-audio" in proc.stderr
  proc = run_launcher("search.py", args + [f"--export={short_export}",
                                           "--query-video=/nonexistent.mp4"], check=False)
  assert proc.returncode and "--query-video=/nonexistent.mp4: no such file" in proc.stderr
  proc = run_launcher("search.py", args + [f"--export={short_export}", "--query-text=one",
                                           "--gallery=image"], check=False)
  assert proc.returncode and "--gallery=image" in proc.stderr


def test_search_with_an_audio_file(trained_run, short_export):
  """A real recording as the query: it is read, checked and encoded by the audio tower."""
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  args, _, _ = trained_run
  wav = os.path.join(digit_sequences.ASSETS_DIR, "audio", "en", "7.wav")
  printed = run_launcher("search.py", args + [f"--export={short_export}",
                                              f"--query-audio={wav}", "--k=2"]).stdout
  assert "audio query -> video" in printed and "audio query -> text" in printed
  assert printed.count(" 1. id ") == 2


def test_video_file_is_decoded_to_the_dataset_frames_and_searched(trained_run, short_export,
                                                                  digit_data_dir, tmp_path):
  """A test item's four handwriting frames, upscaled 8x and encoded as MP4 (8 video frames,
  each digit held for two): decoding samples them back to 4 x 8 x 8 close to the
  originals, and the query runs."""
  from xmodal_jax.data import media  # pylint: disable=g-import-not-at-top
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  builder = digit_sequences.DigitSequences(data_dir=digit_data_dir)
  item = next(builder.as_dataset(split="test").as_numpy_iterator())
  frames = item["video"][..., 0]  # [4, 8, 8]
  big = np.repeat(np.repeat(np.repeat(frames, 2, axis=0), 8, axis=1), 8, axis=2)
  path = str(tmp_path / "query.mp4")
  fixtures.write_mp4(path, np.repeat(big[..., None], 3, axis=3), fps=4)
  decoded = media.read_video(path, (4, 8, 8, 1))
  assert decoded.shape == (4, 8, 8, 1) and decoded.dtype == np.uint8
  assert np.abs(decoded[..., 0].astype(int) - frames).mean() < 6  # Codec loss only.
  args, _, _ = trained_run
  printed = run_launcher("search.py", args + [f"--export={short_export}",
                                              f"--query-video={path}", "--k=3"]).stdout
  assert "video query -> text" in printed and "video query -> audio" in printed
