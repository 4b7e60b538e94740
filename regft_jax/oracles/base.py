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
from collections.abc import Iterable, Sequence

import numpy as np

CACHE_FORMAT = "regft_jax.oracle_cache"
CACHE_VERSION = 1
# Backend outputs may overshoot [0, 1] by float rounding; anything beyond this is a bug.
_RANGE_TOLERANCE = 1e-5


@dataclasses.dataclass
class OracleStats:
    """Counters for one oracle instance (reset with ``Oracle.reset_stats``)."""

    backend_calls: int = 0  # calls of ``_score_batch``
    texts_scored: int = 0  # texts sent to the backend
    cache_hits: int = 0  # texts answered from the cache
    failures: int = 0  # texts whose score came back NaN


class LabelCache:
    """Thread-safe ``text -> P(violation)`` map that persists to ``.json`` or ``.npz``.

    ``owner`` names the oracle configuration the labels came from; loading a file written
    by a different owner fails (labels from another classifier must not be mixed in).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._labels: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, text: object) -> bool:
        return text in self._labels

    def lookup(self, texts: Iterable[str]) -> dict[str, float]:
        """The cached subset of ``texts`` as ``{text: score}``."""
        with self._lock:
            return {t: self._labels[t] for t in texts if t in self._labels}

    def update(self, labels: dict[str, float]) -> None:
        """Store finite scores; NaN (failed) scores are never cached."""
        finite = {t: float(s) for t, s in labels.items() if np.isfinite(s)}
        with self._lock:
            self._labels.update(finite)

    def clear(self) -> None:
        with self._lock:
            self._labels.clear()

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically; the format follows the suffix (``.json``/``.npz``)."""
        path = os.fspath(path)
        suffix = _cache_suffix(path)
        with self._lock:
            labels = dict(self._labels)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                if suffix == ".json":
                    f.write(json.dumps(self._json_payload(labels), ensure_ascii=False).encode("utf-8"))
                else:
                    np.savez(
                        f,
                        format=np.array(CACHE_FORMAT),
                        version=np.array(CACHE_VERSION),
                        owner=np.array(self.owner),
                        texts=np.array(list(labels), dtype=np.str_),
                        scores=np.array(list(labels.values()), dtype=np.float32),
                    )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load(self, path: str | os.PathLike, *, check_owner: bool = True) -> int:
        """Merge the labels of a saved cache into this one; returns how many were read."""
        path = os.fspath(path)
        if _cache_suffix(path) == ".json":
            owner, labels = _read_json_cache(path)
        else:
            owner, labels = _read_npz_cache(path)
        if check_owner and owner != self.owner:
            raise ValueError(
                f"label cache {path} was written by oracle {owner!r}, not {self.owner!r} "
                "(pass check_owner=False to load it anyway)"
            )
        self.update(labels)
        return len(labels)

    def _json_payload(self, labels: dict[str, float]) -> dict:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "owner": self.owner, "labels": labels}


def _cache_suffix(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"label cache path {path!r} must end in .json or .npz")
    return suffix


def _read_json_cache(path: str) -> tuple[str, dict[str, float]]:
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a regft_jax oracle label cache (missing format={CACHE_FORMAT!r})")
    labels = payload.get("labels")
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: key 'labels' must be an object mapping text to score")
    return str(payload.get("owner")), {str(t): float(s) for t, s in labels.items()}


def _read_npz_cache(path: str) -> tuple[str, dict[str, float]]:
    with np.load(path, allow_pickle=False) as data:
        for key in ("format", "owner", "texts", "scores"):
            if key not in data:
                raise ValueError(f"{path} is not a regft_jax oracle label cache (missing array {key!r})")
        if str(data["format"]) != CACHE_FORMAT:
            raise ValueError(f"{path} is not a regft_jax oracle label cache (format={str(data['format'])!r})")
        texts, scores = data["texts"], data["scores"]
        if texts.shape != scores.shape:
            raise ValueError(f"{path}: arrays 'texts' {texts.shape} and 'scores' {scores.shape} differ in shape")
        return str(data["owner"]), {str(t): float(s) for t, s in zip(texts, scores)}


class Oracle(abc.ABC):
    """Base class: batching, de-duplication, caching and output checks around a backend.

    Subclasses implement ``_score_batch(texts) -> float array [len(texts)]`` returning
    ``P(violation)`` per text, or NaN for a text that could not be scored. Exceptions
    raised by ``_score_batch`` propagate (they signal bugs or misconfiguration, not a
    per-text failure). ``score`` may be called from several threads (e.g. a background
    labeling thread); the cache and counters are lock-protected. Subclasses set the
    attributes their ``cache_owner`` reads *before* calling ``super().__init__``.

    Args:
      batch_size: maximum number of texts per backend call.
      use_cache: keep a ``text -> score`` cache; hits are not re-scored.
      cache_path: optional ``.json``/``.npz`` file; loaded at construction when it exists,
        and the default target of ``save_cache()``.
    """

    name: str = "oracle"

    def __init__(self, *, batch_size: int = 1024, use_cache: bool = True, cache_path: str | None = None):
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.stats = OracleStats()
        self._stats_lock = threading.Lock()
        self.cache: LabelCache | None = LabelCache(self.cache_owner) if use_cache else None
        self.cache_path = cache_path
        if cache_path is not None:
            if self.cache is None:
                raise ValueError(f"{self.name}: cache_path given but use_cache=False")
            if os.path.exists(cache_path):
                self.cache.load(cache_path)

    # ----------------------------------------------------------------- identity
    @property
    def cache_owner(self) -> str:
        """Identity stored in persisted caches; subclasses add their configuration."""
        return self.name

    # ----------------------------------------------------------------- scoring
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """``P(violation)`` per text: float32 ``[len(texts)]`` in ``[0, 1]``, NaN = failed."""
        texts = _as_text_list(texts, self.name)
        cached = self.cache.lookup(texts) if self.cache is not None else {}
        todo = list(dict.fromkeys(t for t in texts if t not in cached))  # unique, in order
        with self._stats_lock:
            self.stats.cache_hits += sum(t in cached for t in texts)
        fresh: dict[str, float] = {}
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            scores = self._checked_batch(chunk)
            fresh.update(zip(chunk, scores.tolist()))
        if self.cache is not None:
            self.cache.update(fresh)
        known = {**cached, **fresh}
        return np.array([known[t] for t in texts], dtype=np.float32)

    def satisfies(self, texts: Sequence[str]) -> np.ndarray:
        """``C(x) = 1 - P(violation)``: float32 ``[len(texts)]``, NaN where scoring failed."""
        return (1.0 - self.score(texts)).astype(np.float32)

    def flags(self, texts: Sequence[str], threshold: float = 0.5) -> np.ndarray:
        """Hard labels: 1.0 where ``P(violation) >= threshold``, else 0.0; NaN stays NaN."""
        scores = self.score(texts)
        return np.where(np.isnan(scores), np.nan, (scores >= threshold).astype(np.float32)).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.score(texts)

    # ----------------------------------------------------------------- cache
    def save_cache(self, path: str | os.PathLike | None = None) -> None:
        """Persist the label cache (to ``path`` or the constructor's ``cache_path``)."""
        target = path if path is not None else self.cache_path
        if self.cache is None:
            raise ValueError(f"{self.name}: no cache to save (use_cache=False)")
        if target is None:
            raise ValueError(f"{self.name}: save_cache needs a path (no cache_path configured)")
        self.cache.save(target)

    def load_cache(self, path: str | os.PathLike, *, check_owner: bool = True) -> int:
        """Merge a persisted label cache; returns the number of labels read."""
        if self.cache is None:
            raise ValueError(f"{self.name}: cannot load a cache with use_cache=False")
        return self.cache.load(path, check_owner=check_owner)

    def reset_stats(self) -> None:
        self.stats = OracleStats()

    # ----------------------------------------------------------------- backend
    @abc.abstractmethod
    def _score_batch(self, texts: list[str]) -> np.ndarray:
        """Score at most ``batch_size`` distinct texts; NaN marks a failed text."""

    def _checked_batch(self, texts: list[str]) -> np.ndarray:
        with self._stats_lock:
            self.stats.backend_calls += 1
            self.stats.texts_scored += len(texts)
        scores = np.asarray(self._score_batch(texts), dtype=np.float64)
        if scores.shape != (len(texts),):
            raise ValueError(f"oracle {self.name!r} returned shape {scores.shape} for {len(texts)} texts")
        valid = scores[~np.isnan(scores)]
        if valid.size and (valid.min() < -_RANGE_TOLERANCE or valid.max() > 1 + _RANGE_TOLERANCE):
            raise ValueError(
                f"oracle {self.name!r} returned scores outside [0, 1] "
                f"(min {valid.min():.4g}, max {valid.max():.4g})"
            )
        scores = np.clip(scores, 0.0, 1.0)  # NaN passes through np.clip unchanged
        with self._stats_lock:
            self.stats.failures += int(np.isnan(scores).sum())
        return scores

    def __repr__(self) -> str:
        cached = len(self.cache) if self.cache is not None else "off"
        return f"{type(self).__name__}(owner={self.cache_owner!r}, cache={cached})"


def _as_text_list(texts: Sequence[str], oracle_name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"oracle {oracle_name!r}: score() takes a sequence of texts, not a single str")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(f"oracle {oracle_name!r}: texts[{i}] is {type(text).__name__}, expected str")
    return out
