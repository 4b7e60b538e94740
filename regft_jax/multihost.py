"""Processes: `jax.distributed` start-up, host <-> global array transfers, and host work split
over processes. Single-process runs take the same code paths (each helper is then a plain copy).

    initialize(config)                       # --config.distributed / coordinator / num_processes / process_id
    x = to_global(host_array, sharding)      # the same host array on every process -> one global jax.Array
    y = to_host(out)                         # a global jax.Array (or pytree) -> numpy, whole, on every process
    scores = split_over_processes(oracle.score, texts)   # each process scores its share; all get all

Rules every multi-process path here follows: every array that enters a sharded jit is a global
`jax.Array` (numpy inputs with non-trivial shardings are refused by jax with >1 process); every
collective (`to_host` of a non-addressable array, `gather_shares`) is called on the main thread in
the same order on every process; only `is_primary()` writes logs, reports and caches.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from regft_jax.errors import UserInputError


def initialize(config) -> None:
    """`jax.distributed.initialize` from the config: `distributed=True` auto-detects the cluster (TPU pod,
    SLURM, ...); `coordinator="HOST:PORT"` with `num_processes` and `process_id` sets it explicitly."""
    coordinator = config.get("coordinator", "")
    if coordinator:
        n, i = int(config.get("num_processes", 0)), int(config.get("process_id", -1))
        if n < 1 or not 0 <= i < n:
            raise UserInputError(f"config.coordinator={coordinator!r} needs config.num_processes >= 1 and "
                                 f"0 <= config.process_id < num_processes (got {n}, {i})")
        if ":" not in coordinator:
            raise UserInputError(f"config.coordinator={coordinator!r}: expected HOST:PORT")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)
    elif config.get("distributed", False):
        jax.distributed.initialize()


def is_primary() -> bool:
    return jax.process_index() == 0


def to_global(x: Any, sharding) -> jax.Array:
    """A global jax.Array on `sharding` from a host array that every process holds whole (e.g. prompts
    chosen from the same seed): each process places the slices of its own devices."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def tree_to_global(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(to_global, tree, shardings)


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of (global) arrays, whole on every process. A collective when an array
    spans other processes' devices."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def share(n: int, process: int | None = None, count: int | None = None) -> tuple[int, int]:
    """This process's contiguous share [lo, hi) of n items (equal shares of ceil(n / count), the last
    ones shorter or empty)."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    size = math.ceil(n / count)
    return min(process * size, n), min((process + 1) * size, n)


def gather_shares(local: np.ndarray, n: int) -> np.ndarray:
    """The n results of every process's `share` (`local`: this process's, leading axis = its share),
    concatenated in process order, on every process. A collective (main thread only)."""
    local = np.asarray(local)
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    size = math.ceil(n / count)
    padded = np.zeros((size,) + local.shape[1:], local.dtype)
    padded[:local.shape[0]] = local
    return np.asarray(multihost_utils.process_allgather(padded, tiled=True))[:n]


def gather_computed_share(compute: Callable[[], np.ndarray], n: int) -> np.ndarray:
    """`gather_shares` of this process's share as `compute()` returns it. An exception in any process's
    `compute` is raised on every process (re-raised where it happened, a RuntimeError naming that
    process elsewhere) instead of leaving the others waiting in the gather."""
    if jax.process_count() == 1:
        return np.asarray(compute())
    try:
        local, error = np.asarray(compute()), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after every process knows
        local, error = None, e
    failed = gather_shares(np.array([error is not None]), jax.process_count())
    if error is not None:
        raise error
    if failed.any():
        raise RuntimeError(f"process {int(np.argmax(failed))} failed computing its share (see its log); "
                           "stopping every process")
    return gather_shares(local, n)


def split_over_processes(fn: Callable[[Sequence], np.ndarray], items: Sequence, dtype=np.float32) -> np.ndarray:
    """fn(items) computed as fn of each process's share, gathered: every process gets the whole
    result having done 1/process_count of the (host) work. fn returns one value per item."""
    lo, hi = share(len(items))
    return gather_computed_share(lambda: np.asarray(fn(items[lo:hi]) if hi > lo else [], dtype), len(items))


def all_agree(flag: bool) -> bool:
    """Whether `flag` is true on every process (a collective with more than one process)."""
    return bool(gather_shares(np.array([flag], bool), jax.process_count()).all())
