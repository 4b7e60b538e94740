"""Oracles: the shared interface and label cache, profanity, callable/regex, Perspective (fake server)."""

import http.server
import json
import threading

import numpy as np
import pytest

from regft_jax.errors import UserInputError
from regft_jax.oracles import (
    CallableOracle,
    LabelCache,
    OracleError,
    PerspectiveAuthError,
    PerspectiveOracle,
    RegexOracle,
    available_oracles,
    make_oracle,
)


class CountingFn:
    """A scoring function that records every batch it is called with."""

    def __init__(self, score=lambda t: min(1.0, len(t) / 10)):
        self.batches, self.score = [], score

    def __call__(self, texts):
        self.batches.append(list(texts))
        return [self.score(t) for t in texts]


# ----------------------------------------------------------------------------- interface, cache


def test_score_batches_dedupes_and_caches():
    fn = CountingFn()
    oracle = CallableOracle(fn, batch_size=2)
    texts = ["abc", "", "abcdefghijklmnop", "abc", "xy"]
    scores = oracle.score(texts)
    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(scores, [0.3, 0.0, 1.0, 0.3, 0.2], atol=1e-7)
    assert fn.batches == [["abc", ""], ["abcdefghijklmnop", "xy"]]  # unique texts, <= batch_size each
    np.testing.assert_allclose(oracle.satisfies(["abc", "xy"]), [0.7, 0.8], atol=1e-7)
    assert len(fn.batches) == 2, "cache hits must not call the backend"
    oracle.score(["abc", "new"])
    assert fn.batches[-1] == ["new"]
    assert oracle.stats.cache_hits == 3 and oracle.stats.texts_scored == 5
    assert oracle.score([]).shape == (0,)
    with pytest.raises(TypeError, match="not one str"):
        oracle.score("abc")
    uncached = CallableOracle(fn := CountingFn(), use_cache=False)
    uncached.score(["a"]), uncached.score(["a"])
    assert fn.batches == [["a"], ["a"]]


def test_nan_is_masked_and_not_cached():
    fn = CountingFn(lambda t: float("nan") if "fail" in t else 0.0)
    oracle = CallableOracle(fn)
    scores = oracle.score(["ok", "please fail"])
    assert scores[0] == 0.0 and np.isnan(scores[1])
    assert oracle.stats.failures == 1 and len(oracle.cache) == 1
    oracle.score(["ok", "please fail"])
    assert fn.batches[-1] == ["please fail"]  # the failed text is retried, the good one cached


def test_cache_persists_reloads_and_refuses_other_configs(tmp_path):
    path = tmp_path / "sub" / "labels.json"
    fn = CountingFn()
    oracle = CallableOracle(fn, key="len10", cache_path=str(path))
    oracle.score(["Ünïcödé 🙂", "a\x00b", "x", "never"])
    oracle.save_cache()
    again = CallableOracle(fn2 := CountingFn(), key="len10", cache_path=str(path))
    np.testing.assert_array_equal(again.score(["Ünïcödé 🙂", "a\x00b", "x"]), oracle.score(["Ünïcödé 🙂", "a\x00b", "x"]))
    assert fn2.batches == []
    with pytest.raises(OracleError, match="written by oracle 'callable:len10:violation', not 'callable:other"):
        CallableOracle(fn, key="other", cache_path=str(path))
    with pytest.raises(OracleError, match="written by oracle"):
        CallableOracle(fn, key="len10", satisfaction=True).load_cache(path)
    regex = RegexOracle(words=["bad"])
    with pytest.raises(OracleError, match="written by oracle"):
        regex.load_cache(path)
    with pytest.raises(OracleError, match="must end in .json"):
        oracle.save_cache(tmp_path / "labels.npz")
    (tmp_path / "junk.json").write_text('{"labels": {}}')
    with pytest.raises(OracleError, match="key 'format'"):
        oracle.load_cache(tmp_path / "junk.json")
    cache = LabelCache("me")
    cache.update({"a": 0.5, "b": float("nan")})
    assert len(cache) == 1


def test_bad_backend_output_and_options():
    with pytest.raises(OracleError, match="outside"):
        CallableOracle(lambda texts: [2.0] * len(texts)).score(["a"])
    with pytest.raises(OracleError, match=r"shape \(1,\) for 2 texts"):
        CallableOracle(lambda texts: [0.0]).score(["a", "b"])
    with pytest.raises(OracleError, match="batch_size"):
        CallableOracle(len, batch_size=0)
    with pytest.raises(OracleError, match="unknown oracle 'nope'; valid names: callable, hf_classifier"):
        make_oracle("nope")
    assert issubclass(OracleError, UserInputError) and issubclass(PerspectiveAuthError, UserInputError)
    assert set(available_oracles()) == {"profanity", "hf_classifier", "perspective", "callable", "regex",
                                       "insult_classifier"}


# ----------------------------------------------------------------------------- callable / regex


def test_callable_oracle_with_satisfaction_scores():
    oracle = make_oracle("callable", fn=lambda texts: [1.0 if "kind" in t else 0.25 for t in texts],
                         satisfaction=True, key="kindness")  # fmt: skip
    np.testing.assert_allclose(oracle.score(["be kind", "whatever"]), [0.0, 0.75])
    assert oracle.cache_owner == "callable:kindness:satisfaction"


def test_regex_oracle_words_file_patterns_invert(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# slurs and insults\nidiot\n\nf*ck\nshut up\n")
    oracle = make_oracle("regex", words_file=str(words), words=["Moron"], patterns=[r"\bh[a@]te\b"])
    texts = ["You IDIOT!", "idiotic plan", "f*ck this", "please shut up now", "I h@te it", "morons", "fine"]
    np.testing.assert_array_equal(oracle.score(texts), [1, 0, 1, 1, 1, 0, 0])
    required = RegexOracle(patterns="please", invert=True)
    np.testing.assert_array_equal(required.score(["please stop", "stop"]), [0, 1])
    assert required.cache_owner != RegexOracle(patterns="please").cache_owner
    with pytest.raises(OracleError, match="needs words"):
        RegexOracle()
    with pytest.raises(OracleError, match="invalid pattern"):
        RegexOracle(patterns="(")


# ----------------------------------------------------------------------------- profanity


def test_profanity_orders_obvious_cases():
    pytest.importorskip("profanity_check")
    oracle = make_oracle("profanity")
    profane = ["you are a fucking idiot", "shut up you stupid bitch", "this is shit"]
    benign = ["have a nice day", "the weather is lovely this morning", "thanks for your help"]
    scores = oracle.score(profane + benign)
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    assert scores[:3].min() > 0.5 > scores[3:].max()
    assert oracle.cache_owner.startswith("profanity:alt-profanity-check==")


# ----------------------------------------------------------------------------- perspective


class FakePerspective(http.server.BaseHTTPRequestHandler):
    """Scores = len(text) / 100; texts containing "500"/"429"/"400"/"garbage" fail like that."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakePerspective.requests.append((self.path, body))
        text = body["comment"]["text"]
        if self.path.split("key=")[1] == "bad":
            return self._reply(400, {"error": {"message": "API key not valid.\nPlease pass a valid key."}})
        for code in (500, 429, 400):
            if str(code) in text:
                return self._reply(code, {"error": {"code": code}}, {"Retry-After": "0"} if code == 429 else {})
        if "garbage" in text:
            return self._reply(200, {"attributeScores": {}})
        self._reply(200, {"attributeScores": {"TOXICITY": {"summaryScore": {"value": len(text) / 100}}}})

    def _reply(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakePerspective)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1alpha1/comments:analyze"
    server.shutdown()
    thread.join()


FAST = dict(api_key="k", qps=1000.0, backoff_initial=0.001, backoff_max=0.01, backoff_jitter=0.0)


def test_perspective_parses_scores(endpoint):
    FakePerspective.requests.clear()
    oracle = make_oracle("perspective", endpoint=endpoint, max_workers=3, **FAST)
    texts = ["hello", "a" * 40, "x"]
    np.testing.assert_allclose(oracle.score(texts), [0.05, 0.4, 0.01], atol=1e-7)
    path, body = FakePerspective.requests[0]
    assert "key=k" in path and body["requestedAttributes"] == {"TOXICITY": {}} and body["doNotStore"]
    assert body["languages"] == ["en"]


def test_perspective_retries_with_backoff_then_masks(endpoint, monkeypatch):
    import regft_jax.oracles.perspective as perspective

    sleeps = []
    monkeypatch.setattr(perspective.time, "sleep", lambda s: sleeps.append(s))
    oracle = PerspectiveOracle(endpoint=endpoint, max_retries=3, **{**FAST, "qps": 1e9})
    FakePerspective.requests.clear()
    scores = oracle.score(["fine", "boom 500", "slow down 429", "bad request 400", "garbage"])
    assert scores[0] == pytest.approx(0.04) and np.isnan(scores[1:]).all(), "failures are NaN, never 0"
    sent = [body["comment"]["text"] for _, body in FakePerspective.requests]
    assert sent.count("boom 500") == 4 and sent.count("slow down 429") == 4  # 1 try + 3 retries
    assert sent.count("bad request 400") == 1 and sent.count("garbage") == 1  # not retryable
    backoff = [s for s in sleeps if s > 0]
    assert backoff == pytest.approx([0.001, 0.002, 0.004] * 2)  # exponential, per text
    assert oracle.stats.failures == 4 and len(oracle.cache) == 1


def test_perspective_key_errors(endpoint, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(OracleError, match="set the environment variable PERSPECTIVE_API_KEY"):
        PerspectiveOracle()
    with pytest.raises(OracleError, match="MY_KEY"):
        PerspectiveOracle(api_key_env="MY_KEY")
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "bad")
    oracle = PerspectiveOracle(endpoint=endpoint, **{**FAST, "api_key": None})
    with pytest.raises(PerspectiveAuthError, match=r"HTTP 400\): .*API key not valid"):
        oracle.score(["hi"])


def test_rate_limiter_spaces_requests(endpoint):
    import time

    oracle = PerspectiveOracle(endpoint=endpoint, **{**FAST, "qps": 50.0})
    start = time.monotonic()
    oracle.score([f"text {i}" for i in range(6)])
    assert time.monotonic() - start >= 5 / 50 - 1e-3
