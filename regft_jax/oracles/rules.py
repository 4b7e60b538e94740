"""User-defined oracles: any scoring function, or a word list / regular expressions."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from regft_jax.oracles.base import Oracle, OracleError


class CallableOracle(Oracle):
    """Wraps ``fn(texts: list[str]) -> scores`` (one float in [0, 1] per text; NaN = failed).

    Args:
      fn: called with lists of at most ``batch_size`` distinct texts.
      satisfaction: ``fn`` returns ``C(x)`` (1 = fine) instead of ``P(violation)``.
      key: identity stored in persisted caches (default: the function's qualified name;
        give one for lambdas or closures so that caches of different functions differ).
    """

    name = "callable"

    def __init__(self, fn: Callable[[list[str]], Any], *, satisfaction: bool = False, key: str | None = None,
                 **kwargs: Any):  # fmt: skip
        if not callable(fn):
            raise OracleError(f"callable oracle: fn must be callable, got {type(fn).__name__}")
        self.fn, self.satisfaction = fn, bool(satisfaction)
        self.key = key or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        super().__init__(**kwargs)

    @property
    def cache_owner(self) -> str:
        return f"callable:{self.key}:{'satisfaction' if self.satisfaction else 'violation'}"

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        scores = np.asarray(self.fn(texts), dtype=np.float64)
        return 1.0 - scores if self.satisfaction else scores


def word_list_pattern(words: Sequence[str]) -> str:
    """A regex matching any of ``words`` as a whole word or phrase.

    Look-arounds instead of ``\\b``, so entries starting or ending with punctuation
    (``"f*ck"``, ``"@home"``) still match.
    """
    cleaned = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not cleaned:
        raise OracleError("regex oracle: the word list is empty")
    return r"(?<!\w)(?:" + "|".join(re.escape(w) for w in cleaned) + r")(?!\w)"


class RegexOracle(Oracle):
    """Hard 0/1 oracle: a text violates when it matches (case-insensitive).

    Any combination of ``words`` (whole-word matches), ``words_file`` (one entry per line,
    ``#`` comments) and ``patterns`` (raw regexes). ``invert=True``: a text violates when
    it does *not* match (e.g. a required keyword).
    """

    name = "regex"

    def __init__(self, *, words: Sequence[str] = (), words_file: str | None = None,
                 patterns: Sequence[str] | str = (), invert: bool = False, **kwargs: Any):  # fmt: skip
        words = list(words)
        if words_file is not None:
            with open(words_file, encoding="utf-8") as f:
                words += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        parts = [word_list_pattern(words)] if words or words_file else []
        parts += [f"(?:{p})" for p in ([patterns] if isinstance(patterns, str) else patterns)]
        if not parts:
            raise OracleError("regex oracle needs words, words_file or patterns")
        self.pattern = "|".join(parts)
        try:
            self._regex = re.compile(self.pattern, re.IGNORECASE)
        except re.error as e:
            raise OracleError(f"regex oracle: invalid pattern ({e}): {self.pattern!r}") from None
        self.invert = bool(invert)
        super().__init__(**kwargs)

    @property
    def cache_owner(self) -> str:
        digest = hashlib.sha1(self.pattern.encode("utf-8")).hexdigest()[:12]
        return f"regex:{digest}:{'invert' if self.invert else 'match'}"

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return np.array([(self._regex.search(t) is not None) != self.invert for t in texts], dtype=np.float64)
