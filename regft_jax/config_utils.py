"""Helpers for ml_collections experiment configs: defaults and validation with clear errors."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from regft_jax.errors import UserInputError
from regft_jax.models.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # imported where used: modules that only need `require` work without ml_collections
    import ml_collections


def arch_config(**fields) -> ml_collections.ConfigDict:
    """The `model.arch` section: every ModelConfig architecture field (validated now)."""
    import ml_collections

    cfg = ModelConfig(**fields)
    arch = cfg.architecture
    arch.pop("rope_scaling")  # random-init models use plain RoPE
    return ml_collections.ConfigDict(arch)


def require(config: ml_collections.ConfigDict, key: str, ok: bool, expected: str) -> None:
    """Raise a ConfigError naming `key`, its value and what was expected, unless `ok`."""
    if not ok:
        value = config
        for part in key.split("."):
            value = value[part]
        raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def load_config_file(path: str):
    """`get_config()` of a configs/*.py file (without absl flags: for tools and benchmarks)."""
    import importlib.util

    if not os.path.isfile(path):
        raise UserInputError(f"config file {path!r}: no such file")
    spec = importlib.util.spec_from_file_location("regft_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
