"""Host memory allocator settings for XLA on CPU (Linux, glibc).

XLA's CPU runtime allocates one block for each execution's temporaries (118 MiB for the width-128
train step of `bench/bench_train_step.py`) and frees it when the execution ends. glibc serves a block
above its mmap threshold (at most 32 MiB) by a fresh `mmap` and unmaps it on free, so every execution
page-faults its whole temporary block in again: 30,000 page faults and about 50 ms of kernel time per
100 ms train step on two cores (bench/RESULTS.md).

`reuse_freed_host_memory` sets glibc's malloc to serve every block from the heap, never by `mmap`
(M_MMAP_MAX=0), and never to return the free memory at the heap's top to the kernel (M_TRIM_THRESHOLD
= -1; or, with `keep_bytes`, to trim it once it exceeds `keep_bytes`): the next execution reuses pages
that are already mapped. XLA executes on its own threads, and a thread's own arena falls back to
`mmap` for blocks larger than its 64 MiB heaps whatever M_MMAP_MAX says, so all threads share the main
arena (M_ARENA_MAX=1); that must happen before JAX starts its threads, so the entry points
(`regft_jax.main`, which `python -m regft_jax.eval` runs, and bench/) call it first.

What it costs: the process keeps its heap's high-water mark (freed host memory is reused, not returned
to the kernel). With a finite `keep_bytes`, a step whose temporaries exceed it is trimmed at every free
and page-faults again: with the former 1 GiB default, a width-1024 bf16 train step with scanned layers
faulted 1.4 GB (347,000 pages, 650 ms of kernel time) per 1.6 s step, 1.2 s without trimming
(bench/RESULTS.md). It applies only where JAX runs on the CPU alone (JAX_PLATFORMS=cpu, or no accelerator
plugin or library configured): on GPU/TPU hosts the host allocator is not on the step's path.
REGFT_HOST_MALLOC=0 turns it off. Under an LD_PRELOAD-ed allocator (jemalloc, tcmalloc) glibc's settings
have no effect.
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
_NEVER = -1  # M_TRIM_THRESHOLD of -1: never trim (mallopt(3))
# environment variables that point JAX at an accelerator's PJRT plugin or library
_ACCELERATOR_ENV = ("TPU_LIBRARY_PATH", "PJRT_NAMES_AND_LIBRARY_PATHS")


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc on Linux (it has `gnu_get_libc_version`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (not musl)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def jax_runs_on_cpu_only(platforms: str | None = None) -> bool:
    """Whether JAX will run on the CPU alone: `platforms` (default: JAX's jax_platforms if JAX is imported,
    else $JAX_PLATFORMS) names only "cpu", or, unset, no accelerator is installed or configured (a
    `jax_plugins` package or entry point, libtpu, or one of $TPU_LIBRARY_PATH /
    $PJRT_NAMES_AND_LIBRARY_PATHS). Imports nothing of JAX."""
    if platforms is None:
        jax = sys.modules.get("jax")
        platforms = jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS")
    names = {p.strip().lower() for p in (platforms or "").split(",")} - {""}
    if names:
        return names == {"cpu"}
    if any(os.environ.get(name) for name in _ACCELERATOR_ENV):
        return False
    if importlib.util.find_spec("libtpu") is not None or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    try:
        import jax_plugins
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def _backends_exist() -> bool:
    if "jax" not in sys.modules:  # no JAX, no backend
        return False
    from jax._src import xla_bridge

    initialized = getattr(xla_bridge, "backends_are_initialized", None)
    return initialized is None or initialized()  # (unknown in another JAX version: assume they exist)


def reuse_freed_host_memory(keep_bytes: int | None = None) -> bool:
    """Sets glibc's malloc to one arena, no `mmap` blocks and no trimming of the heap's top (or a trim
    threshold of `keep_bytes`; see the module docstring). Returns whether it did; it does nothing (and
    returns False) when REGFT_HOST_MALLOC=0, off glibc Linux, when JAX may run on an accelerator, or when
    JAX's backends already exist (their threads would keep their own arenas; a warning says so)."""
    if keep_bytes is not None and not 0 <= keep_bytes < 2 ** 31:  # mallopt takes a C int
        raise ValueError(f"keep_bytes={keep_bytes}: expected 0 <= keep_bytes < 2**31")
    if os.environ.get(ENV, "1") == "0":
        return False
    libc = glibc()
    if libc is None or not jax_runs_on_cpu_only():
        return False
    if _backends_exist():
        warnings.warn("JAX's backends already exist: host malloc settings not changed (call "
                      "regft_jax.hostmem.reuse_freed_host_memory() before the first JAX computation)", stacklevel=2)
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER if keep_bytes is None else keep_bytes)))
