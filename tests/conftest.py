"""Test setup: 8 fake CPU devices and the host malloc settings, set before JAX initializes its backends."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from regft_jax.hostmem import reuse_freed_host_memory  # noqa: E402

reuse_freed_host_memory()  # XLA's temporaries reused between calls, not page-faulted anew (regft_jax/hostmem.py)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
