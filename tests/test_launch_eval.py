"""launch/train.py's finished run, launch/evaluate.py and launch/search.py on the suite's trained
run (conftest.trained_run: the default config cut to 150 steps, enough to retrieve) and its
export (conftest.short_export)."""

import json
import os

import numpy as np
import pytest

import fixtures
from conftest import run_launcher, run_train

pytestmark = pytest.mark.slow


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_resumes_when_done(trained_run):
  """The shared run (here, with the tests that read it: one build per worker) logged,
  checkpointed and evaluated; a changed config is refused; a finished run only evaluates."""
  args, workdir, printed = trained_run
  assert "test/audio->text" not in printed and "audio->text" in printed  # The table.
  assert "1 device;" in printed
  records = read_metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == [50, 100, 150]
  final = records[-1]
  assert final["step"] == 150
  for pair in ("audio->video", "audio->text", "video->audio", "video->text", "text->audio",
               "text->video"):
    for metric in ("R@1", "R@5", "R@10", "MedR", "MnR"):
      assert f"test/{pair}/{metric}" in final
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "150"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # The run's config is saved with it; resuming with one that changes the run stops first.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["batch_size"] == 256
  changed = run_train(args + ["--config.batch_size=128"], devices=2, check=False)
  assert changed.returncode != 0 and "batch_size: 256 -> 128" in changed.stderr
  # Re-running a finished run restores it and only evaluates; the files stay as they were.
  again = run_train(args, devices=2).stdout  # on another layout than it trained on
  assert "Resuming from the checkpoint of step 150" in again and "2 devices;" in again
  assert "step 50/150" not in again and "audio->text" in again
  assert read_metrics(workdir) == records


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


def test_search_lists_the_matching_items_at_the_top(trained_run, short_export):
  """A test caption as the query: its own caption is first among the texts (the same tokens),
  and its item's video is among the top 3 of the 1,000 videos (the trained run's
  text->video R@5 is about 84%; an untrained model's chance is 0.3%)."""
  args, _, _ = trained_run
  printed = run_launcher("search.py", args + [
      f"--export={short_export}", "--query-text=three eight six one",
      "--gallery=text,video", "--k=3"]).stdout
  sections = printed.split("text query -> ")[1:]
  assert [s.split(" ")[0] for s in sections] == ["text", "video"]
  texts, videos = [section.splitlines()[1:4] for section in sections]
  assert texts[0].strip().startswith("1. ") and "'three eight six one'" in texts[0], printed
  assert [line.strip()[:3] for line in videos] == ["1. ", "2. ", "3. "], printed
  assert any("'three eight six one'" in line for line in videos), printed


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
  proc = run_launcher("search.py", args + [f"--export={short_export}", "--query-text=one",
                                           "--k=0"], check=False)
  assert proc.returncode and "--k=0: expected a positive count" in proc.stderr
  proc = run_launcher("search.py", args + [f"--export={short_export}", "--query-text=one",
                                           "--query_modality=audio"], check=False)
  assert proc.returncode and ("--query-text --query_modality=audio: the config's text "
                              "modalities are ['text'], not 'audio'") in proc.stderr


def test_readers_refuse_another_model_and_create_nothing(trained_run, tmp_path):
  """evaluate.py with a config that prepares text otherwise than the run did stops, naming
  the field (export, search and convert share the check); a misspelt workdir is named and
  left uncreated."""
  args, _, _ = trained_run
  proc = run_launcher("evaluate.py", args + ["--config.modalities.text.max_length=10"],
                      check=False)
  assert proc.returncode and "modalities.text.max_length: 8 -> 10" in proc.stderr, (
      proc.stderr[-2000:])
  assert "--allow_config_change" in proc.stderr
  misspelt = tmp_path / "runs" / "avt_typo"
  proc = run_launcher("evaluate.py", [a for a in args if not a.startswith("--workdir")]
                      + [f"--workdir={misspelt}"], check=False)
  assert proc.returncode and f"{misspelt}: no checkpoints folder" in proc.stderr
  assert not os.path.exists(tmp_path / "runs")
  proc = run_launcher("evaluate.py", args + [f"--out={tmp_path}/no/such/eval.json"],
                      check=False)
  assert proc.returncode and "expected a file path in an existing folder" in proc.stderr


def test_search_with_an_audio_file(trained_run, short_export):
  """A real recording as the query: it is read, checked and encoded by the audio tower."""
  from xmodal_jax.data.builders import digit_sequences  # pylint: disable=g-import-not-at-top
  args, _, _ = trained_run
  wav = os.path.join(digit_sequences.ASSETS_DIR, "audio", "en", "7.wav")
  printed = run_launcher("search.py", args + [f"--export={short_export}",
                                              f"--query-audio={wav}", "--k=2"]).stdout
  assert "audio query -> video" in printed and "audio query -> text" in printed
  assert printed.count("    1. ") == 2


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
