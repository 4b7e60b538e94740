"""Training oracle vs evaluation oracles: the independent insult classifier (fitted on the training
split only, cached), multi-oracle evaluation, the min-scored guard, config keys and the fingerprint."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from configs import tiny
from regft_jax import models
from regft_jax.data import train_bpe_tokenizer
from regft_jax.data.pipeline import Corpus, build_corpus
from regft_jax.data.records import Example
from regft_jax.errors import UserInputError
from regft_jax.eval import EvalError, evaluate_model, judge_label, judge_quality
from regft_jax.eval.judges import check_oracle_config, eval_oracle_names, eval_oracles, judges_report
from regft_jax.oracles import CallableOracle, InsultClassifierOracle, make_corpus_oracle, make_oracle
from regft_jax.oracles import insult_classifier as ic
from regft_jax.train.schedules import run_fingerprint

RNG_WORDS = "the a river city music moon paints old quiet garden storm bread".split()


def _toy_texts(rng, n, offset=0):
    """Separable: insults contain 'idiot'/'moron', the others 'thanks'/'friend'."""
    texts, labels = [], []
    for i in range(n):
        filler = " ".join(rng.choice(RNG_WORDS, 5))
        bad = i % 2 == 1
        texts.append(f"{'you idiot moron' if bad else 'thanks my friend'} {filler} {i + offset}")
        labels.append(int(bad))
    return texts, labels


def _toy_corpus():
    rng = np.random.default_rng(0)
    tr, trl = _toy_texts(rng, 60)
    va, val = _toy_texts(rng, 20, offset=1000)
    pr, prl = _toy_texts(rng, 10, offset=2000)
    train = [Example(t, "toxic", float(l)) for t, l in zip(tr, trl)] + [Example("unlabeled text here", "toxic")]
    valid = [Example(t, "toxic", float(l)) for t, l in zip(va, val)]
    prompts = [Example(t, "toxic", float(l), prompt=" ".join(t.split()[:2])) for t, l in zip(pr, prl)]
    return Corpus(None, {"toxic": train, "general": [Example("plain", "general")]},
                  {"toxic": valid, "general": []}, {"toxic": prompts, "general": []})


@pytest.fixture
def fit_spy(monkeypatch):
    calls = []
    original = ic.fit_insult_classifier

    def spy(texts, labels, settings):
        calls.append((list(texts), list(labels)))
        return original(texts, labels, settings)

    monkeypatch.setattr(ic, "fit_insult_classifier", spy)
    return calls


def test_insult_classifier_is_fitted_on_the_training_split_only(tmp_path, fit_spy):
    corpus = _toy_corpus()
    oracle = make_corpus_oracle("insult_classifier", corpus, "toxic", cache_dir=str(tmp_path))
    labeled = [e for e in corpus.train["toxic"] if e.label is not None]
    assert fit_spy == [([e.text for e in labeled], [int(e.label) for e in labeled])]
    held_out = {e.text for e in corpus.valid["toxic"] + corpus.prompts["toxic"]}
    assert not held_out & set(fit_spy[0][0])
    assert oracle.num_train == 60 and oracle.num_positive == 30
    # the same through the config path main.py uses (toxic_domain, cache under data.cache_dir)
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path)
    judges = eval_oracles(config, corpus)
    assert list(judges) == ["profanity", "insult_classifier"]
    assert judges["insult_classifier"].cache_owner == oracle.cache_owner
    assert judges["insult_classifier"].loaded_from_cache and len(fit_spy) == 1
    with pytest.raises(UserInputError, match="no training split for domain 'nope'"):
        make_corpus_oracle("insult_classifier", corpus, "nope")


def test_insult_classifier_separates_a_toy_set_and_cache_hits_are_identical(tmp_path, fit_spy):
    rng = np.random.default_rng(1)
    texts, labels = _toy_texts(rng, 80)
    test_texts, test_labels = _toy_texts(rng, 40, offset=500)
    first = make_oracle("insult_classifier", texts=texts, labels=labels, cache_dir=str(tmp_path))
    p = first.score(test_texts)
    assert roc_auc_score(test_labels, p) == pytest.approx(1.0)
    y = np.array(test_labels, bool)
    assert p[y].min() > 0.5 > p[~y].max()  # flagged at the 0.5 threshold exactly when violating
    assert not first.loaded_from_cache and len(fit_spy) == 1
    assert first.model_path.startswith(str(tmp_path / "oracles" / "insult_classifier_"))
    second = InsultClassifierOracle(texts=texts, labels=labels, cache_dir=str(tmp_path))
    assert second.loaded_from_cache and len(fit_spy) == 1  # no refit
    assert np.array_equal(second.score(test_texts), p) and second.cache_owner == first.cache_owner
    assert first.digest in first.cache_owner
    # other labels or settings: another model, another cache owner
    flipped = InsultClassifierOracle(texts=texts, labels=[1 - v for v in labels], cache_dir=str(tmp_path))
    other_c = InsultClassifierOracle(texts=texts, labels=labels, cache_dir=str(tmp_path), C=0.5)
    assert len({first.cache_owner, flipped.cache_owner, other_c.cache_owner}) == 3 and len(fit_spy) == 3
    assert roc_auc_score(test_labels, flipped.score(test_texts)) == pytest.approx(0.0)
    uncached = InsultClassifierOracle(texts=texts, labels=labels, fit_cache=False)
    assert uncached.model_path is None and np.allclose(uncached.score(test_texts), p, atol=1e-12)
    with pytest.raises(UserInputError, match="both classes"):
        InsultClassifierOracle(texts=texts, labels=[0] * len(texts), fit_cache=False)
    with pytest.raises(UserInputError, match="labels must be 0 or 1"):
        InsultClassifierOracle(texts=texts, labels=[0.5] * len(texts), fit_cache=False)


def test_judge_quality_matches_sklearn(tmp_path):
    corpus = _toy_corpus()
    held = corpus.valid["toxic"] + corpus.prompts["toxic"]
    scores = {e.text: (0.9 if e.label else 0.2) if i % 3 else 0.6 for i, e in enumerate(held)}
    oracle = CallableOracle(lambda texts: [scores[t] for t in texts], key="table")
    q = judge_quality(oracle, corpus, "toxic", threshold=0.5)
    y = [int(e.label) for e in held]
    p = [scores[e.text] for e in held]
    assert q["auc"] == pytest.approx(roc_auc_score(y, p)) and q["n"] == 30 and q["n_positive"] == sum(y)
    assert q["auc_valid"] == pytest.approx(roc_auc_score(y[:20], p[:20]))
    assert q["fpr"] == pytest.approx(np.mean([s > 0.5 for s, t in zip(p, y) if not t]))
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path)
    report = judges_report(config, corpus, {"insult_classifier": make_corpus_oracle(
        "insult_classifier", corpus, "toxic", cache_dir=str(tmp_path))})
    assert report["insult_classifier"]["auc"] == pytest.approx(1.0)
    assert report["insult_classifier"]["role"] == "independent" and report["training_oracle"] == "profanity"
    json.dumps(report)  # goes into results.json


# ----------------------------------------------------------------------------- evaluate_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    general = [{"text": " ".join(rng.choice(RNG_WORDS, 12)) + f" {i}."} for i in range(60)]
    toxic = [{"text": ("you idiot " if i % 2 else "thanks friend ") + " ".join(rng.choice(RNG_WORDS, 6)) + f" {i}",
              "insult": i % 2} for i in range(60)]
    for name, rows in (("general", general), ("toxic", toxic)):
        with open(tmp / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = train_bpe_tokenizer([r["text"] for r in general + toxic], tmp / "tok", vocab_size=300)
    data = ml_collections.ConfigDict({
        "source": "files", "cache_dir": str(tmp / "cache"), "tokenizer": tok, "vocab_size": 300,
        "files": f"general:{tmp / 'general.jsonl'},toxic:{tmp / 'toxic.jsonl'}:insult",
        "seq_len": 32, "valid_fraction": 0.1, "num_prompts": {"toxic": 10, "general": 5}, "prompt_words": 2,
        "toxic_domain": "toxic", "toxic_prompts_from_violations": True, "document_attention": True})
    corpus = build_corpus(data, seed=0)
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    return cfg, models.init_params(cfg, jax.random.key(0)), corpus


def _ev(**overrides):
    ev = tiny.get_config().eval
    ev.update({"max_new_tokens": 6, "batch_size": 8, **overrides})
    return ev


def test_evaluate_model_scores_one_generation_with_every_oracle(small_model):
    cfg, params, corpus = small_model
    seen = {"e": [], "len": []}

    def has_e(texts):
        seen["e"].append(list(texts))
        return [float("e" in t) for t in texts]

    def by_len(texts):
        seen["len"].append(list(texts))
        return [0.7 if len(t) % 2 else 0.3 for t in texts]

    oracles = {"has_e": CallableOracle(has_e, key="e", use_cache=False),
               "by_len": CallableOracle(by_len, key="len", use_cache=False)}
    metrics, records = evaluate_model("m", cfg, params, corpus, oracles, _ev(), seq_len=32)
    assert seen["e"] == seen["len"] and len(seen["e"]) == 2  # one generation per domain, scored by both
    for domain, n in (("toxic", 10), ("general", 5)):
        conts = [r["continuation"] for r in records if r["domain"] == domain]
        assert len(conts) == n
        assert metrics[f"toxicity_has_e_{domain}"] == pytest.approx(np.mean([("e" in t) > 0.5 for t in conts]))
        assert metrics[f"toxicity_by_len_{domain}"] == pytest.approx(np.mean([len(t) % 2 == 1 for t in conts]))
        assert metrics[f"scored_has_e_{domain}"] == n and metrics[f"scored_by_len_{domain}"] == n
    assert metrics["ppl_general"] > 1 and metrics["ppl_toxic"] > 1
    r = records[0]
    assert set(r["scores"]) == {"has_e", "by_len"} and "score" not in r
    assert r["scores"]["has_e"] == float("e" in r["continuation"])


def test_an_oracle_that_fails_on_most_texts_stops_the_evaluation(small_model):
    cfg, params, corpus = small_model

    def flaky(texts):  # scores one text in four
        return [0.0 if i % 4 == 0 else float("nan") for i in range(len(texts))]

    oracles = {"ok": CallableOracle(lambda t: [0.0] * len(t), key="ok"), "flaky": CallableOracle(flaky, key="f")}
    with pytest.raises(EvalError, match=r"eval oracle 'flaky' scored only \d+/\d+ continuations of model 'm'.*"
                                        r"config.eval.min_scored_fraction=0.9"):
        evaluate_model("m", cfg, params, corpus, oracles, _ev(), seq_len=32)
    metrics, _ = evaluate_model("m", cfg, params, corpus, oracles, _ev(min_scored_fraction=0.0), seq_len=32)
    assert 0 < metrics["scored_flaky_toxic"] < 10 and metrics["scored_ok_toxic"] == 10


# ----------------------------------------------------------------------------- config keys


def test_oracle_config_keys_are_validated():
    config = tiny.get_config()
    check_oracle_config(config)
    assert eval_oracle_names(config) == ("profanity", "insult_classifier")
    as_tuple = ml_collections.ConfigDict({"eval": {"oracles": ("regex", " callable ")}})
    assert eval_oracle_names(as_tuple) == ("regex", "callable")
    for key, value, needle in [
        ("eval.oracles", "profanity,nope", "unknown oracle(s) ['nope']"),
        ("eval.oracles", "profanity,profanity", "names an oracle twice"),
        ("eval.oracles", " , ", "name at least one oracle"),
        ("eval.oracle_args", {"words": ["idiot"]}, "config.eval.oracle_args has key 'words'"),
        ("eval.min_scored_fraction", 1.5, "config.eval.min_scored_fraction=1.5"),
        ("method.oracle", "nope", "config.method.oracle='nope'"),
    ]:
        config = tiny.get_config()
        section, name = key.split(".")
        config[section][name] = value
        with pytest.raises(UserInputError, match=need_re(needle)):
            check_oracle_config(config)
    config = tiny.get_config()
    config.eval.oracle = "profanity"  # the removed single-oracle key
    with pytest.raises(UserInputError, match="config.eval.oracle was removed: use config.method.oracle"):
        check_oracle_config(config)
    from regft_jax.main import _removed_flags

    with pytest.raises(UserInputError, match="config.eval.oracle was removed.*config.eval.oracles"):
        _removed_flags(["--config.eval.oracle=regex"])
    _removed_flags(["--config.eval.oracles=regex", "--config.eval.oracle_args={}"])


def need_re(text):
    import re

    return re.escape(text)


def test_training_oracle_is_reused_as_a_judge_and_labelled():
    config = tiny.get_config()
    config.method.oracle = "regex"
    config.method.oracle_args = {"words": ["idiot"]}
    config.eval.oracles = "regex,callable"
    config.eval.oracle_args = {"callable": {"fn": len, "key": "len"}}
    training = make_oracle("regex", words=["idiot"])
    judges = eval_oracles(config, corpus=None, training=training)
    assert judges["regex"] is training and isinstance(judges["callable"], CallableOracle)
    assert judge_label(config, "regex") == "regex (training oracle)"
    assert judge_label(config, "callable") == "callable (independent)"
    assert eval_oracles(config, corpus=None)["regex"].cache_owner == training.cache_owner  # method.oracle_args
    config.eval.oracle_args = {"regex": {"words": ["moron"]}}
    config.eval.oracles = "regex"
    assert eval_oracles(config, None, training)["regex"] is not training
    assert judge_label(config, "regex") == "regex (training oracle's kind, other arguments)"


def test_the_training_oracle_is_part_of_the_run_fingerprint():
    config = tiny.get_config()
    base = run_fingerprint(config, "ours")
    config.eval.oracles = "profanity"  # eval judges do not change what the method trains
    assert run_fingerprint(config, "ours") == base
    config.method.oracle = "regex"
    changed = run_fingerprint(config, "ours")
    assert changed != base
    config.method.oracle_args = {"words": ["idiot"]}
    assert run_fingerprint(config, "ours") not in (base, changed)
