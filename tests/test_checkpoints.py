"""Checkpoints you can trust: each is sealed with a digest of its files; a damaged or
unreadable newest one is reported in a line and the newest good one restored (or the run
stops, by config), and exports tell checkpoints apart by that digest."""

import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs import audio_video_text
from conftest import CONFIG, run_train
from xmodal_jax import experiment as experiment_lib
from xmodal_jax.train import checkpoint

pytestmark = pytest.mark.slow  # trains the tiny config for 4 steps (about 20 s)


@pytest.fixture(scope="module")
def sealed_run(digit_data_dir, tmp_path_factory):
  """(config, workdir) of the tiny config trained 4 steps, checkpoints at 2 and 4."""
  config = audio_video_text.get_config("tiny")
  config.data.data_dir = digit_data_dir
  config.total_steps, config.checkpoint_every, config.log_every = 4, 2, 2
  config.evals = {}
  workdir = str(tmp_path_factory.mktemp("sealed"))
  experiment_lib.train(config, workdir)
  return config, workdir


def copy_of(run, tmp_path):
  config, workdir = run
  shutil.copytree(workdir, tmp_path / "run")
  return config.copy_and_resolve_references(), str(tmp_path / "run")


def array_files(workdir, step):
  """The checkpoint's largest files (TensorStore's array chunks)."""
  folder = checkpoint.step_folder(workdir, step)
  names = [n for n in checkpoint.file_digests(folder) if "/d/" in n or "ocdbt" in n]
  return sorted(names, key=lambda n: -os.path.getsize(os.path.join(folder, n)))


def params_of(experiment):
  return jax.tree.map(np.asarray, experiment.state.params)


def test_every_checkpoint_is_sealed_with_its_files_digest(sealed_run):
  import hashlib  # pylint: disable=g-import-not-at-top
  _, workdir = sealed_run
  for step in (2, 4):
    folder = checkpoint.step_folder(workdir, step)
    digests = checkpoint.file_digests(folder)
    assert digests and checkpoint.damage(folder) == ""
    for name, digest in digests.items():  # the digest is of the bytes on disk
      with open(os.path.join(folder, name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
  assert "files sha256 " in checkpoint.identity(workdir, 4)


def test_flipped_bytes_in_the_newest_fall_back_to_the_older_one(sealed_run, tmp_path,
                                                                capfd):
  config, workdir = copy_of(sealed_run, tmp_path)
  good = params_of(experiment_lib.setup(config, workdir, step=2))
  path = os.path.join(checkpoint.step_folder(workdir, 4), array_files(workdir, 4)[0])
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(16))
  restored = experiment_lib.setup(config, workdir)
  assert restored.step == 2
  jax.tree.map(np.testing.assert_array_equal, params_of(restored), good)
  printed = capfd.readouterr().err
  assert printed.count("\n") == 1 and printed.startswith(
      "Not using checkpoint 4: its files do not match its digest (1 file(s) changed (")
  assert printed.rstrip().endswith("; trying an older one.")
  config.checkpoint_fallback = False
  with pytest.raises(ValueError, match=r"checkpoint 4: its files do not match its digest.*"
                     r"checkpoint_fallback=False: stopping"):
    experiment_lib.setup(config, workdir)


def test_an_unreadable_unsealed_newest_falls_back_in_one_line(sealed_run, tmp_path, capfd):
  """Without its digest (saved before digests, or killed before sealing) and without its
  array metadata, the newest does not restore: one line, then the older one."""
  config, workdir = copy_of(sealed_run, tmp_path)
  folder = checkpoint.step_folder(workdir, 4)
  os.remove(os.path.join(folder, checkpoint.DIGEST_FILE))
  for name in checkpoint.file_digests(folder):
    if os.path.basename(name) in ("_METADATA", "manifest.ocdbt"):
      os.remove(os.path.join(folder, name))
  restored = experiment_lib.setup(config, workdir)
  assert restored.step == 2
  lines = capfd.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "Not using checkpoint 4: it does not restore (")
  assert "Traceback" not in lines[0]
  shutil.rmtree(checkpoint.step_folder(workdir, 2))
  with pytest.raises(ValueError, match="no usable checkpoint: checkpoint 4: it does not restore"):
    experiment_lib.setup(config, workdir)


def test_a_save_that_fails_stops_the_run_at_the_step_that_finds_it(sealed_run, tmp_path):
  """A full disk, made real: the training process may not write a file past 16 KB (the
  kernel's RLIMIT_FSIZE, through util-linux's prlimit; writes fail with EFBIG as they would
  with ENOSPC), so the arrays of the first checkpoint (Orbax's, at step 1) cannot be written
  while config.json and metrics.jsonl can. The run stops at the step that finds the failure,
  well before its next save (the last step, 40), with one last line naming that step."""
  config, _ = sealed_run  # trained first: the dataset's random-access copy is written
  workdir = tmp_path / "run"
  proc = run_train([f"--config={CONFIG}:tiny", f"--config.data.data_dir={config.data.data_dir}",
                    f"--workdir={workdir}", "--config.total_steps=40",
                    "--config.checkpoint_every=100", "--config.log_every=10",
                    "--config.evals={}"], check=False, prefix=["prlimit", "--fsize=16384"])
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  found = re.fullmatch(r"error: step (\d+): saving a checkpoint failed: .*File too large.*",
                       last)
  assert found, proc.stderr[-3000:]
  assert int(found.group(1)) < 40
  logged = [int(s) for s in re.findall(r"^step (\d+)/40", proc.stdout, re.M)]
  assert all(s <= int(found.group(1)) for s in logged), proc.stdout
  assert checkpoint.make_manager(str(workdir), config, create=False).all_steps() == []
