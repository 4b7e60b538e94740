"""The auxiliary model R_φ(h, v) = σ(z_φ(h)_v): a shallow decoder trunk plus a vocabulary-size head.

    aux_cfg = aux_config(llm_cfg, num_layers=2)
    aux_params = init_aux_params(aux_cfg, rng, mean_label=0.8, llm_params=llm_params)  # or fresh
    z = aux_logits(aux_cfg, aux_params, tokens)                  # [b, s, vocab] float32 logits of R
    out = sampling.generate(llm_cfg, llm_params, prompts, max_new_tokens=32,
                            guidance=AuxGuidance(aux_cfg), guidance_params=aux_params)  # NADO decoding

The trunk is the LLM's own decoder family (`core.hidden_states`) with k layers, either
fresh or copied from the LLM's embeddings, first k layers and final norm. The head starts at zero
weights and bias logit(mean label), so R starts constant (= the mean label) everywhere.
Params: {"trunk": decoder params (no LM head), "head": {"kernel": [d, V], "bias": [V]}}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from regft_jax import sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.models.config import ModelConfig
from regft_jax.models.decoder import token_matmul
from regft_jax.models.core import (abstract_params, hidden_states, hidden_states_cached, init_cache, init_params,
                                   param_logical_axes)


def aux_config(llm_cfg: ModelConfig, num_layers: int, **overrides) -> ModelConfig:
    """The trunk's config: the LLM's architecture with `num_layers` layers (other fields may be
    overridden, e.g. init_std or remat). Embeddings are marked tied so the trunk has no LM head of
    its own (the aux head replaces it). The trunk trains all its weights: no LoRA (an LLM with LoRA
    hands it merged weights, `schedules.aux_initializer`)."""
    if num_layers < 1:
        raise UserInputError(f"aux model: num_layers={num_layers} must be >= 1")
    return dataclasses.replace(llm_cfg, **{"lora_rank": 0, "lora_targets": (), **overrides, "num_layers": num_layers,
                                           "tie_embeddings": True})


def _head_axes() -> dict:
    return {"kernel": ("embed", "vocab"), "bias": ("vocab",)}


def aux_logical_axes(aux_cfg: ModelConfig) -> dict:
    """Logical axis names of every aux parameter (same tree as the params)."""
    return {"trunk": param_logical_axes(aux_cfg), "head": _head_axes()}


def aux_abstract_params(aux_cfg: ModelConfig) -> dict:
    """Shapes and dtypes of the aux parameters, without allocating."""
    dtype = jnp.dtype(aux_cfg.param_dtype)
    d, v = aux_cfg.hidden_size, aux_cfg.vocab_size
    return {"trunk": abstract_params(aux_cfg),
            "head": {"kernel": jax.ShapeDtypeStruct((d, v), dtype), "bias": jax.ShapeDtypeStruct((v,), dtype)}}


def init_aux_params(aux_cfg: ModelConfig, rng: jax.Array, *, mean_label: float,
                    llm_params: Optional[dict] = None) -> dict:
    """Aux parameters: trunk fresh (from `rng`) or copied from `llm_params` (embeddings, first k
    layers, final norm; the copies own their buffers, so donating aux states leaves the LLM intact);
    head kernel 0, bias logit(mean_label) → R(h, v) = mean_label everywhere at the start."""
    if llm_params is None:
        trunk = init_params(aux_cfg, rng)
    else:
        have = jax.tree.leaves(llm_params["layers"])[0].shape[0]
        if aux_cfg.num_layers > have:
            raise UserInputError(f"aux model: num_layers={aux_cfg.num_layers} but the LLM has only {have} layers")
        k = aux_cfg.num_layers
        trunk = {"embed": jnp.copy(llm_params["embed"]),
                 "layers": jax.tree.map(lambda a: jnp.copy(a[:k]), llm_params["layers"]),
                 "final_norm": jax.tree.map(jnp.copy, llm_params["final_norm"])}
    p = min(max(float(mean_label), 1e-4), 1 - 1e-4)
    dtype = jnp.dtype(aux_cfg.param_dtype)
    head = {"kernel": jnp.zeros((aux_cfg.hidden_size, aux_cfg.vocab_size), dtype),
            "bias": jnp.full((aux_cfg.vocab_size,), math.log(p / (1 - p)), dtype)}
    return {"trunk": trunk, "head": head}


def _head(params: dict, h: jax.Array) -> jax.Array:
    """z = h W + b in float32, [b, s, vocab]."""
    head = params["head"]
    z = token_matmul(h, head["kernel"].astype(h.dtype), preferred_element_type=jnp.float32)
    return shd.constrain(z + head["bias"].astype(jnp.float32), ("batch", "length", "vocab"))


def aux_logits(aux_cfg: ModelConfig, aux_params: dict, tokens: jax.Array,
               attention_mask: Optional[jax.Array] = None, from_slot: int = 0, *,
               positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """z_φ(h) for every prefix: tokens [b, s] → [b, s, vocab] float32, slot t read tokens[:, :t+1].
    attention_mask [b, s] (1 = real token) supports left padding, positions / segment_ids [b, s]
    (packed rows: attention and RoPE within each document), all as in `core.forward`;
    from_slot (static): z of slots from_slot.. only, [b, s − from_slot, vocab].
    With a corpus batch: `x = core.packed_inputs(batch, flag); aux_logits(cfg, p, x.pop("input_ids"), **x)`."""
    h, _ = hidden_states(aux_cfg, aux_params["trunk"], tokens, attention_mask=attention_mask,
                         positions=positions, segment_ids=segment_ids)
    return _head(aux_params, h[:, from_slot:])


def aux_logits_cached(aux_cfg: ModelConfig, aux_params: dict, tokens: jax.Array, cache: dict,
                      token_mask: Optional[jax.Array] = None, *, last_only: bool = False):
    """Incremental z with the trunk's KV cache (`core.init_cache(aux_cfg, ...)`), exactly like
    `core.forward_cached`: prefill a left-padded prompt, then one token per call.
    Returns (z [b, s or 1, vocab] float32, updated cache)."""
    h, cache, _ = hidden_states_cached(aux_cfg, aux_params["trunk"], tokens, cache, token_mask)
    return _head(aux_params, h[:, -1:] if last_only else h), cache


@dataclasses.dataclass(frozen=True)
class AuxGuidance:
    """NADO decoding as a sampler `Guidance`: adds log σ(z_φ(h)) of the last slot to the LLM's
    logits, so the sampler draws from q(v|h) ∝ p(v|h) R_φ(h, v). Its state is the trunk's KV cache;
    its params (`guidance_params`) are the aux params."""

    cfg: ModelConfig

    def init(self, params: Any, batch: int, max_len: int) -> dict:
        return shd.constrain_kv_cache(init_cache(self.cfg, batch, max_len))

    def __call__(self, params: Any, state: dict, tokens: jax.Array, token_mask: jax.Array):
        z, state = aux_logits_cached(self.cfg, params, tokens, state, token_mask, last_only=True)
        return jax.nn.log_sigmoid(z[:, -1]), state
