"""Shared fixtures. Tests never reach a network: hubs are offline, datasets are built here."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test programs are tiny and run a few steps, so compiling them dominates the suite: XLA's CPU
# backend compiles them without LLVM's costlier optimizations (the same numbers; the alignment
# recipe's 4-step fixture 52 -> 44 s). A run of many steps is faster without (trained_run).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port():
  """A TCP port on localhost that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(devices, fast_compile=True):
  """XLA_FLAGS for a test process that simulates `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices}" + (
      f" {FAST_COMPILE}" if fast_compile else "")


# Tests in this process see 8 CPU devices (set before anything imports jax).
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# JAX on the CPU only, also where libtpu is installed (the TPU compile tests describe TPU
# topologies without one), and libtpu loadable by several processes at once: the suite runs
# in two pytest-xdist workers.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache for this process and every launcher it starts: the suite
# compiles the same tiny configs many times. Under the (ignored) .cache/ of the checkout, so a
# fresh clone starts cold and a developer's second run starts warm.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

CONFIG = os.path.join(REPO, "configs", "audio_video_text.py")


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id):
  """A folder every pytest-xdist worker of this session shares (without xdist: this
  session's own)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if worker_id != "master" else base


def built_once(folder, build):
  """build(folder) run by the first worker to ask, the others waiting for it; returns what
  it returned (JSON), also to the others."""
  import filelock  # pylint: disable=g-import-not-at-top
  done = folder / "built.json"
  with filelock.FileLock(f"{folder}.lock"):
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      done.write_text(json.dumps(build(str(folder))))
  return json.loads(done.read_text())


@pytest.fixture(scope="session")
def digit_data_dir(shared_tmp):
  """A data_dir holding the embedded digit_sequences dataset, built once per session."""
  from xmodal_jax.data.builders import digit_sequences

  def build(data_dir):
    digit_sequences.DigitSequences(data_dir=data_dir).download_and_prepare()
    return data_dir
  return built_once(shared_tmp / "digits", build)


def run_launcher(name, args, *, devices=1, fast_compile=True, timeout=600, check=True,
                 prefix=()):
  """Runs launch/{name} in a fresh process with `devices` simulated CPU devices (`prefix`:
  a command that runs it, e.g. prlimit to limit its resources)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices, fast_compile), JAX_PLATFORMS="cpu")
  proc = subprocess.run([*prefix, sys.executable, os.path.join(REPO, "launch", name), *args],
                        env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f"{name} {args} failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr[-5000:]}")
  return proc


def start_launchers(name, args, processes):
  """launch/{name} as 1 process x 8 CPU devices, or as `processes` x 8/processes joined
  by jax.distributed on localhost; returns the Popen objects."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(8 // processes), JAX_PLATFORMS="cpu")
  port = free_port()
  flags = [[]] if processes == 1 else [
      [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
       f"--process_id={rank}"] for rank in range(processes)]
  return [subprocess.Popen([sys.executable, os.path.join(REPO, "launch", name), *args, *f],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for f in flags]


def run_train(args, **kwargs):
  return run_launcher("train.py", args, **kwargs)


@pytest.fixture(scope="session")
def trained_run(digit_data_dir, shared_tmp):
  """The default config with cls pooling, cut to 150 steps on 1 device through
  launch/train.py (95 s on a 2-core AMD EPYC): enough to retrieve (text->video R@1 about 41%,
  R@5 about 84%), so search results mean something. Trained once
  for all workers; the tests that read it run on 2 devices.
  Returns (the run's launcher args, config and workdir, workdir, train.py's stdout); shared
  by the launcher tests, which only read it (or resume it when it is finished)."""
  def build(workdir):
    # cls pooling: GPO (the default's) adds 40 s to this run; the launchers do not care.
    args = [f"--config={CONFIG}", f"--config.data.data_dir={digit_data_dir}",
            *[f"--config.model.towers.{m}.pooling=cls" for m in ("audio", "video", "text")],
            f"--workdir={workdir}", "--config.total_steps=150",
            "--config.evals.retrieval.every=150", "--config.checkpoint_every=150",
            "--config.log_every=50", "--config.optimizer.warmup_steps=15"]
    return [args, workdir, run_train(args, devices=1, fast_compile=False).stdout]
  return tuple(built_once(shared_tmp / "trained_run", build))


@pytest.fixture(scope="session")
def short_export(trained_run, shared_tmp):
  """launch/export.py of the trained run's test split (1,000 rows, 2 shards) with a flat
  FAISS index; built once for all workers. Tests copy it before changing it."""
  args, _, _ = trained_run

  def build(out):
    run_launcher("export.py", args + [f"--out={out}", "--shard_rows=500", "--index=flat"],
                 devices=2)  # eval batches of 512: 2 shards
    return out
  return built_once(shared_tmp / "export", build)


# The suite runs as `-n 2 --dist loadfile`: each file goes whole to the next free worker, in
# collection order (xdist's own reordering, by number of tests per file, is turned off).
# Handing out the longest files first keeps one worker from starting a long file when the
# other is nearly done. Seconds per file, measured on a 2-core AMD EPYC in the whole suite
# and in `-m "not slow"` (they only order the files); files not listed take about 1 s.
# test_launch_eval.py, which builds the trained run, comes before the files that read it
# (test_export.py, test_serve.py), so that no worker waits for it.
FILE_SECONDS = {  # file: (whole suite, not slow)
    "test_launch_eval.py": (145, 0), "test_benchmark_adapters.py": (99, 7),
    "test_alignment.py": (93, 6), "test_train.py": (91, 16),
    "test_multiprocess.py": (82, 0), "test_records.py": (81, 31),
    "test_remote_storage.py": (76, 0), "test_pretrained.py": (76, 28),
    "test_export.py": (60, 0), "test_mixture.py": (52, 25), "test_towers.py": (47, 37),
    "test_freezing.py": (42, 3), "test_checkpoints.py": (33, 0),
    "test_compile.py": (33, 1), "test_serve.py": (33, 0),
    "test_losses_sharded.py": (27, 26), "test_nonfinite.py": (23, 6),
    "test_data.py": (23, 7), "test_token_drop.py": (22, 5), "test_grad_cache.py": (16, 0),
    "test_fp8.py": (9, 1), "test_optimizer.py": (8, 6), "test_tables.py": (8, 5),
    "test_input_bounds.py": (6, 6),
}


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's, on by default
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  column = 1 if config.getoption("markexpr") == "not slow" else 0
  seconds = lambda item: FILE_SECONDS.get(os.path.basename(str(item.fspath)), (1, 1))[column]
  items.sort(key=lambda item: -seconds(item))  # stable: a file's tests keep their order
