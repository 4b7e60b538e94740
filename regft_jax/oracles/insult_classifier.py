"""An independent offline judge: character n-gram logistic regression fitted by the project.

The ``profanity`` oracle is a word-level linear SVM trained on Jigsaw comments and tweets. This one
shares neither its training data nor its features: sublinear TF-IDF over hashed character n-grams
(``char_wb``, 2-5 by default) and an L2 logistic regression (scikit-learn), fitted on the labeled
examples of the corpus's toxic-domain **training split only** (``corpus.train[domain]``; never the
held-out ``corpus.valid`` or the evaluation prompts). ``P(violation)`` is the regression's
probability with the classes re-weighted to equal mass (``class_weight="balanced"``): a 0.5
threshold is then the equal-prior decision (on the offline corpus's held-out comments: 75% of
insults and 7% of the others flagged; unweighted, only 55% of insults clear 0.5).

    oracle = InsultClassifierOracle.from_corpus(corpus, "toxic", cache_dir="~/.cache/regft_jax")
    oracle = make_oracle("insult_classifier", texts=texts, labels=labels)   # the same, from lists

The fitted model (IDF weights, coefficients, intercept) is cached as ``.npz`` under
``<cache_dir>/oracles/``, keyed by a hash of the training texts, labels and settings; the hash is
also part of ``cache_owner``, so label caches of differently fitted classifiers never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from regft_jax.oracles.base import Oracle, OracleError

FORMAT = "regft_jax.insult_classifier/1"


def training_set(corpus, domain: str) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels (label >= 0.5 → 1) of the labeled examples of ``corpus.train[domain]``."""
    if domain not in corpus.train:
        raise OracleError(f"insult_classifier: the corpus has no training split for domain {domain!r} "
                          f"(domains: {sorted(corpus.train)}; config.data.toxic_domain)")
    labeled = [e for e in corpus.train[domain] if e.label is not None]
    return [e.text for e in labeled], [int(float(e.label) >= 0.5) for e in labeled]


def _hashing_vectorizer(settings: dict):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer=settings["analyzer"], ngram_range=tuple(settings["ngram_range"]),
                             n_features=settings["n_features"], lowercase=settings["lowercase"],
                             alternate_sign=False, norm=None)


def _features(vectorizer, idf: np.ndarray, texts: Sequence[str], sublinear_tf: bool):
    """Hashed n-gram counts → (1 + log tf) · idf → L2-normalized rows (= sklearn's TfidfTransformer)."""
    from sklearn.preprocessing import normalize

    x = vectorizer.transform(texts).astype(np.float64)
    if sublinear_tf:
        np.log(x.data, out=x.data)
        x.data += 1.0
    x = x.multiply(idf[None, :]).tocsr()
    return normalize(x, norm="l2", copy=False)


def fit_insult_classifier(texts: Sequence[str], labels: Sequence[int], settings: dict) -> dict[str, np.ndarray]:
    """Fit on (texts, labels): {"idf": [n_features], "coef": [n_features], "intercept": [1]} (float64)."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression

    vectorizer = _hashing_vectorizer(settings)
    idf = TfidfTransformer(sublinear_tf=settings["sublinear_tf"]).fit(vectorizer.transform(texts)).idf_
    x = _features(vectorizer, np.asarray(idf, np.float64), texts, settings["sublinear_tf"])
    model = LogisticRegression(C=settings["C"], class_weight=settings["class_weight"], solver="liblinear",
                               max_iter=settings["max_iter"], random_state=0)
    model.fit(x, np.asarray(labels, np.int64))
    return {"idf": np.asarray(idf, np.float64), "coef": np.asarray(model.coef_[0], np.float64),
            "intercept": np.asarray(model.intercept_, np.float64)}


def _digest(texts: Sequence[str], labels: Sequence[int], settings: dict) -> str:
    import sklearn

    h = hashlib.sha256(json.dumps({"format": FORMAT, "sklearn": sklearn.__version__, "settings": settings},
                                  sort_keys=True).encode())
    for text, label in zip(texts, labels):
        h.update(json.dumps([text, label]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


class InsultClassifierOracle(Oracle):
    """``P(insult)`` from a char n-gram logistic regression fitted on ``(texts, labels)``; never NaN.

    Args:
      texts, labels: the training examples (labels 0/1, 1 = violation; both classes needed).
      cache_dir: the data cache root (default ``regft_jax.data.offline.default_cache_dir()``); the
        fitted model lives in ``<cache_dir>/oracles/insult_classifier_<hash>.npz``.
      fit_cache: read/write that file (False: always fit in memory).
      ngram_range, analyzer, n_features, lowercase, sublinear_tf: the features.
      C, class_weight, max_iter: the logistic regression (``class_weight=None`` keeps the training
        split's class prior in the probabilities, which makes a 0.5 threshold conservative).
    """

    name = "insult_classifier"

    def __init__(self, *, texts: Sequence[str], labels: Sequence[float], cache_dir: str | None = None,
                 fit_cache: bool = True, ngram_range: Sequence[int] = (2, 5), analyzer: str = "char_wb",
                 n_features: int = 2**18, lowercase: bool = True, sublinear_tf: bool = True, C: float = 4.0,
                 class_weight: str | None = "balanced", max_iter: int = 1000, batch_size: int = 4096,
                 **kwargs: Any):  # fmt: skip
        texts, labels = list(texts), [float(v) for v in labels]
        if len(texts) != len(labels):
            raise OracleError(f"insult_classifier: {len(texts)} texts but {len(labels)} labels")
        if any(not isinstance(t, str) for t in texts):
            raise OracleError("insult_classifier: every training text must be a str")
        if any(v not in (0.0, 1.0) for v in labels):
            raise OracleError("insult_classifier: labels must be 0 or 1 (1 = violation)")
        labels = [int(v) for v in labels]
        if len(set(labels)) < 2:
            raise OracleError(f"insult_classifier: the training labels need both classes, got {len(texts)} "
                              f"examples all labeled {labels[0] if labels else '-'}")
        ngram_range = tuple(int(n) for n in ngram_range)
        if len(ngram_range) != 2 or not 1 <= ngram_range[0] <= ngram_range[1]:
            raise OracleError(f"insult_classifier: ngram_range must be (min, max) with 1 <= min <= max, "
                              f"got {ngram_range}")
        if class_weight not in (None, "balanced"):
            raise OracleError(f"insult_classifier: class_weight must be None or 'balanced', got {class_weight!r}")
        self.settings = {"analyzer": str(analyzer), "ngram_range": list(ngram_range), "n_features": int(n_features),
                         "lowercase": bool(lowercase), "sublinear_tf": bool(sublinear_tf), "C": float(C),
                         "class_weight": class_weight, "max_iter": int(max_iter)}
        self.num_train, self.num_positive = len(texts), int(sum(labels))
        self.digest = _digest(texts, labels, self.settings)
        self.loaded_from_cache = False
        self.model_path = None
        if fit_cache:
            if cache_dir is None:
                from regft_jax.data.offline import default_cache_dir

                cache_dir = default_cache_dir()
            self.model_path = os.path.join(os.path.expanduser(os.fspath(cache_dir)), "oracles",
                                           f"insult_classifier_{self.digest}.npz")
        arrays = self._load() if self.model_path else None
        if arrays is None:
            arrays = fit_insult_classifier(texts, labels, self.settings)
            if self.model_path:
                self._save(arrays)
        else:
            self.loaded_from_cache = True
        self._idf, self._coef, self._intercept = arrays["idf"], arrays["coef"], float(arrays["intercept"][0])
        self._vectorizer = _hashing_vectorizer(self.settings)
        super().__init__(batch_size=batch_size, **kwargs)

    @classmethod
    def from_corpus(cls, corpus, domain: str, **kwargs: Any) -> InsultClassifierOracle:
        """Fitted on the labeled examples of ``corpus.train[domain]`` (never valid or prompts)."""
        texts, labels = training_set(corpus, domain)
        return cls(texts=texts, labels=labels, **kwargs)

    @property
    def cache_owner(self) -> str:
        return f"insult_classifier:{self.digest}"

    def _load(self) -> dict[str, np.ndarray] | None:
        if not os.path.exists(self.model_path):
            return None
        try:
            with np.load(self.model_path, allow_pickle=False) as f:
                if str(f["format"]) != FORMAT or str(f["digest"]) != self.digest:
                    raise OracleError(f"insult_classifier model {self.model_path}: written for another "
                                      f"configuration (delete it to refit)")
                return {k: np.asarray(f[k], np.float64) for k in ("idf", "coef", "intercept")}
        except (OSError, ValueError, KeyError) as e:
            raise OracleError(f"insult_classifier model {self.model_path}: unreadable ({e}); delete it to refit") \
                from None

    def _save(self, arrays: dict[str, np.ndarray]) -> None:
        directory = os.path.dirname(self.model_path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, format=np.array(FORMAT), digest=np.array(self.digest), **arrays)
            os.replace(tmp, self.model_path)
        except BaseException:
            os.remove(tmp)
            raise

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        x = _features(self._vectorizer, self._idf, texts, self.settings["sublinear_tf"])
        z = np.asarray(x @ self._coef, np.float64) + self._intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow


def from_corpus(corpus, domain: str, **kwargs: Any) -> InsultClassifierOracle:
    """The registry's corpus factory: ``InsultClassifierOracle.from_corpus``."""
    return InsultClassifierOracle.from_corpus(corpus, domain, **kwargs)
