"""Perspective API oracle (standard library only).

One HTTP request per text, spaced by a client-side rate limiter (Perspective's default
quota is 1 QPS). A request failing with 429, 5xx or a network error is retried with
exponential backoff; a text whose request still fails after ``max_retries`` retries, or
gets a non-retryable answer (e.g. 400 for an unsupported language, a malformed body),
is scored NaN — a masked label, never 0. A rejected key (401/403, or 400 "API key not
valid") raises ``PerspectiveAuthError``: every request would fail alike.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from regft_jax.oracles.base import Oracle, OracleError

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
DEFAULT_KEY_ENV = "PERSPECTIVE_API_KEY"


class PerspectiveAuthError(OracleError):
    """The API rejected the key or the project; retrying or masking would not help."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    pass


class RateLimiter:
    """Spaces ``acquire()`` calls at least ``1 / qps`` seconds apart (thread-safe)."""

    def __init__(self, qps: float):
        if not qps > 0:
            raise OracleError(f"perspective oracle: qps must be > 0, got {qps}")
        self.interval = 1.0 / qps
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        time.sleep(max(0.0, slot - now))


class PerspectiveOracle(Oracle):
    """``P(toxic)`` = ``attributeScores[attribute].summaryScore.value``.

    Args:
      api_key: the key; default: the environment variable named by ``api_key_env``.
      endpoint: the ``comments:analyze`` URL (e.g. a proxy, or a local test server).
      attribute: Perspective attribute (default ``TOXICITY``).
      languages: request languages (empty: let the API detect).
      qps: client-side request rate limit over all worker threads.
      max_retries: retries after the first attempt on 429/5xx/network errors.
      backoff_initial, backoff_max, backoff_jitter: retry ``k`` (0-based) waits
        ``min(backoff_max, backoff_initial * 2**k)`` seconds times a random factor in
        ``1 ± backoff_jitter``; a ``Retry-After`` header is honoured up to ``backoff_max``.
      timeout: per-request socket timeout (s). max_workers: concurrent requests.
    """

    name = "perspective"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_KEY_ENV,
        endpoint: str = DEFAULT_ENDPOINT,
        attribute: str = "TOXICITY",
        languages: tuple[str, ...] = ("en",),
        qps: float = 1.0,
        max_retries: int = 5,
        backoff_initial: float = 1.0,
        backoff_max: float = 32.0,
        backoff_jitter: float = 0.1,
        timeout: float = 10.0,
        max_workers: int = 1,
        batch_size: int = 64,
        **kwargs: Any,
    ):
        self._api_key = api_key or os.environ.get(api_key_env)
        if not self._api_key:
            raise OracleError(f"perspective oracle: no API key; set the environment variable {api_key_env}")
        parsed = urllib.parse.urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise OracleError(f"perspective oracle: endpoint must be an http(s) URL, got {endpoint!r}")
        if max_retries < 0 or max_workers < 1:
            raise OracleError("perspective oracle: need max_retries >= 0 and max_workers >= 1")
        self.endpoint, self.attribute, self.languages = endpoint, attribute.upper(), list(languages)
        self.max_retries, self.max_workers, self.timeout = int(max_retries), int(max_workers), float(timeout)
        self.backoff = (float(backoff_initial), float(backoff_max), float(backoff_jitter))
        self.limiter = RateLimiter(qps)
        self.requests_sent = 0
        self._count_lock = threading.Lock()
        # Loopback endpoints (tests, local proxies) ignore proxies set in the environment.
        local = parsed.hostname in ("127.0.0.1", "localhost", "::1")
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))
        super().__init__(batch_size=batch_size, **kwargs)

    @property
    def cache_owner(self) -> str:
        return f"perspective:{self.attribute}"

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        if self.max_workers == 1:
            return np.array([self.score_one(t) for t in texts])
        with ThreadPoolExecutor(self.max_workers) as pool:
            return np.array(list(pool.map(self.score_one, texts)))

    def score_one(self, text: str) -> float:
        """One text's score, with retries; NaN when it cannot be obtained."""
        initial, maximum, jitter = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                return self._request(text)
            except _Permanent as e:
                logger.warning("perspective: text masked as NaN: %s", e)
                return float("nan")
            except _Retryable as e:
                if attempt == self.max_retries:
                    logger.warning("perspective: %d attempts failed, text masked as NaN: %s", attempt + 1, e)
                    return float("nan")
                delay = min(maximum, initial * 2.0**attempt) * (1.0 + jitter * random.uniform(-1.0, 1.0))
                if e.retry_after is not None:
                    delay = max(delay, min(maximum, e.retry_after))
                logger.info("perspective: %s; retry %d in %.2fs", e, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, text: str) -> float:
        """One HTTP attempt; raises ``_Retryable``/``_Permanent``/``PerspectiveAuthError``."""
        body = {"comment": {"text": text}, "requestedAttributes": {self.attribute: {}}, "doNotStore": True}
        if self.languages:
            body["languages"] = self.languages
        request = urllib.request.Request(
            f"{self.endpoint}?{urllib.parse.urlencode({'key': self._api_key})}",
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        self.limiter.acquire()
        with self._count_lock:
            self.requests_sent += 1
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = _body(e)
            if e.code in (401, 403) or (e.code == 400 and "API key not valid" in detail):
                raise PerspectiveAuthError(f"perspective API rejected the request (HTTP {e.code}): {detail}") from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}", _retry_after((e.headers or {}).get("Retry-After"))) from None
            raise _Permanent(f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"network error: {e}") from None
        try:
            value = float(json.loads(payload)["attributeScores"][self.attribute]["summaryScore"]["value"])
        except (ValueError, KeyError, TypeError) as e:
            raise _Permanent(f"malformed response ({type(e).__name__}: {e}): {payload[:200]!r}") from None
        if not 0.0 <= value <= 1.0:
            raise _Permanent(f"score {value} outside [0, 1]")
        return value


def _body(error: urllib.error.HTTPError) -> str:
    try:
        return " ".join(error.read().decode("utf-8", "replace").split())[:300]
    except OSError:
        return ""


def _retry_after(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None  # an HTTP date: use the backoff schedule
