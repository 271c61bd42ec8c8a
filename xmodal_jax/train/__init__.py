"""Train state, optimizer, step, loop, checkpoints and metric writers."""
