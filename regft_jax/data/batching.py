"""Deterministic, multi-host batch iterators over packed rows and prompts.

The *global* batch of a step is a pure function of (seed, step): which domain fills each
row slot (fixed per-batch quotas from the mixture proportions, slots shuffled per step)
and which packed row of that domain goes there (an endless stream of per-epoch
permutations). A process only computes this cheap index plan and gathers the rows it
supplies, so the union of all processes' local batches is exactly the global batch,
whatever the process count.

Multi-host use::

    positions = process_row_positions(sharding, global_batch_size)   # once
    local = batcher.batch(step, positions)                           # numpy, this host only
    batch = make_global_batch(local, sharding, global_batch_size)    # dict of jax.Array
"""
from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import numpy as np

from regft_jax.data.mixture import batch_quotas
from regft_jax.data.packing import PackedRows
from regft_jax.errors import UserInputError

log = logging.getLogger(__name__)

_PERMUTATION_TAG = 0x5EED
_SHUFFLE_TAG = 0xBA7C


class IndexStream:
    """An endless stream of item indices: epoch ``e`` is a seeded permutation of all items.

    ``take(start, count)`` gives stream positions ``[start, start + count)``; random access,
    so any step can be produced without replaying earlier ones.
    """

    def __init__(self, num_items: int, seed: int, stream_id: int = 0, cache_size: int = 4):
        if num_items < 1:
            raise UserInputError(f"an index stream needs at least one item, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.stream_id = stream_id
        self._cache: dict[int, np.ndarray] = {}
        self._cache_size = cache_size

    def permutation(self, epoch: int) -> np.ndarray:
        """The item order of one epoch."""
        if epoch not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            rng = np.random.default_rng([self.seed, self.stream_id, epoch, _PERMUTATION_TAG])
            self._cache[epoch] = rng.permutation(self.num_items)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """Item indices at stream positions ``start .. start + count - 1``."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_items)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.permutation(int(epoch))[offsets[where]]
        return out


def even_row_positions(global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Rows ``[p * B / P, (p + 1) * B / P)``: process ``p``'s share of an evenly split batch."""
    if not 0 <= process_index < process_count:
        raise UserInputError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
        raise UserInputError(
            f"global batch size {global_batch_size} is not divisible by {process_count} processes"
        )
    per_process = global_batch_size // process_count
    return np.arange(process_index * per_process, (process_index + 1) * per_process)


def dealt_order(batch_size: int, shards: int) -> np.ndarray:
    """Slots of a batch dealt round-robin over ``shards`` equal row blocks: position
    ``s * (batch_size / shards) + k`` (row k of block s) holds slot ``k * shards + s``.

    Dealt, a batch whose domains fill contiguous slot ranges gives each block (a data-parallel
    shard's rows) its share of every domain, still contiguous and in the same order, so per-domain
    row windows can be sliced out of every shard alike (``sharding.shard_window``).
    """
    if shards < 1 or batch_size % shards:
        raise UserInputError(f"a batch of {batch_size} rows cannot be split into {shards} equal shards")
    return np.arange(batch_size).reshape(batch_size // shards, shards).T.reshape(-1)


def process_row_positions(sharding, global_batch_size: int) -> np.ndarray:
    """Global batch rows this process must supply for ``sharding`` of the batch dimension.

    In the order ``jax.make_array_from_process_local_data`` maps local data to slices.
    """
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in ranges])


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding, global_batch_size: int
) -> dict:
    """Assembles process-local numpy arrays into global ``jax.Array`` s.

    Args:
      local_batch: name -> array whose leading dim holds this process's rows, as given by
        :func:`process_row_positions` (or :func:`even_row_positions` for a plain split).
      sharding: a ``jax.sharding.Sharding`` (batch dim sharded), or name -> Sharding.
      global_batch_size: the leading dimension of the global arrays.
    """
    import jax  # Local import: the rest of the data package works without a backend.

    out = {}
    for name, local in local_batch.items():
        item_sharding = sharding[name] if isinstance(sharding, Mapping) else sharding
        global_shape = (global_batch_size,) + tuple(local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(item_sharding, local, global_shape)
    return out


class MixtureBatcher:
    """Global batches of packed rows mixed over domains in fixed per-batch proportions.

    Args:
      rows: domain name -> its packed rows (all with the same ``seq_len``).
      proportions: domain name -> mixing weight (normalized; turned into per-batch row
        quotas by largest-remainder rounding, see :func:`batch_quotas`).
      global_batch_size: rows per global batch.
      seed: data seed.
      domain_ids: domain name -> integer id put in the ``domain`` array; default: the order
        of ``proportions``. Share it with the loss so per-domain weights line up.
      shuffle_slots: shuffle which slot each domain's rows occupy per step; with False, every
        global batch holds the domains in contiguous row ranges (in ``domain_ids`` order, sizes =
        ``quotas``), which lets a step run per-domain computations on static row slices.
      shards: with ``shuffle_slots=False``, deal those contiguous slots over this many equal row
        blocks (the data-parallel shards, see :func:`dealt_order`); 1: plain contiguous ranges.
    """

    def __init__(
        self,
        rows: Mapping[str, PackedRows],
        proportions: Mapping[str, float],
        global_batch_size: int,
        seed: int,
        domain_ids: Mapping[str, int] | None = None,
        shuffle_slots: bool = True,
        shards: int = 1,
    ):
        missing = [d for d, p in proportions.items() if p > 0 and d not in rows]
        if missing:
            raise UserInputError(f"no packed rows for domains {missing} (have {sorted(rows)})")
        seq_lens = {rows[d].seq_len for d in proportions if d in rows}
        if len(seq_lens) > 1:
            raise UserInputError(f"domains have different seq_len: {sorted(seq_lens)}")
        self.rows = dict(rows)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle_slots = shuffle_slots
        self._dealt = None if shuffle_slots or shards == 1 else dealt_order(global_batch_size, shards)
        self.domain_ids = dict(domain_ids or {d: i for i, d in enumerate(proportions)})
        absent = set(proportions) - set(self.domain_ids)
        if absent:
            raise UserInputError(f"domain_ids lacks domains {sorted(absent)}")
        quotas = batch_quotas(proportions, global_batch_size)
        by_id = sorted((d for d, q in quotas.items() if q > 0), key=lambda d: self.domain_ids[d])
        self.quotas = {d: quotas[d] for d in by_id}
        for domain in self.quotas:
            if self.rows[domain].num_rows == 0:
                raise UserInputError(f"domain {domain!r} has a positive proportion but no rows")
        self._streams = {
            d: IndexStream(self.rows[d].num_rows, seed, self.domain_ids[d]) for d in self.quotas
        }
        log.info(
            "Mixture batches of %d rows: %s (rows available: %s)", global_batch_size,
            self.quotas, {d: self.rows[d].num_rows for d in self.quotas},
        )

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain name index into ``domains``, row index) of every slot of the global batch."""
        domains = list(self.quotas)
        slot_domain, slot_row = [], []
        for position, domain in enumerate(domains):
            quota = self.quotas[domain]
            slot_domain.append(np.full(quota, position, np.int64))
            slot_row.append(self._streams[domain].take(step * quota, quota))
        slot_domain, slot_row = np.concatenate(slot_domain), np.concatenate(slot_row)
        if not self.shuffle_slots:
            if self._dealt is not None:
                return slot_domain[self._dealt], slot_row[self._dealt]
            return slot_domain, slot_row
        order = np.random.default_rng([self.seed, step, _SHUFFLE_TAG]).permutation(slot_domain.size)
        return slot_domain[order], slot_row[order]

    def batch(self, step: int, row_positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The rows ``row_positions`` (default: all) of global batch ``step``.

        Returns ``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` (int32
        [rows, seq_len]) and ``domain`` (int32 [rows], per-row domain id).
        """
        slot_domain, slot_row = self.plan(step)
        if row_positions is not None:
            slot_domain, slot_row = slot_domain[row_positions], slot_row[row_positions]
        domains = list(self.quotas)
        seq_len = self.rows[domains[0]].seq_len
        out = {
            name: np.zeros((slot_row.size, seq_len), np.int32)
            for name in ("tokens", "loss_mask", "segment_ids", "positions")
        }
        out["domain"] = np.zeros(slot_row.size, np.int32)
        for position, domain in enumerate(domains):
            where = np.nonzero(slot_domain == position)[0]
            if where.size:
                for name, values in self.rows[domain].take(slot_row[where]).items():
                    out[name][where] = values
                out["domain"][where] = self.domain_ids[domain]
        return out

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """Process ``process_index``'s even share of global batch ``step``."""
        return self.batch(step, even_row_positions(self.global_batch_size, process_index, process_count))

    def __call__(self, start_step: int = 0, row_positions: np.ndarray | None = None) -> Iterator[dict]:
        """Endless iterator of batches from ``start_step`` on (resumable by step)."""
        step = start_step
        while True:
            yield self.batch(step, row_positions)
            step += 1


def once_batches(num_items: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Covers items ``0 .. num_items - 1`` once, in order, in fixed-size batches.

    Yields ``(indices, valid)``; the last batch is filled with index 0 and ``valid == 0``
    so shapes stay fixed and nothing is dropped.
    """
    for start in range(0, num_items, batch_size):
        indices = np.arange(start, start + batch_size)
        valid = (indices < num_items).astype(np.int32)
        yield np.where(valid == 1, indices, 0), valid


def eval_batches(
    rows: Mapping[str, PackedRows],
    domain_ids: Mapping[str, int],
    global_batch_size: int,
    row_positions: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every row of every domain exactly once (domain by domain), e.g. for validation loss.

    Padding rows (in the last batch) carry ``valid == 0`` and an all-zero ``loss_mask``.
    ``row_positions`` selects this process's rows of each global batch.
    """
    names = [d for d in domain_ids if d in rows]
    counts = np.array([rows[d].num_rows for d in names])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for indices, valid in once_batches(int(counts.sum()), global_batch_size):
        if row_positions is not None:
            indices, valid = indices[row_positions], valid[row_positions]
        which = np.searchsorted(offsets, indices, side="right") - 1
        seq_len = rows[names[0]].seq_len
        out = {n: np.zeros((indices.size, seq_len), np.int32)
               for n in ("tokens", "loss_mask", "segment_ids", "positions")}
        out["domain"] = np.zeros(indices.size, np.int32)
        for position, domain in enumerate(names):
            where = np.nonzero(which == position)[0]
            if where.size:
                for name, values in rows[domain].take(indices[where] - offsets[position]).items():
                    out[name][where] = values
                out["domain"][where] = domain_ids[domain]
        out["loss_mask"] *= valid[:, None]
        out["valid"] = valid
        yield out


class PromptBatcher:
    """Global batches of left-padded prompts, endless and deterministic by (seed, step).

    Args:
      input_ids, attention_mask: int32 [num_prompts, prompt_len] (see ``left_pad``).
      global_batch_size: prompts per global batch.
      seed: data seed.
    """

    def __init__(self, input_ids: np.ndarray, attention_mask: np.ndarray, global_batch_size: int, seed: int):
        if input_ids.shape != attention_mask.shape:
            raise UserInputError(f"input_ids {input_ids.shape} vs attention_mask {attention_mask.shape}")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.global_batch_size = global_batch_size
        self._stream = IndexStream(input_ids.shape[0], seed, stream_id=_SHUFFLE_TAG)

    def _gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            "prompt_index": indices.astype(np.int32),
        }

    def batch(self, step: int, row_positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows ``row_positions`` (default all) of global prompt batch ``step``."""
        indices = self._stream.take(step * self.global_batch_size, self.global_batch_size)
        if row_positions is not None:
            indices = indices[row_positions]
        return self._gather(indices)

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """Process ``process_index``'s even share of prompt batch ``step``."""
        return self.batch(step, even_row_positions(self.global_batch_size, process_index, process_count))

    def once(self, row_positions: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every prompt exactly once, in order (for evaluation); padding rows have ``valid == 0``."""
        for indices, valid in once_batches(self.input_ids.shape[0], self.global_batch_size):
            if row_positions is not None:
                indices, valid = indices[row_positions], valid[row_positions]
            yield {**self._gather(indices), "valid": valid}
