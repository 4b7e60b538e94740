"""Pure functional interface to the decoder: params are plain nested dicts of arrays.

    params = init_params(cfg, jax.random.key(0))
    logits = forward(cfg, params, input_ids)                       # [b, s, vocab] float32
    cache = init_cache(cfg, batch, max_len)
    logits, cache = forward_cached(cfg, params, tokens, cache, token_mask)   # prefill / decode

The NNX module is rebuilt from (graphdef, params) inside each call (`nnx.merge`), so these
functions can be jitted, differentiated and sharded like any function of pytrees.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from regft_jax.models.config import ModelConfig
from regft_jax.models.decoder import Decoder

Params = dict


@functools.lru_cache(maxsize=None)
def _abstract(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))


def module(cfg: ModelConfig, params: Params) -> Decoder:
    """The NNX decoder bound to `params` (cheap: no arrays are copied). With LoRA (cfg.lora_rank > 0)
    only the LoRA factors carry gradients. Unstacked params (`unstack_layers`): the module holds
    layer 0's weights; pass `layer_list(params)` to its `hidden_states`."""
    if cfg.lora_rank:
        from regft_jax.models.lora import stop_base_gradients

        params = stop_base_gradients(params)
    if isinstance(params["layers"], tuple):
        params = {**params, "layers": params["layers"][0]}
    return nnx.merge(_abstract(cfg)[0], params)


def unstack_layers(params: Params) -> Params:
    """`params` with the stacked layer weights (leading "layers" axis) split into a tuple of
    per-layer trees, so that the layers run one after another on their own buffers. For decoding:
    XLA on CPU copies a layer's slice of a stacked weight (and KV cache) at every step, which costs
    as much as the step's matrix multiplies at small batch. One copy of the weights, once."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))}


def layer_list(params: Params) -> Optional[tuple]:
    """The per-layer weights of unstacked params (`unstack_layers`), None for stacked ones."""
    return params["layers"] if isinstance(params["layers"], tuple) else None


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without allocating."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def param_logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter (a tuple per leaf, same tree as params)."""
    state = _abstract(cfg)[1]
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(init_std) kernels, unit norms, zero biases)."""
    return nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(params=rng)))[1])


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding: the i-th real token of a row gets position i."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Per-document positions of packed rows: each run of equal segment ids restarts at 0 (0 on
    padding, segment id 0). Same values as `data.packing.segment_positions`, traced."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, slots, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids > 0, slots - run_start, 0).astype(jnp.int32)


def _attention_mask(key_valid: jax.Array, query_slots: jax.Array,
                    segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """[b, s, t]: query at slot i attends key slot j iff j <= i and key j is a real token (and, with
    segment_ids [b, s] for a full pass, both lie in the same document)."""
    key_slots = jnp.arange(key_valid.shape[-1])
    causal = key_slots[None, None, :] <= query_slots[:, :, None]
    mask = causal & key_valid[:, None, :].astype(bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def hidden_states(cfg: ModelConfig, params: Params, input_ids: jax.Array, *,
                  attention_mask: Optional[jax.Array] = None,
                  positions: Optional[jax.Array] = None,
                  segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, Decoder]:
    """The final-norm hidden states [b, s, d] of a full causal pass, and the bound module.

    attention_mask [b, s] (1 = real token, 0 = padding) supports left-padded batches; positions
    default to the count of real tokens before each one.
    segment_ids [b, s] int (packed rows: 0 = padding, 1, 2, ... per document) keeps attention within
    each document (and off padding keys); positions then default to the per-document positions
    (`segment_positions`). Combined with attention_mask, a key must be real in both.
    """
    b, s = input_ids.shape
    if segment_ids is not None:
        key_valid = segment_ids > 0
        if attention_mask is not None:
            key_valid = key_valid & attention_mask.astype(bool)
        if positions is None:
            positions = segment_positions(segment_ids)
    else:
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        key_valid = attention_mask
        if positions is None:
            positions = default_positions(attention_mask)
    mask = _attention_mask(key_valid, jnp.broadcast_to(jnp.arange(s), (b, s)), segment_ids)
    model = module(cfg, params)
    h, _ = model.hidden_states(input_ids, positions, mask, layers=layer_list(params))
    return h, model


def forward(cfg: ModelConfig, params: Params, input_ids: jax.Array, *,
            attention_mask: Optional[jax.Array] = None,
            positions: Optional[jax.Array] = None,
            segment_ids: Optional[jax.Array] = None,
            return_hidden: bool = False, from_slot: int = 0):
    """Full causal forward. input_ids [b, s] → logits [b, s, vocab] float32 (see `hidden_states`
    for attention_mask / positions / segment_ids).
    from_slot (static): logits of slots from_slot.. only, [b, s − from_slot, vocab] (the vocabulary
    projection skips the slots before; every token is still attended)."""
    h, model = hidden_states(cfg, params, input_ids, attention_mask=attention_mask, positions=positions,
                             segment_ids=segment_ids)
    logits = model.logits(h[:, from_slot:])
    return (logits, h) if return_hidden else logits


def packed_inputs(batch: dict, document_attention: Optional[bool] = None) -> dict:
    """Model inputs of a corpus batch whose "tokens" are [b, s+1] (targets are tokens[:, 1:]):
    {"input_ids": tokens[:, :-1]} plus, with document attention, "segment_ids" and "positions"
    (batch[k][:, :-1]), and "attention_mask"[:, :-1] if the batch has one. Splat it into `forward`,
    `hidden_states` or `aux.aux_logits`: `forward(cfg, params, **packed_inputs(batch, flag))`.

    document_attention: True → attend and rotate within each packed document (the batch must carry
    "segment_ids"; "positions" are recomputed from them when absent); False → one causal stream per
    row (today's behaviour); None → True iff the batch carries "segment_ids"."""
    if document_attention is None:
        document_attention = "segment_ids" in batch
    out = {"input_ids": batch["tokens"][:, :-1]}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"][:, :-1]
    if document_attention:
        if "segment_ids" not in batch:
            raise KeyError(f"document attention needs batch['segment_ids'] (batch has {sorted(batch)}); "
                           "select it (and 'positions') in train.loop.global_batches(keys=...)")
        out["segment_ids"] = batch["segment_ids"][:, :-1]
        out["positions"] = (batch["positions"][:, :-1] if "positions" in batch
                            else segment_positions(out["segment_ids"]))
    return out


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Optional[str] = None,
               per_layer: bool = False) -> dict:
    """An empty KV cache for `batch` rows and `max_len` slots: "k" and "v" stacked over layers
    [layers, b, kv_heads, t, head_dim], or with `per_layer` tuples of one [b, kv_heads, t, head_dim]
    array per layer (read in place by unstacked params, `unstack_layers`)."""
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # head-major slots
    dtype = jnp.dtype(dtype or cfg.dtype)
    if per_layer:
        kv = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
        kv = lambda: jnp.zeros((cfg.num_layers, *shape), dtype)
    return {
        "k": kv(),
        "v": kv(),
        "valid": jnp.zeros((batch, max_len), bool),  # slot holds a real (non-padding) token
        "positions": jnp.zeros((batch,), jnp.int32),  # next rotary position of each row
        "index": jnp.zeros((), jnp.int32),  # next slot to write (shared: prompts are left-padded)
    }


def grow_cache(cache: dict, max_len: int) -> dict:
    """`cache` (`init_cache`) with room for `max_len` slots: the new slots are empty (zero keys and
    values, not valid), the filled ones unchanged. One copy of the cache."""
    grow = max_len - cache["valid"].shape[1]
    if grow < 0:
        raise ValueError(f"grow_cache: max_len={max_len} is below the cache's {cache['valid'].shape[1]} slots")
    pad = lambda a, axis: jnp.pad(a, [(0, grow if d == axis % a.ndim else 0) for d in range(a.ndim)])
    kv = lambda x: jax.tree.map(lambda a: pad(a, -2), x)  # [.., slots, head_dim], stacked or per layer
    return {**cache, "k": kv(cache["k"]), "v": kv(cache["v"]), "valid": pad(cache["valid"], 1)}


def hidden_states_cached(cfg: ModelConfig, params: Params, tokens: jax.Array, cache: dict,
                         token_mask: Optional[jax.Array] = None,
                         rope: Optional[tuple] = None) -> tuple[jax.Array, dict, Decoder]:
    """Hidden states of `tokens` [b, s] appended to the KV cache: (h [b, s, d], cache, module).
    rope: the rotary tables (`decoder.rope_tables`) of the tokens' positions, if the caller has them."""
    b, s = tokens.shape
    if token_mask is None:
        token_mask = jnp.ones((b, s), jnp.int32)
    index = cache["index"]
    positions = cache["positions"][:, None] + default_positions(token_mask)
    valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], token_mask.astype(bool), index, axis=1)
    slots = jnp.broadcast_to(index + jnp.arange(s), (b, s))
    mask = _attention_mask(valid, slots)
    model = module(cfg, params)
    h, cache = model.hidden_states(tokens, positions, mask, {**cache, "valid": valid}, layers=layer_list(params),
                                   rope=rope)
    cache["positions"] = cache["positions"] + token_mask.astype(jnp.int32).sum(-1)
    cache["index"] = index + s
    return h, cache, model


def forward_cached(cfg: ModelConfig, params: Params, tokens: jax.Array, cache: dict,
                   token_mask: Optional[jax.Array] = None, *, last_only: bool = False, rope: Optional[tuple] = None):
    """Run `tokens` [b, s] through the model, appending them to the KV cache.

    Prefill with the (left-padded) prompt and its mask, then call with s=1 per new token.
    Returns (logits [b, s, vocab] float32, updated cache); with `last_only`, logits [b, 1, vocab]
    of the last slot only (a prefill never materializes [b, s, vocab]). rope: as in `hidden_states_cached`.
    """
    h, cache, model = hidden_states_cached(cfg, params, tokens, cache, token_mask, rope)
    return model.logits(h[:, -1:] if last_only else h), cache
