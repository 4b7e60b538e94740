"""The oracle interface: batched sequence scoring with a persistent label cache.

An oracle scores whole sequences (prompt + continuation). ``score`` returns
``P(violation)`` in ``[0, 1]`` (for detoxification: ``P(toxic)``); ``satisfies`` returns
the paper's ``C(x) = 1 - P(violation)``.

**Failed scores are NaN.** A text the backend could not score (an API request that kept
failing, a malformed response) gets ``NaN`` — a *masked* label — never ``0``: a silent 0
would read as "perfectly clean" and bias training. Downstream code must mask NaNs
(e.g. ``np.isfinite(scores)``). NaN results are not cached, so a later call retries them.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import tempfile
import threading
from collections.abc import Sequence

import numpy as np

from regft_jax.errors import UserInputError

CACHE_FORMAT = "regft_jax.oracle_cache/1"
_RANGE_TOLERANCE = 1e-5  # backend outputs may overshoot [0, 1] by rounding; more is a bug


class OracleError(UserInputError):
    """Bad oracle configuration or input (unknown name, bad option, foreign label cache)."""


class CheckpointError(OracleError):
    """A classifier directory, config.json key or tensor is missing or inconsistent."""


@dataclasses.dataclass
class OracleStats:
    """Counters for one oracle instance."""

    backend_calls: int = 0  # calls of ``_score_batch``
    texts_scored: int = 0  # texts sent to the backend
    cache_hits: int = 0  # texts answered from the cache
    failures: int = 0  # texts whose score came back NaN


class LabelCache:
    """Thread-safe ``text -> P(violation)`` map, persisted as JSON.

    ``owner`` names the oracle configuration the labels came from; loading a file written
    by a different owner is refused (labels of another classifier must not be mixed in).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._labels: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._labels)

    def lookup(self, texts: Sequence[str]) -> dict[str, float]:
        """The cached subset of ``texts`` as ``{text: score}``."""
        with self._lock:
            return {t: self._labels[t] for t in texts if t in self._labels}

    def update(self, labels: dict[str, float]) -> None:
        """Store finite scores; NaN (failed) scores are never cached."""
        finite = {t: float(s) for t, s in labels.items() if np.isfinite(s)}
        with self._lock:
            self._labels.update(finite)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to a ``.json`` file atomically."""
        path = _json_path(path)
        with self._lock:
            payload = {"format": CACHE_FORMAT, "owner": self.owner, "labels": dict(self._labels)}
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            os.remove(tmp)
            raise

    def load(self, path: str | os.PathLike) -> int:
        """Merge the labels of a saved cache into this one; returns how many were read."""
        path = _json_path(path)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except json.JSONDecodeError as e:
            raise OracleError(f"label cache {path}: not valid JSON ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise OracleError(f"label cache {path}: key 'format' is not {CACHE_FORMAT!r}")
        if payload.get("owner") != self.owner:
            raise OracleError(
                f"label cache {path} was written by oracle {payload.get('owner')!r}, not {self.owner!r}"
            )
        labels = payload.get("labels")
        if not isinstance(labels, dict):
            raise OracleError(f"label cache {path}: key 'labels' must map text to score")
        self.update({str(t): float(s) for t, s in labels.items()})
        return len(labels)


def _json_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.endswith(".json"):
        raise OracleError(f"label cache path {path!r} must end in .json")
    return path


class Oracle(abc.ABC):
    """Batching, de-duplication, caching and output checks around a scoring backend.

    Subclasses implement ``_score_batch(texts) -> array [len(texts)]`` of ``P(violation)``
    (NaN for a text that could not be scored), and set whatever ``cache_owner`` reads
    *before* calling ``super().__init__``. ``score`` may be called from several threads
    (e.g. a background labeling thread); the cache and counters are lock-protected.

    Args:
      batch_size: maximum number of texts per backend call.
      use_cache: keep a ``text -> score`` cache; cached texts are not re-scored.
      cache_path: optional ``.json`` file, loaded at construction when it exists and the
        default target of ``save_cache()``.
    """

    name: str = "oracle"

    def __init__(self, *, batch_size: int = 1024, use_cache: bool = True, cache_path: str | None = None):
        if int(batch_size) < 1:
            raise OracleError(f"oracle {self.name!r}: batch_size must be >= 1, got {batch_size}")
        if cache_path is not None and not use_cache:
            raise OracleError(f"oracle {self.name!r}: cache_path given with use_cache=False")
        self.batch_size = int(batch_size)
        self.stats = OracleStats()
        self._stats_lock = threading.Lock()
        self.cache = LabelCache(self.cache_owner) if use_cache else None
        self.cache_path = cache_path
        if cache_path is not None and os.path.exists(cache_path):
            self.cache.load(cache_path)

    @property
    def cache_owner(self) -> str:
        """Identity stored in persisted caches; subclasses add their configuration."""
        return self.name

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """``P(violation)`` per text: float32 ``[len(texts)]`` in ``[0, 1]``, NaN = failed."""
        if isinstance(texts, str):
            raise TypeError(f"oracle {self.name!r}: score() takes a sequence of texts, not one str")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"oracle {self.name!r}: texts[{i}] is {type(text).__name__}, not str")
        known = self.cache.lookup(texts) if self.cache is not None else {}
        todo = list(dict.fromkeys(t for t in texts if t not in known))  # unique, in order
        with self._stats_lock:
            self.stats.cache_hits += sum(t in known for t in texts)
        fresh: dict[str, float] = {}
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            fresh.update(zip(chunk, self._checked_batch(chunk).tolist()))
        if self.cache is not None:
            self.cache.update(fresh)
        known.update(fresh)
        return np.array([known[t] for t in texts], dtype=np.float32)

    def satisfies(self, texts: Sequence[str]) -> np.ndarray:
        """``C(x) = 1 - P(violation)``: float32 ``[len(texts)]``, NaN where scoring failed."""
        return 1.0 - self.score(texts)

    __call__ = score

    def save_cache(self, path: str | os.PathLike | None = None) -> None:
        """Persist the label cache (to ``path`` or the constructor's ``cache_path``)."""
        path = path if path is not None else self.cache_path
        if self.cache is None or path is None:
            raise OracleError(f"oracle {self.name!r}: save_cache needs use_cache=True and a path")
        self.cache.save(path)

    def load_cache(self, path: str | os.PathLike) -> int:
        """Merge a persisted label cache of the same oracle configuration."""
        if self.cache is None:
            raise OracleError(f"oracle {self.name!r}: cannot load a cache with use_cache=False")
        return self.cache.load(path)

    @abc.abstractmethod
    def _score_batch(self, texts: list[str]) -> np.ndarray:
        """Score at most ``batch_size`` distinct texts; NaN marks a failed text."""

    def _checked_batch(self, texts: list[str]) -> np.ndarray:
        scores = np.asarray(self._score_batch(texts), dtype=np.float64)
        if scores.shape != (len(texts),):
            raise OracleError(f"oracle {self.name!r} returned shape {scores.shape} for {len(texts)} texts")
        valid = scores[~np.isnan(scores)]
        if valid.size and not (-_RANGE_TOLERANCE <= valid.min() and valid.max() <= 1 + _RANGE_TOLERANCE):
            raise OracleError(
                f"oracle {self.name!r} returned scores outside [0, 1] (min {valid.min():.4g}, max {valid.max():.4g})"
            )
        with self._stats_lock:
            self.stats.backend_calls += 1
            self.stats.texts_scored += len(texts)
            self.stats.failures += int(np.isnan(scores).sum())
        return np.clip(scores, 0.0, 1.0)  # NaN passes through

    def __repr__(self) -> str:
        size = len(self.cache) if self.cache is not None else "off"
        return f"{type(self).__name__}(owner={self.cache_owner!r}, cached={size})"
