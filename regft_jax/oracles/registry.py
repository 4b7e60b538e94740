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
    "insult_classifier": "regft_jax.oracles.insult_classifier:InsultClassifierOracle",
}

# Oracles fitted on a corpus: name -> "module:attribute" of ``factory(corpus, domain, **kwargs)``.
_CORPUS_FACTORIES: dict[str, str] = {
    "insult_classifier": "regft_jax.oracles.insult_classifier:from_corpus",
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


def needs_corpus(name: str) -> bool:
    """Whether oracle ``name`` is fitted on a corpus (build it with ``make_corpus_oracle``)."""
    return name in _CORPUS_FACTORIES


def make_corpus_oracle(name: str, corpus, domain: str, **kwargs: Any) -> Oracle:
    """``make_oracle(name, **kwargs)``, except that an oracle fitted on a corpus (``needs_corpus``)
    is fitted on ``corpus.train[domain]`` (only the training split)."""
    if name not in _CORPUS_FACTORIES:
        return make_oracle(name, **kwargs)
    module, attribute = _CORPUS_FACTORIES[name].split(":")
    return getattr(importlib.import_module(module), attribute)(corpus, domain, **kwargs)
