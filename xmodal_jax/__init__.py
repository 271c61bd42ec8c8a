"""xmodal_jax: one embedding space shared by any number of modalities."""

import os

__version__ = "0.1.0"


def _order_cpu_collectives():
  """Turns off XLA:CPU's concurrency-optimized scheduler unless XLA_FLAGS sets it. With it,
  simulated CPU devices can start two independent collectives in different orders and wait
  on each other for ever (seen with gradient caching under FSDP: XLA aborts after 40 s).
  Only the CPU backend reads the flag; it must be set before JAX starts a backend."""
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()


_order_cpu_collectives()
