"""Likelihoods under the model p, or under NADO decoding's q = p · R (an `AuxGuidance`), batched and jitted.

    ppl = perplexity(cfg, params, rows)                                       # held-out perplexity of p
    ppl = perplexity(cfg, params, rows, guidance=AuxGuidance(aux_cfg), guidance_params=aux_params)  # of q
    logl, greedy = loglikelihoods(cfg, params, [(context_ids, continuation_ids), ...])  # per pair

Under guidance every token's log-probability is log q(y|h) = log softmax(logits_p(h) + log σ(z_φ(h)))[y]
(`token_log_q`): the distribution the guided sampler draws from (at temperature 1, no top-p), so
generations and likelihoods of a guided model are those of one and the same q.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from regft_jax import multihost, sharding as shd
from regft_jax.data.packing import PackedRows
from regft_jax.errors import UserInputError
from regft_jax.losses import guided_logits, token_cross_entropy
from regft_jax.models import ModelConfig, forward, packed_inputs
from regft_jax.models.aux import AuxGuidance, aux_logits
from regft_jax.sampling import bucket

_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def token_log_q(logits: jax.Array, targets: jax.Array, z: Optional[jax.Array] = None) -> jax.Array:
    """log q(y_t | h_t) per position [b, s], q(v|h) = p(v|h) R(h, v) / Σ_u p(u|h) R(h, u), R = σ(z):
    log softmax(logits + log σ(z))[y_t] (`losses.guided_logits`). z None: log p(y_t | h_t)."""
    return -token_cross_entropy(logits if z is None else guided_logits(logits, z), targets)


def _check_guidance(guidance) -> None:
    if guidance is not None and not isinstance(guidance, AuxGuidance):
        raise TypeError(f"likelihoods under guidance need a models.aux.AuxGuidance (its aux_logits at every slot); "
                        f"got {type(guidance).__name__}")


def _logits_and_z(cfg: ModelConfig, params, inputs: dict, guidance: Optional[AuxGuidance], guidance_params):
    """The model's logits and, with guidance, the auxiliary model's z on the same inputs (`packed_inputs`:
    input_ids and optional attention_mask / segment_ids / positions), [b, s, V] each (z None without)."""
    logits = forward(cfg, params, **inputs)
    if guidance is None:
        return logits, None
    rest = {k: inputs.get(k) for k in ("positions", "segment_ids")}
    return logits, aux_logits(guidance.cfg, guidance_params, inputs["input_ids"], inputs.get("attention_mask"), **rest)


def _jit(fn, mesh, arrays: int, out_batched: bool):
    """jit fn(params, guidance_params, *arrays): arrays sharded over the mesh's data axes; outputs
    replicated (sums) or batch-sharded (per row)."""
    if mesh is None:
        return jax.jit(fn)
    batch = shd.batch_sharding(mesh, 2)

    def traced(*args):
        with shd.use_mesh(mesh):
            return fn(*args)

    return jax.jit(traced, in_shardings=(None, None) + (batch,) * arrays,
                   out_shardings=shd.batch_sharding(mesh, 1) if out_batched else shd.replicated(mesh))


@functools.lru_cache(maxsize=16)
def _summed_nll(cfg: ModelConfig, mesh, document_attention: bool, guidance: Optional[AuxGuidance]):
    def fn(params, guidance_params, tokens, loss_mask, segment_ids, positions):
        batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
        logits, z = _logits_and_z(cfg, params, packed_inputs(batch, document_attention), guidance, guidance_params)
        mask = loss_mask[:, 1:].astype(jnp.float32)
        return -(token_log_q(logits, tokens[:, 1:], z) * mask).sum(), mask.sum()

    return _jit(fn, mesh, len(_FIELDS), out_batched=False)


def _batches(arrays: Sequence[np.ndarray], batch_size: int, mesh):
    """Consecutive batches of `batch_size` rows of `arrays` (the last padded with zero rows: one compiled
    shape), as global arrays on a mesh (each process places its own rows)."""
    for start in range(0, arrays[0].shape[0], batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - chunk[0].shape[0]
        if pad:
            chunk = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in chunk]
        if mesh is not None:
            chunk = [multihost.to_global(a, shd.batch_sharding(mesh, a.ndim)) for a in chunk]
        yield chunk


def _batch_size(batch_size: int, mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's data-parallel size."""
    dp = 1 if mesh is None else shd.batch_shards(mesh)
    return -(-batch_size // dp) * dp


def perplexity(cfg: ModelConfig, params, rows: PackedRows, *, batch_size: int = 32, mesh=None,
               document_attention: bool = True, guidance: Optional[AuxGuidance] = None,
               guidance_params: Any = None) -> float:
    """Perplexity exp(−Σ log p / Σ counted tokens) of `params` on `rows` (all rows, each counted token
    once), or of q = p · R with an `AuxGuidance` (`token_log_q`). NaN if no tokens.
    document_attention: each packed document is scored on its own (attention and RoPE within the
    document, `config.data.document_attention`; the auxiliary model reads the same inputs); False:
    one causal stream per row."""
    _check_guidance(guidance)
    fn = _summed_nll(cfg, mesh, bool(document_attention), guidance)
    total, count = 0.0, 0.0
    for arrays in _batches([getattr(rows, name) for name in _FIELDS], _batch_size(batch_size, mesh), mesh):
        s, c = jax.device_get(fn(params, guidance_params, *arrays))
        total, count = total + float(s), count + float(c)
    return float(np.exp(total / count)) if count else float("nan")


@functools.lru_cache(maxsize=16)
def _pair_scores(cfg: ModelConfig, mesh, guidance: Optional[AuxGuidance]):
    def fn(params, guidance_params, tokens, target_mask):
        logits, z = _logits_and_z(cfg, params, {"input_ids": tokens[:, :-1]}, guidance, guidance_params)
        targets, m = tokens[:, 1:], target_mask[:, 1:] > 0
        logp = jnp.where(m, token_log_q(logits, targets, z), 0.0).sum(-1)
        argmax = jnp.argmax(logits if z is None else guided_logits(logits, z), axis=-1)
        return logp, jnp.all((argmax == targets) | ~m, axis=-1)

    return _jit(fn, mesh, 2, out_batched=True)


def loglikelihoods(cfg: ModelConfig, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   guidance: Optional[AuxGuidance] = None, guidance_params: Any = None, batch_size: int = 32,
                   mesh=None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per (context ids, continuation ids) pair: log p(continuation | context) = Σ_t log p(y_t | context,
    y_<t), or log q with an `AuxGuidance` (`token_log_q`), float64 [n]; and whether the continuation is
    the greedy one (each y_t the argmax of p, or q, after its prefix), bool [n]. What an lm-eval model
    adapter's `loglikelihood` returns. The context must be non-empty (start it with BOS); the model reads
    every token of a pair but the last, at most max_seq_len of them (a pair of max_seq_len + 1 tokens, like
    lm-eval's max_length + 1 windows; nothing is truncated). Pairs are scored in batches of similar lengths,
    right-padded (causal attention: the padding is never attended)."""
    _check_guidance(guidance)
    if not pairs:
        return np.zeros(0), np.zeros(0, bool)
    lengths = np.array([len(c) + len(y) for c, y in pairs])
    reads = lengths - 1  # the model reads every token but the last (a target only)
    for i, (context, continuation) in enumerate(pairs):
        if not len(context) or not len(continuation):
            raise UserInputError(f"loglikelihoods: pair {i} has an empty {'context' if not len(context) else 'continuation'}"
                                 f" (a context starts with BOS at least)")
        if reads[i] > cfg.max_seq_len:
            raise UserInputError(f"loglikelihoods: pair {i} has {len(context)} + {len(continuation)} tokens; the model "
                                 f"reads all but the last, more than its max_seq_len {cfg.max_seq_len}")
    fn = _pair_scores(cfg, mesh, guidance)
    size = _batch_size(batch_size, mesh)
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    logl, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
    for start in range(0, len(pairs), size):
        idx = order[start:start + size]
        width = min(bucket(int(reads[idx].max())), cfg.max_seq_len) + 1  # + 1: the target-only last token
        tokens = np.full((len(idx), width), pad_id, np.int32)
        target_mask = np.zeros((len(idx), width), np.int32)
        for r, i in enumerate(idx):
            context, continuation = pairs[i]
            tokens[r, :lengths[i]] = list(context) + list(continuation)
            target_mask[r, len(context):lengths[i]] = 1
        (tokens, target_mask), = _batches([tokens, target_mask], size, mesh)
        out = multihost.to_host(fn(params, guidance_params, tokens, target_mask))
        logl[idx], greedy[idx] = out[0][:len(idx)], out[1][:len(idx)]
    return logl, greedy
