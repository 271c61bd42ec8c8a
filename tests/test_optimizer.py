"""Schedules against their closed forms and Adafactor's first step against its formula in
NumPy; its state is a row and a column per large matrix."""

import jax
import ml_collections
import numpy as np
import pytest

from xmodal_jax import schema
from xmodal_jax.train import optimizer


def optimizer_config(**options):
  opt = schema.defaults().optimizer
  opt.update(learning_rate=1e-3, **options)
  return opt


def closed_form(kind, step, total, warmup, cooldown, end_ratio=0.1, peak=1e-3,
                timescale=100):
  """The schedules as written in train/optimizer.py's docstring, one step at a time."""
  end = peak * end_ratio
  if step < warmup:
    return peak * step / warmup
  if kind == "warmup_cosine":
    progress = min((step - warmup) / (total - warmup), 1.0)
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * progress))
  rate = peak if kind == "warmup_stable_decay" else peak / np.sqrt(
      1 + (step - warmup) / timescale)
  start = total - cooldown
  if cooldown and step >= start:
    at_start = peak if kind == "warmup_stable_decay" else peak / np.sqrt(
        1 + (start - warmup) / timescale)
    rate = end + (at_start - end) * min((total - step) / cooldown, 1.0)
  return rate


@pytest.mark.parametrize("kind", optimizer.SCHEDULES)
def test_schedules_follow_their_closed_forms(kind):
  total, warmup, cooldown = 1000, 50, 200
  opt = optimizer_config(schedule=kind, warmup_steps=warmup, cooldown_steps=cooldown,
                         rsqrt_timescale=100, end_learning_rate_ratio=0.1)
  schedule = jax.jit(optimizer.learning_rate_schedule(opt, total))
  steps = [0, 1, 25, 49, 50, 51, 300, 799, 800, 801, 900, 999, 1000]
  got = [float(schedule(s)) for s in steps]
  expected = [closed_form(kind, s, total, warmup, cooldown) for s in steps]
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-9)
  if kind != "warmup_cosine":  # continuous where the cooldown starts, and ends at the end value
    assert abs(float(schedule(800)) - float(schedule(799))) < 2e-5
    assert float(schedule(total)) == pytest.approx(1e-4)


def test_cooldown_must_fit_the_run():
  config = ml_collections.ConfigDict(dict(
      optimizer=optimizer_config(schedule="warmup_stable_decay", warmup_steps=60,
                                 cooldown_steps=50), total_steps=100,
      train_policy={}))
  with pytest.raises(ValueError, match=r"config.optimizer.cooldown_steps=50: expected >= 0, "
                     r"with warmup_steps \+ cooldown_steps <= total_steps=100"):
    optimizer.validate(config)


def test_adafactor_first_step_and_factored_state():
  """Step 1 of Adafactor without momentum, on a 256 x 512 matrix and a vector, against NumPy:
  v_row = mean_j(g^2 + eps), v_col = mean_i(g^2 + eps), v = v_row v_col / mean(v_row),
  update = -lr g / sqrt(v) (the vector: -lr g / sqrt(g^2 + eps)); the matrix's second moment
  is 256 + 512 numbers."""
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(256, 512)).astype(np.float32),
            "b": rng.normal(size=(512,)).astype(np.float32)}
  grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  opt = optimizer_config(name="adafactor", b1=0.0, grad_clip_norm=1e9,
                         schedule="warmup_stable_decay")
  tx = optimizer.make_optimizer(opt, 10, {})
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  eps = 1e-30
  g2 = grads["w"].astype(np.float64) ** 2 + eps
  row, col = g2.mean(1), g2.mean(0)
  v = np.outer(row, col) / row.mean()
  np.testing.assert_allclose(updates["w"], -1e-3 * grads["w"] / np.sqrt(v), rtol=1e-4)
  np.testing.assert_allclose(updates["b"], -1e-3 * grads["b"] / np.sqrt(
      grads["b"].astype(np.float64) ** 2 + eps), rtol=1e-4)
  sizes = sorted(int(np.size(x)) for x in jax.tree.leaves(state) if np.size(x) > 1)
  assert sizes == [256, 512, 512]  # w's row and column, b's full second moment
  adam = optimizer.make_optimizer(optimizer_config(), 10, {}).init(params)
  assert sum(np.size(x) for x in jax.tree.leaves(adam)) > 2 * 256 * 512  # m and v in full


def factored_second_moment_size(shape):
  """Adafactor's second-moment numbers for a tensor of `shape` (Shazeer & Stern, 2018): a
  row and a column over its two largest sides when both are 32 or more, else a full copy;
  optax adds a one-number placeholder for each part a tensor does not use."""
  size = int(np.prod(shape))
  a, b = sorted(shape)[-2:] if len(shape) > 1 else (0, 0)
  return size // a + size // b + 1 if min(a, b) >= 32 else size + 2


def test_adafactor_state_of_a_vit_l_run_from_shapes():
  """configs/image_text.py:L's optimizer state, from shapes alone: AdamW 8 bytes per
  parameter; Adafactor's second moment exactly the factored sizes of each tensor; its
  momentum adds 2 bytes per parameter in bfloat16 (the default) and 4 in float32."""
  from configs import image_text  # pylint: disable=g-import-not-at-top
  from xmodal_jax import experiment  # pylint: disable=g-import-not-at-top
  per_param = {}
  for name, b1, dtype in (("adamw", 0.9, "bfloat16"), ("adafactor", 0.0, "bfloat16"),
                          ("adafactor", 0.9, "bfloat16"), ("adafactor", 0.9, "float32")):
    config = image_text.get_config("L")
    config.update_from_flattened_dict({
        "optimizer.name": name, "optimizer.b1": b1, "optimizer.momentum_dtype": dtype,
        "mesh.fsdp": 1, "batch_size": 8, "eval_batch_size": 8,
        "modalities.text.tokenizer": "digit_words"})
    state = experiment.assemble(config, jax.devices()[:1], read_data=False).abstract_state
    shapes = [x.shape for x in jax.tree.leaves(state.params)]
    params = sum(int(np.prod(s)) for s in shapes)
    per_param[name, b1, dtype] = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                     for x in jax.tree.leaves(state.opt_state)) / params
  assert per_param["adamw", 0.9, "bfloat16"] == pytest.approx(8.0, abs=1e-6)
  expected = 4 * sum(factored_second_moment_size(s) for s in shapes) / params
  assert per_param["adafactor", 0.0, "bfloat16"] == pytest.approx(expected, abs=1e-6)
  assert expected < 0.01 * 8.0  # under 1% of AdamW's: every matrix is factored
  momentum = {dtype: per_param["adafactor", 0.9, dtype] - per_param["adafactor", 0.0, "bfloat16"]
              for dtype in ("bfloat16", "float32")}
  assert momentum == {"bfloat16": pytest.approx(2.0, abs=1e-6),
                      "float32": pytest.approx(4.0, abs=1e-6)}


