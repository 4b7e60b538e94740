"""Held-out perplexity: exp(Σ CE / Σ counted tokens) over packed rows, batched and jitted."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from regft_jax import sharding as shd
from regft_jax.data.packing import PackedRows
from regft_jax.losses import token_cross_entropy
from regft_jax.models import ModelConfig, forward


@functools.lru_cache(maxsize=16)
def _summed_ce(cfg: ModelConfig, mesh):
    def fn(params, tokens, loss_mask):
        with shd.use_mesh(mesh):
            logits = forward(cfg, params, tokens[:, :-1])
            mask = loss_mask[:, 1:].astype(jnp.float32)
            return (token_cross_entropy(logits, tokens[:, 1:]) * mask).sum(), mask.sum()

    if mesh is None:
        return jax.jit(fn)
    batch = shd.batch_sharding(mesh, 2)
    return jax.jit(fn, in_shardings=(None, batch, batch))


def perplexity(cfg: ModelConfig, params, rows: PackedRows, *, batch_size: int = 32, mesh=None) -> float:
    """Perplexity of `params` on `rows` (all rows, each counted token once). NaN if no tokens."""
    fn = _summed_ce(cfg, mesh)
    if mesh is not None:
        dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        batch_size = -(-batch_size // dp) * dp
    total, count = 0.0, 0.0
    for start in range(0, rows.num_rows, batch_size):
        tokens = rows.tokens[start:start + batch_size]
        mask = rows.loss_mask[start:start + batch_size]
        pad = batch_size - tokens.shape[0]  # one compiled shape: pad the last batch with masked rows
        if pad:
            tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), tokens.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        s, c = jax.device_get(fn(params, tokens, mask))
        total, count = total + float(s), count + float(c)
    return float(np.exp(total / count)) if count else float("nan")
