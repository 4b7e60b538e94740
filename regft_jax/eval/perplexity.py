"""Held-out perplexity: exp(Σ CE / Σ counted tokens) over packed rows, batched and jitted."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from regft_jax import multihost, sharding as shd
from regft_jax.data.packing import PackedRows
from regft_jax.losses import token_cross_entropy
from regft_jax.models import ModelConfig, forward, packed_inputs

_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


@functools.lru_cache(maxsize=16)
def _summed_ce(cfg: ModelConfig, mesh, document_attention: bool):
    def fn(params, tokens, loss_mask, segment_ids, positions):
        with shd.use_mesh(mesh):
            batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
            logits = forward(cfg, params, **packed_inputs(batch, document_attention))
            mask = loss_mask[:, 1:].astype(jnp.float32)
            return (token_cross_entropy(logits, tokens[:, 1:]) * mask).sum(), mask.sum()

    if mesh is None:
        return jax.jit(fn)
    batch = shd.batch_sharding(mesh, 2)
    return jax.jit(fn, in_shardings=(None,) + (batch,) * len(_FIELDS))


def perplexity(cfg: ModelConfig, params, rows: PackedRows, *, batch_size: int = 32, mesh=None,
               document_attention: bool = True) -> float:
    """Perplexity of `params` on `rows` (all rows, each counted token once). NaN if no tokens.
    document_attention: each packed document is scored on its own (attention and RoPE within the
    document, `config.data.document_attention`); False: one causal stream per row."""
    fn = _summed_ce(cfg, mesh, bool(document_attention))
    if mesh is not None:
        dp = shd.batch_shards(mesh)
        batch_size = -(-batch_size // dp) * dp
    total, count = 0.0, 0.0
    for start in range(0, rows.num_rows, batch_size):
        arrays = [getattr(rows, name)[start:start + batch_size] for name in _FIELDS]
        pad = batch_size - arrays[0].shape[0]  # one compiled shape: pad the last batch with masked rows
        if pad:
            arrays = [np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in arrays]
        if mesh is not None:  # global arrays (each process places its own rows)
            arrays = [multihost.to_global(a, shd.batch_sharding(mesh, 2)) for a in arrays]
        s, c = jax.device_get(fn(params, *arrays))
        total, count = total + float(s), count + float(c)
    return float(np.exp(total / count)) if count else float("nan")
