"""Root conftest: doctests in gsparse_jax/ see the same 8 CPU devices."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
