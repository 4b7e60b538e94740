"""Name -> oracle class registry (``make_oracle("profanity")``).

Built-in oracles are registered by import path and imported lazily, so importing
``regft_jax.oracles`` does not pull in JAX, transformers or scikit-learn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from regft_jax.oracles.base import Oracle, OracleError

# name -> "module:attribute" (imported on first use) or a factory registered at run time.
_REGISTRY: dict[str, str | Callable[..., Oracle]] = {
    "profanity": "regft_jax.oracles.profanity:ProfanityOracle",
    "hf_classifier": "regft_jax.oracles.hf_classifier:HFClassifierOracle",
    "perspective": "regft_jax.oracles.perspective:PerspectiveOracle",
    "callable": "regft_jax.oracles.rules:CallableOracle",
    "regex": "regft_jax.oracles.rules:RegexOracle",
}

DEFAULT_ORACLE = "profanity"


def available_oracles() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def register_oracle(name: str, factory: Callable[..., Oracle]) -> None:
    """Register ``factory(**kwargs) -> Oracle`` under ``name`` (replacing is an error)."""
    if name in _REGISTRY:
        raise OracleError(f"oracle {name!r} is already registered")
    _REGISTRY[name] = factory


def make_oracle(name: str, **kwargs: Any) -> Oracle:
    """Build the oracle registered under ``name`` with keyword arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise OracleError(f"unknown oracle {name!r}; valid names: {', '.join(available_oracles())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory(**kwargs)
