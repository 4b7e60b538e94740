"""Host memory allocator settings for XLA on CPU (Linux, glibc).

XLA's CPU runtime allocates one block for each execution's temporaries (118 MiB for the width-128
train step of `bench/bench_train_step.py`) and frees it when the execution ends. The program runs on
one of XLA's threads, not on Python's, and glibc serves each thread from its own arena, whose heaps
hold at most 64 MiB: a larger block is mapped afresh by `mmap` and unmapped on free. So every
execution page-faults its whole temporary block in again: 30,000 page faults and about 50 ms of kernel
time per 100 ms train step on two cores (bench/RESULTS.md).

`reuse_freed_host_memory` makes every thread allocate from glibc's main heap, never by `mmap`, and
keeps up to `keep_bytes` of freed memory at the top of that heap instead of returning it to the
kernel: the next execution reuses pages that are already mapped. It must run before JAX creates its
backend (its threads): the entry points (`regft_jax.main`, `python -m regft_jax.eval`, bench/, the tests)
call it first. It applies only where JAX runs on CPU alone (JAX_PLATFORMS=cpu, or no accelerator
plugin installed): on GPU/TPU hosts the host allocator is not on the step's path. REGFT_HOST_MALLOC=0
turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import warnings

ENV = "REGFT_HOST_MALLOC"

# mallopt(3) parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def jax_runs_on_cpu_only(platforms: str | None = None) -> bool:
    """Whether JAX will run on the CPU alone: `platforms` (default: JAX's jax_platforms, JAX_PLATFORMS)
    names only "cpu", or, unset, no accelerator (a `jax_plugins` package or entry point, or libtpu) is
    installed. Does not initialize JAX's backends."""
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def reuse_freed_host_memory(keep_bytes: int = 1 << 30) -> bool:
    """Sets glibc's malloc to one arena, no `mmap` blocks and a trim threshold of `keep_bytes` (see the
    module docstring). Returns whether it did; it does nothing (and returns False) when REGFT_HOST_MALLOC=0,
    off glibc Linux, when JAX may run on an accelerator, or when JAX's backends already exist (their
    threads would keep their own arenas; a warning says so)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    libc = _glibc()
    if libc is None or not jax_runs_on_cpu_only():
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn("JAX's backends already exist: host malloc settings not changed (call "
                      "regft_jax.hostmem.reuse_freed_host_memory() before the first JAX computation)", stacklevel=2)
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, int(keep_bytes))))
