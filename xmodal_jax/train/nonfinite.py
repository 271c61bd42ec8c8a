"""Non-finite steps: train_step applies no update when its loss, gradients or updated params
are not all finite and flags the step; the loop's Guard counts those steps and stops training
as config.nonfinite says, naming the step and the newest (finite) checkpoint."""

POLICIES = ("skip", "stop")


def validate(nonfinite):
  """Raises on a config.nonfinite the Guard cannot follow, naming the field."""
  if nonfinite.policy not in POLICIES:
    raise ValueError(f"config.nonfinite.policy={nonfinite.policy!r}: expected one of "
                     f"{POLICIES}")
  if nonfinite.max_in_a_row < 1:
    raise ValueError(f"config.nonfinite.max_in_a_row={nonfinite.max_in_a_row}: "
                     "expected at least 1")


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite steps (config.nonfinite); the checkpoints are finite."""


class Guard:
  """Counts the steps whose update was not applied (train_step's metrics["nonfinite"]) and
  stops training as config.nonfinite says. Each step's flag is read once the next step is
  dispatched, so the host never waits on the device for it."""

  def __init__(self, nonfinite, manager):
    self.policy, self.limit = nonfinite.policy, nonfinite.max_in_a_row
    self.manager = manager
    self.in_a_row = self.total = 0
    self.pending = None

  def after(self, step, flag):
    """Takes step `step`'s flag (a device scalar) and checks the previous step's."""
    previous, self.pending = self.pending, (step, flag)
    if previous is not None:
      self.check(*previous)

  def finish(self):
    if self.pending is not None:
      self.check(*self.pending)
      self.pending = None

  def check(self, step, flag):
    if not int(flag):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    print(f"step {step}: the loss, gradients or update were not finite; the update was not "
          f"applied ({self.in_a_row} in a row)", flush=True)
    if self.policy == "stop" or self.in_a_row >= self.limit:
      self.manager.wait_until_finished()
      newest = self.manager.latest_step()
      where = (f"the newest checkpoint, step {newest}, holds finite params" if newest
               else "no checkpoint was written yet")
      raise NonFiniteError(
          f"training stopped at step {step}: {self.in_a_row} non-finite step(s) in a row "
          f"(config.nonfinite: policy={self.policy!r}, max_in_a_row={self.limit}); {where}. "
          "Lower the learning rate (or check the data) and re-run to resume from it.")
