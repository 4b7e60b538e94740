"""Offline default oracle: alt-profanity-check (linear SVM on Jigsaw comments + tweets)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import numpy as np

from regft_jax.oracles.base import Oracle

REQUIREMENT = "alt-profanity-check==1.9.1"


class ProfanityOracle(Oracle):
    """``P(profane)`` from ``profanity_check.predict_prob``, in batches; never NaN."""

    name = "profanity"

    def __init__(self, *, batch_size: int = 8192, **kwargs: Any):
        try:
            from profanity_check import predict_prob
        except ImportError as e:
            raise ImportError(f"the 'profanity' oracle needs `pip install {REQUIREMENT}` ({e})") from e
        self._predict_prob = predict_prob
        self.version = metadata.version("alt-profanity-check")
        super().__init__(batch_size=batch_size, **kwargs)

    @property
    def cache_owner(self) -> str:
        return f"profanity:alt-profanity-check=={self.version}"

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._predict_prob(texts), dtype=np.float64)
