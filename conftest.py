"""Root conftest: doctests in gsparse_jax/ see the same 8 CPU devices.

It also compiles with XLA's CPU backend at optimization level 0 (before JAX
creates its backend; inherited by the scripts the tests start): the suite's
programs are tiny and run a few steps, so LLVM's optimizations cost far more
time than they save, and they change no result a test checks.
"""

import os

import jax

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

jax.config.update("jax_num_cpu_devices", 8)
