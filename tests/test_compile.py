"""Ahead-of-time compilation for TPU topologies on this CPU host (libtpu, no TPU): the train
step compiles for a v5e slice, its per-chip figures are consistent with the state's shapes,
and a step that does not fit stops launch/compile.py with XLA's reason."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CONFIG, REPO

pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPUs")
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import audio_video_text
from xmodal_jax import experiment
from xmodal_jax.train import aot


@pytest.mark.slow
def test_tiny_step_compiles_for_a_v5e_slice_with_a_quarter_of_the_state_per_chip():
  devices = aot.topology_devices("v5e:2x2")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  config = audio_video_text.get_config("tiny")
  config.mesh = dict(data=1, fsdp=4)
  compiled, report = experiment.compile_train_step(config, devices)
  # attention_impl="auto" chose the Pallas flash-attention kernel (Mosaic custom calls) in
  # each of the 3 towers: forward, and the backward's dq and dkv kernels.
  kernels = re.findall(r"%([\w.]+) = [^\n]*custom_call_target=\"tpu_custom_call\"",
                       compiled.as_text())
  for kind in ("flash_attention", "flash_mha_bwd_dq", "flash_mha_bwd_dkv"):
    assert len([k for k in kernels if k.startswith(kind)]) >= 3, (kind, kernels)
  assert report.device_kind == "TPU v5 lite" and report.hbm_bytes == 16 << 30
  assert report.mesh == {"data": 1, "fsdp": 4}
  # The whole state's bytes, from its shapes alone: each chip holds about a quarter.
  state = experiment.assemble(config, devices, read_data=False).abstract_state
  total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
              for x in jax.tree.leaves(state))
  assert 0.24 * total <= report.state_bytes <= 0.26 * total, (report.state_bytes, total)
  assert report.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert report.argument_bytes >= report.state_bytes and report.temp_bytes > 0
  assert report.flops > 0 and report.fits()
  # AdamW's mu and nu: 8 bytes per parameter (and two step counters), printed.
  assert 8 * report.params <= report.optimizer_bytes <= 8 * report.params + 64
  assert "(optimizer: 8.00 bytes per parameter)" in aot.format_report(report)


def compile_cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "compile.py"),
                         f"--config={CONFIG}:tiny", *args], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_compile_launcher_names_what_does_not_fit():
  proc = compile_cli("--topology=v5e:2x2", "--config.batch_size=4194304",
                     "--config.eval_batch_size=4")
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "error:" in proc.stderr and "4 x TPU v5 lite" in proc.stderr + proc.stdout
  assert "HBM" in proc.stderr or "RESOURCE_EXHAUSTED" in proc.stderr or "memory" in \
      proc.stderr.lower(), proc.stderr[-2000:]
  with pytest.raises(ValueError, match=r"--topology='v9z:1x1': cannot describe it"):
    aot.topology_devices("v9z:1x1")


def test_compiling_needs_no_tokenizer_when_the_tower_states_its_vocabulary():
  """configs/image_text.py:L as its docstring compiles it: no tokenizer is set, and shapes
  need only the text tower's vocab_size; training still asks for one."""
  from configs import image_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import schema  # pylint: disable=g-import-not-at-top
  config = image_text.get_config("L")
  config.update_from_flattened_dict({"mesh.fsdp": 1, "batch_size": 8, "eval_batch_size": 8})
  assembly = experiment.assemble(config, jax.devices()[:1], read_data=False)
  embedding = assembly.abstract_state.params["towers_text"]["token_embedding"]["embedding"]
  assert embedding.shape[0] == 49408
  with pytest.raises(ValueError, match="config.modalities.text.tokenizer is unset"):
    schema.resolve(config, 1)
