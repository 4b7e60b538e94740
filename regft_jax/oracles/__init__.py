"""Sequence-level oracles: ``score(texts) -> P(violation)``, float32 ``[n]`` in ``[0, 1]``.

``satisfies(texts)`` gives the paper's ``C(x) = 1 - P(violation)``. A text that could not
be scored is **NaN — a masked label, never 0**; mask with ``np.isfinite`` downstream.

    from regft_jax.oracles import make_oracle
    oracle = make_oracle("profanity", cache_path="labels.json")
    p_toxic = oracle.score(["some text", "another"])
    oracle.save_cache()

Registered names (``available_oracles()``):

- ``profanity``: alt-profanity-check linear SVM, the offline default (``ProfanityOracle``).
- ``hf_classifier``: local HF BERT/RoBERTa classifier run in JAX (``HFClassifierOracle``).
- ``perspective``: Perspective API over HTTP, rate-limited, with retries (``PerspectiveOracle``).
- ``callable``: any function texts -> scores (``CallableOracle``).
- ``regex``: word list / regular expressions, hard 0/1 (``RegexOracle``).
- ``insult_classifier``: char n-gram logistic regression fitted on the corpus's toxic-domain
  training split — an evaluation judge independent of ``profanity`` (``InsultClassifierOracle``;
  ``make_corpus_oracle(name, corpus, domain)`` fits it, ``needs_corpus(name)`` says which do).

Implementations are imported lazily (JAX/transformers/scikit-learn load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

from regft_jax.oracles.base import CheckpointError, LabelCache, Oracle, OracleError, OracleStats
from regft_jax.oracles.registry import (
    DEFAULT_ORACLE,
    available_oracles,
    make_corpus_oracle,
    make_oracle,
    needs_corpus,
    register_oracle,
)

_LAZY = {
    "ProfanityOracle": "regft_jax.oracles.profanity",
    "HFClassifierOracle": "regft_jax.oracles.hf_classifier",
    "PerspectiveOracle": "regft_jax.oracles.perspective",
    "PerspectiveAuthError": "regft_jax.oracles.perspective",
    "CallableOracle": "regft_jax.oracles.rules",
    "RegexOracle": "regft_jax.oracles.rules",
    "InsultClassifierOracle": "regft_jax.oracles.insult_classifier",
}

__all__ = [
    "DEFAULT_ORACLE", "CheckpointError", "LabelCache", "Oracle", "OracleError", "OracleStats",
    "available_oracles", "make_corpus_oracle", "make_oracle", "needs_corpus", "register_oracle", *_LAZY,
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regft_jax.oracles' has no attribute {name!r}")
