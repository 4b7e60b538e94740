"""Corpus pipeline, perplexity, toxicity evaluation and the `base` stage of the entry point."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from regft_jax import models
from regft_jax.data import train_bpe_tokenizer
from regft_jax.data.pipeline import build_corpus
from regft_jax.eval import perplexity, toxicity_eval
from regft_jax.eval.export import load_model_dir
from regft_jax.oracles import make_oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a river city music moon paints old quiet garden storm bread".split()
# Insults open with varied two-word prompts (prompt_words=2), each followed by "idiot": the eval
# prompts are some of these openings, the training insults that share none of them stay in
# training, and a regex oracle on "idiot" flags continuations that learned the insult.
INSULT_OPENINGS = [f"{a} {b}" for a in "you hey oh listen look wow well man".split()
                   for b in "stupid dumb big silly total".split()]


def _fixture(tmp_path, n=80):
    """Two small domains in jsonl files and a BPE tokenizer trained on them."""
    rng = np.random.default_rng(0)
    general = [{"text": " ".join(rng.choice(WORDS, 12)) + f" {i}."} for i in range(n)]
    opening = lambda i: (f"{INSULT_OPENINGS[(i // 2) % len(INSULT_OPENINGS)]} idiot " if i % 2
                         else "thanks friend ")
    toxic = [{"text": opening(i) + " ".join(rng.choice(WORDS, 6)) + f" {i}", "insult": i % 2}
             for i in range(n)]
    for name, rows in (("general", general), ("toxic", toxic)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = train_bpe_tokenizer([r["text"] for r in general + toxic], tmp_path / "tok", vocab_size=300)
    return tok


def _data_config(tmp_path, tok):
    return ml_collections.ConfigDict({
        "source": "files", "cache_dir": str(tmp_path / "cache"), "tokenizer": tok, "vocab_size": 300,
        "files": f"general:{tmp_path / 'general.jsonl'},toxic:{tmp_path / 'toxic.jsonl'}:insult",
        "seq_len": 32, "valid_fraction": 0.1, "num_prompts": {"toxic": 10, "general": 5}, "prompt_words": 2,
        "toxic_domain": "toxic", "toxic_prompts_from_violations": True, "document_attention": True})


# A `detox` run of the entry point on the `_fixture` corpus, about 30 s on 2 CPU devices.
TINY_DETOX = {
    "stage": "detox", "data.source": "files", "data.seq_len": 32, "data.num_prompts.toxic": 10,
    "data.num_prompts.general": 5, "data.prompt_words": 2, "model.arch.num_layers": 2, "model.arch.hidden_size": 32,
    "model.arch.head_dim": 8, "model.arch.mlp_dim": 64, "base.steps": 20, "base.batch_size": 8,
    "method.iterations": 2, "method.llm_steps": 3, "method.batch_size": 8, "method.samples_per_iteration": 8,
    "method.sample_batch_size": 4, "method.sample_tokens": 6, "eval.max_new_tokens": 8, "method.oracle": "regex",
    "method.oracle_args": "{'words': ['idiot']}", "eval.oracles": "regex,insult_classifier", "eval.judge": "base"}


def detox_argv(tmp_path, tok, workdir, **overrides) -> list[str]:
    """`python -m regft_jax.main` argv of `TINY_DETOX` on the fixture corpus in `tmp_path` (`_fixture`);
    `overrides`: config keys with "__" for "." (e.g. method__llm_steps=4), cache_dir under tmp_path."""
    files = f"general:{tmp_path / 'general.jsonl'},toxic:{tmp_path / 'toxic.jsonl'}:insult"
    values = {**TINY_DETOX, "data.tokenizer": tok, "data.files": files, "data.cache_dir": tmp_path / "cache",
              **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [sys.executable, "-m", "regft_jax.main", "--config=configs/tiny.py",
            *(f"--config.{k}={v}" for k, v in values.items()), f"--workdir={workdir}"]


def test_corpus_splits_are_disjoint_and_toxic_prompts_are_violations(tmp_path):
    data = _data_config(tmp_path, _fixture(tmp_path))
    corpus = build_corpus(data, seed=0)
    assert corpus.domains == ["general", "toxic"]
    assert len(corpus.prompts["toxic"]) == 10 and len(corpus.prompts["general"]) == 5
    assert all(p.label == 1.0 and p.prompt in INSULT_OPENINGS for p in corpus.prompts["toxic"])
    insults = [e for e in corpus.train["toxic"] if e.label == 1.0]  # the openings not held out
    assert len(insults) >= 20 and all("idiot" in e.text for e in insults)
    for d in corpus.domains:
        train = {e.text for e in corpus.train[d]}
        assert not train & {e.text for e in corpus.valid[d]} and not train & {e.text for e in corpus.prompts[d]}
    again = build_corpus(data, seed=0)
    assert [e.text for e in again.valid["toxic"]] == [e.text for e in corpus.valid["toxic"]]
    assert [e.text for e in build_corpus(data, seed=1).valid["toxic"]] != [e.text for e in corpus.valid["toxic"]]
    rows = corpus.packed("train", 32)["general"]
    assert rows.tokens.shape[1] == 33 and rows.tokens[0, 0] == corpus.tokenizer.bos_id


def test_corpus_config_errors_name_the_key(tmp_path):
    data = _data_config(tmp_path, _fixture(tmp_path))
    data.num_prompts = {"toxic": 10, "news": 3}
    with pytest.raises(ValueError, match="num_prompts.*news"):
        build_corpus(data, seed=0)
    data = _data_config(tmp_path, "")
    data.files = "toxic"
    with pytest.raises(ValueError, match="data.files entry 'toxic'"):
        build_corpus(data, seed=0)
    data = _data_config(tmp_path, "")
    data.tokenizer = ""
    with pytest.raises(ValueError, match="config.data.tokenizer"):
        build_corpus(data, seed=0)


def test_perplexity_equals_brute_force(tmp_path):
    corpus = build_corpus(_data_config(tmp_path, _fixture(tmp_path)), seed=0)
    rows = corpus.packed("valid", 32)["toxic"]
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    params = models.init_params(cfg, jax.random.key(0))
    nll, count = 0.0, 0
    for tokens, mask in zip(rows.tokens, rows.loss_mask):  # one row at a time, explicit loop
        logp = jax.nn.log_softmax(models.forward(cfg, params, jnp.asarray(tokens[None, :-1]))[0])
        for t in range(len(tokens) - 1):
            if mask[t + 1]:
                nll -= float(logp[t, tokens[t + 1]])
                count += 1
    # one causal stream per row (document attention is tests/test_packed_attention.py)
    got = perplexity(cfg, params, rows, batch_size=3, document_attention=False)  # a padded last batch of 3
    np.testing.assert_allclose(got, np.exp(nll / count), rtol=1e-5)


def test_toxicity_eval_counts_flagged_continuations_and_masks_failures(tmp_path):
    corpus = build_corpus(_data_config(tmp_path, _fixture(tmp_path)), seed=0)
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    params = models.init_params(cfg, jax.random.key(0))
    calls = []

    def fn(texts):  # flags continuations containing "e"; fails (NaN) on the first one
        calls.append(list(texts))
        scores = np.array([float("e" in t) for t in texts])
        scores[0] = np.nan
        return scores

    oracle = make_oracle("callable", fn=fn, key="test-e", use_cache=False)
    out = toxicity_eval(cfg, params, corpus.tokenizer, corpus.prompts["toxic"], oracle, max_new_tokens=6,
                        temperature=1.0, seed=3, model_name="m")
    texts = [r["continuation"] for r in out["records"]]
    assert calls[0] == texts and out["records"][0]["score"] is None
    expected = np.mean([float("e" in t) for t in texts[1:]])
    assert out["scored"] == len(texts) - 1 and out["toxicity"] == pytest.approx(expected)
    assert {r["model"] for r in out["records"]} == {"m"}
    # stop: the same continuations, each cut before its first "e"; the oracle scores the cut texts
    cut = toxicity_eval(cfg, params, corpus.tokenizer, corpus.prompts["toxic"], oracle, max_new_tokens=6,
                        temperature=1.0, seed=3, stop="e")
    assert [r["continuation"] for r in cut["records"]] == [t.split("e", 1)[0] for t in texts] == calls[-1]
    assert [bool(r.get("stopped")) for r in cut["records"]] == ["e" in t for t in texts]
    assert cut["stopped"] == pytest.approx(np.mean(["e" in t for t in texts])) and 0 < cut["stopped"] < 1
    assert cut["toxicity"] == 0.0


def test_base_stage_end_to_end_and_cached(tmp_path):
    tok = _fixture(tmp_path)
    args = [sys.executable, "-m", "regft_jax.main", "--config=configs/tiny.py", "--config.stage=base",
            "--config.data.source=files", f"--config.data.tokenizer={tok}", "--config.data.seq_len=32",
            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.num_prompts.toxic=10",
            "--config.data.num_prompts.general=5", "--config.data.prompt_words=2",
            "--config.model.arch.num_layers=1", "--config.model.arch.hidden_size=32",
            "--config.model.arch.head_dim=8", "--config.model.arch.mlp_dim=64",
            "--config.base.steps=20", "--config.base.batch_size=8", "--config.eval.max_new_tokens=8",
            "--config.eval.oracles=regex", f"--workdir={tmp_path / 'run'}"]
    files = f"general:{tmp_path / 'general.jsonl'},toxic:{tmp_path / 'toxic.jsonl'}:insult"
    args += [f"--config.data.files={files}", "--config.eval.oracle_args={'regex': {'words': ['idiot']}}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining" in first.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["base"]) == {"ppl_general", "ppl_toxic", "toxicity", "toxicity_regex_general",
                                    "toxicity_regex_toxic", "scored_regex_general", "scored_regex_toxic", "fluency",
                                    "distinct_1", "distinct_2", "distinct_3", "win_rates"}
    # generation quality under a separately pretrained general-domain judge of twice the width
    assert "judge: a general-domain LM of width 48 (general)" in first.stdout
    assert results["base"]["win_rates"] == {"base": 0.5} and 1 < results["base"]["fluency"] < 1e4
    assert 0 < results["base"]["distinct_1"] <= 1
    assert results["base"]["toxicity"] == {"regex": results["base"]["toxicity_regex_toxic"]}
    assert results["judges"]["regex"]["role"] == "independent"  # the training oracle is profanity
    assert results["base"]["ppl_toxic"] < 300  # better than uniform over the vocabulary
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 15 and json.loads(lines[0])["model"] == "base"
    # ... and, with eval.save_models, exported for lm-eval (with the tokenizer; loaded: tests/test_export.py)
    second = subprocess.run(args + ["--config.eval.save_models=True"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0 and "cached at" in second.stdout and "pretraining" not in second.stdout
    saved = tmp_path / "run" / "models" / "base"
    assert f"models saved in {saved.parent}/: base" in second.stdout and (saved / "tokenizer.json").is_file()
    cfg, _, guidance, _ = load_model_dir(str(saved))
    assert cfg.num_layers == 1 and cfg.hidden_size == 32 and guidance is None
    assert json.loads((tmp_path / "run" / "results.json").read_text())["base"]["ppl_toxic"] == pytest.approx(
        results["base"]["ppl_toxic"], rel=1e-6)
    # The paper's protocols on a toxiGen.json file (the first 2 of 3 prompts): ToxiGen once each, RTP 25 each.
    (tmp_path / "tg").mkdir()
    (tmp_path / "tg" / "toxiGen.json").write_text(json.dumps([{"text": t} for t in ("you are", "they all", "x")]))
    third = subprocess.run(args + ["--config.eval.protocols=toxigen,rtp", f"--config.eval.protocol_prompts={tmp_path / 'tg'}",
                                   "--config.eval.protocol_max_prompts=2"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    base = json.loads((tmp_path / "run" / "results.json").read_text())["base"]
    assert base["scored_regex_toxigen"] == 2 and base["scored_regex_rtp"] == 50
    assert 0 <= base["toxicity_regex_rtp"] <= 1 and 0 <= base["emt_regex_rtp"] <= 1
    assert "RTP exp. max toxicity (regex)" in third.stdout and "protocols toxigen, rtp on 2 prompts" in third.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [sum(r.get("protocol") == p for r in records) for p in ("toxigen", "rtp")] == [2, 50]


def test_packed_rows_are_tokenized_once_into_the_cache_and_read_back_equal(tmp_path, monkeypatch):
    from regft_jax.data import pipeline

    data = _data_config(tmp_path, _fixture(tmp_path))
    first = build_corpus(data, seed=0).packed("train", 32)
    files = sorted((tmp_path / "cache" / "tokenized").glob("*.npz"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(pipeline, "pack_documents", no_tokenizing)
    again = build_corpus(data, seed=0).packed("train", 32)  # a new run: read from the file
    assert sorted(again) == sorted(first)
    for d in first:
        for field in ("tokens", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(again[d], field), getattr(first[d], field))
    with pytest.raises(AssertionError, match="tokenized again"):  # other rows (seq_len, split) are new work
        build_corpus(data, seed=1).packed("train", 32)
    with pytest.raises(AssertionError, match="tokenized again"):
        build_corpus(data, seed=0).packed("train", 16)
