"""Decoder models (Llama / Falcon families) and their HF interop."""

from regft_jax.models.config import ConfigError, ModelConfig, RopeScaling, from_hf_config, to_hf_config
from regft_jax.models.core import (
    abstract_params,
    default_positions,
    forward,
    forward_cached,
    grow_cache,
    init_cache,
    init_params,
    module,
    packed_inputs,
    param_logical_axes,
    segment_positions,
    unstack_layers,
)
from regft_jax.models.hf import load_hf, save_hf

__all__ = [
    "ConfigError", "ModelConfig", "RopeScaling", "from_hf_config", "to_hf_config",
    "abstract_params", "default_positions", "forward", "forward_cached", "grow_cache", "init_cache", "init_params",
    "module", "packed_inputs", "param_logical_axes", "segment_positions", "unstack_layers", "load_hf", "save_hf",
]
