"""No leakage between training, validation and evaluation prompts; deduplication on normalized
text; one-line errors naming the config key (corpus domains, tokenizer vs model vocabulary)."""

import json
from collections import Counter

import ml_collections
import pytest

from configs import tiny
from regft_jax.data import train_bpe_tokenizer
from regft_jax.data.mixture import (
    check_disjoint,
    dedup_examples,
    drop_prompt_overlaps,
    normalize_text,
    prompt_of,
)
from regft_jax.data.offline import CORPUS_FILE, INSULTS_GLOB, GENSIM_GLOB, default_cache_dir, load_offline_corpus
from regft_jax.data.pipeline import build_corpus, check_domains, check_vocab
from regft_jax.data.records import Example
from regft_jax.errors import UserInputError

FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [" ".join(FILLER[i:] + FILLER[:i]) + " you idiot thanks friend hello world 0123456789 ,.!?"
             for i in range(len(FILLER))]
    return train_bpe_tokenizer(texts * 5, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300)


def _filler(i: int) -> str:
    return " ".join(FILLER[(i + j * 5) % len(FILLER)] for j in range(4)) + f" {i}"


def _corpus(tmp_path, tok, general, toxic, **data):
    """general / toxic: lists of (text, insult label) written as jsonl and loaded via data.source="files"."""
    for name, rows in (("general", general), ("toxic", toxic)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t, "insult": y}) + "\n" for t, y in rows)
    config = ml_collections.ConfigDict({
        "source": "files", "cache_dir": str(tmp_path / "cache"), "tokenizer": tok, "vocab_size": 300,
        "files": f"general:{tmp_path / 'general.jsonl'}:insult,toxic:{tmp_path / 'toxic.jsonl'}:insult",
        "seq_len": 32, "valid_fraction": 0.0, "num_prompts": {"toxic": 0, "general": 0}, "prompt_words": 2,
        "toxic_domain": "toxic", "toxic_prompts_from_violations": True})
    config.update(data)
    return build_corpus(config, seed=0)


def _all_texts(corpus, d):
    return [e.text for part in (corpus.train, corpus.valid, corpus.prompts) for e in part[d]]


def test_normalize_text():
    assert normalize_text("  Hello,\tWORLD!!  ") == normalize_text("hello world") == "hello world"
    assert normalize_text("Grüße aus KÖLN — 東京 😀!") == "grüsse aus köln 東京"
    assert normalize_text("cafe\u0301") == normalize_text("café") == "café"  # NFKC, marks kept
    assert normalize_text("snake_case don't") == "snake case don t"
    assert prompt_of("  a b\nc d ", 3) == "a b c" and prompt_of("a b", None) == "a b"


def test_duplicates_differing_in_case_space_punctuation_are_kept_once(tmp_path, tok):
    general = [("Hello, World!", 0), ("hello   world", 0), ("HELLO WORLD?!", 0)]
    general += [(_filler(i), 0) for i in range(10)]
    toxic = [(f"you idiot {i}", 1) for i in range(5)] + [("You idiot 3!", 1), ("thanks friend", 0)]
    corpus = _corpus(tmp_path, tok, general, toxic)
    texts = _all_texts(corpus, "general")
    assert "Hello, World!" in texts and "hello   world" not in texts and "HELLO WORLD?!" not in texts
    assert len(texts) == 11 and len(_all_texts(corpus, "toxic")) == 6
    assert corpus.dropped["general"] == {"duplicates": 2, "cross_domain": 0, "prompt_overlap": 0}
    assert corpus.dropped["toxic"]["duplicates"] == 1
    assert "general: 11 train / 0 valid / 0 prompts (dropped 2 duplicates" in corpus.summary()


def test_cross_domain_duplicate_kept_in_the_toxic_domain_only(tmp_path, tok):
    general = [("You are a total idiot!", 0)] + [(_filler(i), 0) for i in range(10)]
    toxic = [("you are a TOTAL idiot", 1), ("thanks friend", 0), ("you idiot", 1)]
    corpus = _corpus(tmp_path, tok, general, toxic)
    assert "You are a total idiot!" not in _all_texts(corpus, "general")
    assert "you are a TOTAL idiot" in _all_texts(corpus, "toxic")
    assert corpus.dropped["general"]["cross_domain"] == 1 and corpus.dropped["toxic"]["cross_domain"] == 0
    # The rule does not depend on the order of the input: the preferred domain, else alphabetical.
    a, b, c = Example("Same text.", "b"), Example("same text", "a"), Example("SAME TEXT", "c")
    for order in ([a, b, c], [c, b, a]):
        assert dedup_examples(order)[0] == [b]
        assert dedup_examples(order, prefer_domain="c")[0] == [c]
    kept, dropped = dedup_examples([a, Example("same, text", "b"), b])
    assert kept == [b] and dropped == {"a": {"duplicates": 0, "cross_domain": 0},
                                       "b": {"duplicates": 0, "cross_domain": 2}}


def test_training_example_with_an_eval_prompt_as_prompt_is_removed(tmp_path, tok):
    # Every insult starts "you idiot", so the toxic eval prompts (prompt_words=2) are all "you idiot";
    # the insults left in train, and a general text starting "You, idiot!", would be sampled from it.
    toxic = [(f"you idiot {_filler(i)}", 1) for i in range(12)] + [(f"thanks friend {_filler(i)}", 0)
                                                                  for i in range(12)]
    general = [("You, idiot! what a day", 0)] + [(_filler(i), 0) for i in range(20)]
    corpus = _corpus(tmp_path, tok, general, toxic, num_prompts={"toxic": 3, "general": 2})
    assert {p.prompt for p in corpus.prompts["toxic"]} == {"you idiot"}
    assert not any(e.text.startswith("you idiot") for e in corpus.train["toxic"])
    assert "You, idiot! what a day" not in [e.text for e in corpus.train["general"]]
    assert "You, idiot! what a day" not in [e.text for e in corpus.prompts["general"] + corpus.valid["general"]]
    assert corpus.dropped["toxic"]["prompt_overlap"] == 9 and corpus.dropped["general"]["prompt_overlap"] >= 1
    assert len(corpus.train["toxic"]) == 12
    held = {normalize_text(p.prompt) for d in corpus.domains for p in corpus.prompts[d]}
    for d in corpus.domains:
        assert not any(normalize_text(prompt_of(e.text, 2)) in held for e in corpus.train[d])


def test_training_text_starting_with_an_eval_prompt_is_removed(tmp_path, tok):
    # A short eval prompt ("retard", fewer words than prompt_words) leaks into every training text
    # that starts with it as whole words, whatever that text's own first prompt_words words are.
    retard = Example("Retard", "toxic", 1.0, prompt="retard")
    idiot = Example("you idiot", "toxic", 1.0, prompt="You idiot")
    train = [Example(t, "toxic") for t in ("Retard, you are.", "retardation is a word", "retard",
                                           "you IDIOT, really", "you idiots", "thanks friend")]
    kept, n = drop_prompt_overlaps(train, [retard, idiot], 2)
    assert [e.text for e in kept] == ["retardation is a word", "you idiots", "thanks friend"] and n == 3
    # Also with prompts longer than prompt_words (a prompt that is a whole short text).
    long = Example("you are a total idiot", "toxic", 1.0, prompt="you are a total idiot")
    kept, n = drop_prompt_overlaps([Example("You are a TOTAL idiot, bye", "t"), Example("you are a total", "t"),
                                    Example("you are a total idiots", "t")], [long], 2)
    assert [e.text for e in kept] == ["you are a total", "you are a total idiots"] and n == 1
    # Through build_corpus: the one-word insult "Retard" becomes an eval prompt of its whole text.
    toxic = [("Retard", 1), ("retard, you are", 0), ("retardation happens", 0), ("thanks friend", 0)]
    corpus = _corpus(tmp_path, tok, [(_filler(i), 0) for i in range(5)], toxic,
                     num_prompts={"toxic": 1, "general": 0})
    assert [p.prompt for p in corpus.prompts["toxic"]] == ["Retard"]
    assert [e.text for e in corpus.train["toxic"]] == ["retardation happens", "thanks friend"]
    assert corpus.dropped["toxic"]["prompt_overlap"] == 1


def test_checks_compare_normalized_text():
    train = [Example("Hello world, friend.", "t")]
    with pytest.raises(UserInputError, match="'valid' and 'train' share the example 'hello WORLD friend'"):
        check_disjoint(train, valid=[Example("hello WORLD friend", "t")])
    check_disjoint(train, valid=[Example("hello world friends", "t")])
    assert drop_prompt_overlaps(train, [Example("hello, world! bye", "t", prompt="Hello world")], 2) == ([], 1)
    assert drop_prompt_overlaps(train, [Example("hello there", "t", prompt="hello there")], 2) == (train, 0)


def test_errors_name_the_key(tmp_path, tok):
    general = [(_filler(i), 0) for i in range(5)]
    toxic = [("you idiot", 1), ("thanks friend", 0)]
    with pytest.raises(UserInputError, match=r"^config.data.toxic_domain='xyz': expected one of \['general', 'toxic'\]$"):
        _corpus(tmp_path, tok, general, toxic, toxic_domain="xyz")
    with pytest.raises(UserInputError, match=r"config.data: domains \['toxic'\] have no training examples left"):
        _corpus(tmp_path, tok, general, toxic, num_prompts={"toxic": 1, "general": 0}, valid_fraction=0.5)

    check_vocab(300, 300)
    check_vocab(300, 512)
    with pytest.raises(UserInputError, match=r"^config.model.path='/m' / config.data.tokenizer: tokenizer "
                                             r"vocabulary 300 is larger than the model's vocab_size 256 "
                                             r"\(token ids >= 256 would index past the embedding\)$"):
        check_vocab(300, 256, model_key="config.model.path='/m'")

    check_domains("method.sample_domains", ("toxic",), ["general", "toxic"])
    with pytest.raises(UserInputError, match=r"^config.method.sample_domains=\('x',\): unknown domains \['x'\] "
                                             r"\(the corpus has \['general', 'toxic'\]\)$"):
        check_domains("method.sample_domains", ("x",), ["toxic", "general"])
    with pytest.raises(UserInputError, match="config.method.sample_domains='toxic': expected a tuple"):
        check_domains("config.method.sample_domains", "toxic", ["toxic"])
    with pytest.raises(UserInputError, match=r"config.method.sample_domains=\(\): expected at least one"):
        check_domains("method.sample_domains", (), ["toxic"])


def test_base_model_checks_the_loaded_model_vocab(monkeypatch):
    from regft_jax.models import ModelConfig
    from regft_jax.train import base_model as bm

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    monkeypatch.setattr(bm, "model_from_config", lambda *a, **k: (cfg, None))
    config = ml_collections.ConfigDict({"seed": 0, "model": {"source": "hf", "path": "/m"}})
    corpus = type("C", (), {"tokenizer": type("T", (), {"vocab_size": 300})()})()
    with pytest.raises(UserInputError, match=r"config.model.path='/m' / config.data.tokenizer: tokenizer vocabulary 300"):
        bm.base_model(config, None, corpus)
    corpus.tokenizer.vocab_size = 256
    assert bm.base_model(config, None, corpus)[0] is cfg


# ----------------------------------------------------------------------------- the real offline corpus


@pytest.fixture(scope="module")
def offline():
    cache = default_cache_dir()
    downloads = cache / "downloads"
    if not (cache / CORPUS_FILE).is_file() and not (any(downloads.glob(GENSIM_GLOB))
                                                    and any(downloads.glob(INSULTS_GLOB))):
        pytest.skip(f"the offline corpus is not in {cache} (run the tiny config once to fetch it)")
    data = tiny.get_config().data
    return data, build_corpus(data, seed=0), load_offline_corpus(data.cache_dir or None)


def test_offline_corpus_has_no_leakage(offline):
    data, corpus, examples = offline
    k = data.prompt_words
    n = normalize_text
    train = {n(e.text) for d in corpus.domains for e in corpus.train[d]}
    valid = {n(e.text) for d in corpus.domains for e in corpus.valid[d]}
    prompts = [p for d in corpus.domains for p in corpus.prompts[d]]
    sources, eval_prompts = {n(p.text) for p in prompts}, {n(p.prompt) for p in prompts}
    sampling = {n(" ".join(e.text.split()[:k])) for d in corpus.domains for e in corpus.train[d]}
    assert len(prompts) == sum(dict(data.num_prompts).values())
    assert not train & sources and not train & eval_prompts
    assert not sampling & eval_prompts
    starts = {" ".join(t.split()[:j]) for t in train for j in range(1, max(len(p.split()) for p in eval_prompts) + 1)}
    assert not starts & eval_prompts  # no training text starts with an eval prompt (whole words)
    assert not valid & train and not valid & sources
    # Every normalized text is in exactly one place, and everything is accounted for.
    everywhere = [n(e.text) for d in corpus.domains for part in (corpus.train, corpus.valid, corpus.prompts)
                  for e in part[d]]
    assert len(everywhere) == len(set(everywhere))
    loaded = Counter(e.domain for e in examples)
    for d in corpus.domains:
        kept = len(corpus.train[d]) + len(corpus.valid[d]) + len(corpus.prompts[d])
        assert kept + sum(corpus.dropped[d].values()) == loaded[d]
    assert corpus.dropped["toxic"]["duplicates"] > 0  # the insults data has near-duplicate comments
