"""Build (ModelConfig, params) from the `model` section of an experiment config."""

from __future__ import annotations

import os

import jax
import ml_collections

from regft_jax import checkpoint, sharding
from regft_jax.models.config import ConfigError, ModelConfig
from regft_jax.models.core import abstract_params, init_params, param_logical_axes
from regft_jax.models.hf import load_hf

RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat")
SOURCES = ("random", "hf", "checkpoint")


def runtime_overrides(model: ml_collections.ConfigDict) -> dict:
    return {k: model[k] for k in RUNTIME_FIELDS if k in model}


def model_from_config(model: ml_collections.ConfigDict, mesh, *, seed: int = 0,
                      rules=None) -> tuple[ModelConfig, dict]:
    """`model.source`: "random" (architecture from `model.arch`), "hf" (safetensors directory at
    `model.path`) or "checkpoint" (a regft_jax checkpoint at `model.path`)."""
    source = model.source
    runtime = runtime_overrides(model)
    if source not in SOURCES:
        raise ConfigError(f"config.model.source={source!r}; expected one of {SOURCES}")
    if source == "random":
        cfg = ModelConfig.from_dict({**model.arch.to_dict(), **runtime})
        shardings = sharding.param_shardings(mesh, param_logical_axes(cfg), abstract_params(cfg), rules)
        params = jax.jit(lambda key: init_params(cfg, key), out_shardings=shardings)(jax.random.key(seed))
        return cfg, params
    if not model.path or not os.path.isdir(model.path):
        raise ConfigError(f"config.model.path={model.path!r} is not a directory (model.source={source!r}); "
                          "point it at a local checkpoint, e.g. --config.model.path=/models/Llama-2-7b-hf")
    if source == "hf":
        return load_hf(model.path, mesh=mesh, rules=rules, **runtime)
    return checkpoint.load_model(model.path, mesh=mesh, rules=rules, **runtime)
