"""The classify stage's pieces: ROC-AUC vs scikit-learn, the prompted score vs a hand softmax over the two label
tokens, the classification rows, and a classifier trained on a separable toy set."""

import json
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from regft_jax import models, sharding
from regft_jax.data import train_bpe_tokenizer
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.classification import PromptFormat
from regft_jax.data.pipeline import build_corpus
from regft_jax.data.records import Example
from regft_jax.data.tokenizer import load_tokenizer
from regft_jax.errors import UserInputError
from regft_jax.eval.classify import auc_standard_error, label_scores, roc_auc
from regft_jax.train.base_model import train_lm
from regft_jax.train.schedules import mask_from_stop
from tests.test_multihost import _env, _port, _two_processes
from tests.test_pipeline import REPO, _data_config, _fixture, detox_argv

GOOD = "kind lovely calm bright warm gentle river garden music".split()
BAD = "idiot stupid moron loser dumb".split()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0 and roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


def test_auc_standard_error_matches_the_spread_of_repeated_estimates():
    # binormal scores (positives shifted by 1.2 standard deviations: AUC = Φ(1.2 / √2) ≈ 0.80), 60 positives and
    # 140 negatives per draw: DeLong's standard error (mean over draws) vs the standard deviation of the estimates
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    draws = [rng.normal(1.2 * labels, 1.0) for _ in range(2000)]
    aucs = [roc_auc(labels, s) for s in draws]
    se = np.mean([auc_standard_error(labels, s) for s in draws[:300]])
    assert se == pytest.approx(np.std(aucs), rel=0.05)
    assert auc_standard_error([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 0.0  # perfectly separated: no spread


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(GOOD + BAD, 6)) + "\nInsult:" + rng.choice([" yes", " no"]) for _ in range(300)]
    path = train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300)
    return load_tokenizer(path)


def _format(tokenizer):
    return PromptFormat(tokenizer, "\nInsult:", (" no", " yes"))


def test_rows_hold_comment_template_label_and_keep_a_long_comments_end(tokenizer):
    fmt = _format(tokenizer)
    neg, pos = fmt.label_ids
    assert len(neg) == len(pos) == 1 and neg != pos
    long = " ".join(["calm"] * 40 + ["river", "idiot"])
    examples = [Example("you idiot", "toxic", 1.0), Example("lovely garden", "toxic", 0.0), Example(long, "toxic", 1.0)]
    bos, eos, template = tokenizer.bos_id, tokenizer.eos_id, fmt.template_ids
    rows = fmt.rows(examples, 16, "all")
    label_rows = fmt.rows(examples, 16, "label")
    for r, (e, label) in enumerate(zip(examples, (pos, neg, pos))):
        ids = tokenizer.encode_batch([e.text])[0]
        n = int(rows.segment_ids[r].sum())
        comment = ids[-(16 - 1 - len(template) - 2):] if r == 2 else ids  # the long one keeps its last tokens
        assert list(rows.tokens[r, :n]) == [bos] + comment + template + label + [eos]
        assert list(rows.loss_mask[r, :n]) == [0] + [1] * (n - 1) and not rows.loss_mask[r, n:].any()
        at = n - 1 - len(label)  # the label word's column(s)
        assert list(np.nonzero(label_rows.loss_mask[r])[0]) == list(range(at, at + len(label)))
        assert list(rows.positions[r, :n]) == list(range(n))
    assert rows.segment_ids[2].sum() == 16  # the long comment filled its row
    with pytest.raises(UserInputError, match="no label"):
        fmt.rows([Example("x", "toxic")], 16)
    with pytest.raises(UserInputError, match="no room"):
        fmt.prompt_ids(["calm"], len(template) + 1)
    with pytest.raises(UserInputError, match="two different label words"):
        PromptFormat(tokenizer, "\nInsult:", (" yes", " yes"))


def test_sampled_continuations_end_before_the_stop_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, (200, 12))
    mask = (rng.random((200, 12)) < 0.9).astype(np.int32)
    for stop in ([2, 3], [1], [0, 0, 1]):
        out = mask_from_stop(tokens, mask, stop)
        for row, m, o in zip(tokens, mask, out):  # brute force: the first window equal to the stop ids
            first = next((i for i in range(len(row) - len(stop) + 1) if list(row[i:i + len(stop)]) == stop), len(row))
            assert list(o) == [v if i < first else 0 for i, v in enumerate(m)]
    assert mask_from_stop(tokens, mask, ()) is mask


def test_classify_config_checks_and_training_config():
    from configs import tiny
    from regft_jax.eval.classify import check_classify_config, training_config

    config = tiny.get_config()
    assert check_classify_config(config) == ["ours", "sft"]  # the detox methods its variants train with
    assert training_config(config).method.sample_stop == "\nInsult:" and config.method.sample_stop == ""
    config.method.reg_prefixes = "both"
    with pytest.raises(UserInputError, match="config.method.reg_prefixes"):
        check_classify_config(config)
    config.classify.variants = "base,sft_label"  # (no regularizer: any reg_prefixes)
    assert check_classify_config(config) == ["sft"]
    config.classify.variants = "sft,head"
    with pytest.raises(UserInputError, match="config.classify.variants"):
        check_classify_config(config)


def _model(vocab: int, seed: int = 0):
    cfg = models.ModelConfig(family="llama", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=2, head_dim=16, mlp_dim=64, max_seq_len=64)
    return cfg, models.init_params(cfg, jax.random.key(seed))


def test_prompted_score_is_the_softmax_over_the_two_label_tokens(tokenizer):
    fmt = _format(tokenizer)
    cfg, params = _model(tokenizer.vocab_size, seed=3)
    texts = ["you stupid moron", "calm warm river music", " ".join(["garden"] * 50)]
    scores = label_scores(cfg, params, fmt, texts, row_len=24, batch_size=2)
    (neg,), (pos,) = fmt.label_ids
    # the prompts scored are those of the training rows: the row's tokens before the label word
    rows = fmt.rows([Example(t, "toxic", 1.0) for t in texts], 24)
    prompts = [list(r[:int(s.sum()) - 2]) for r, s in zip(rows.tokens, rows.segment_ids)]  # (label, EOS)
    assert prompts == fmt.prompt_ids(texts, fmt.prompt_room(24)) and len(prompts[2]) == 24 - 2
    for text, score, ids in zip(texts, scores, prompts):
        logits = models.forward(cfg, params, jnp.asarray([ids]))[0, -1]
        assert score == pytest.approx(float(jax.nn.softmax(logits[jnp.array([neg, pos])])[1]), rel=1e-5)


def _toy(n: int, seed: int) -> list[Example]:
    """Separable: a positive comment holds an insult word among kind ones, a negative only kind words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = list(rng.choice(GOOD, 5))
        if i % 2:
            words[rng.integers(5)] = str(rng.choice(BAD))
        out.append(Example(" ".join(words), "toxic", float(i % 2)))
    return out


def test_a_classifier_trained_on_a_separable_toy_set_reaches_auc_one(tokenizer):
    fmt = _format(tokenizer)
    cfg, params = _model(tokenizer.vocab_size)
    test = _toy(60, seed=1)
    before = roc_auc([e.label for e in test], label_scores(cfg, params, fmt, [e.text for e in test], row_len=24))
    rows = fmt.rows(_toy(400, seed=0), 24, "label")
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    optim = ml_collections.ConfigDict({"learning_rate": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0,
                                       "warmup_steps": 5})
    trained, history = train_lm(cfg, params, mesh, MixtureBatcher({"toxic": rows}, {"toxic": 1.0}, 16, seed=0), optim,
                                steps=150, desc="toy classifier")
    after = roc_auc([e.label for e in test], label_scores(cfg, trained, fmt, [e.text for e in test], row_len=24))
    assert history[-1]["loss"] < 0.1 < history[0]["loss"]
    assert after > 0.98 and abs(before - 0.5) < 0.3


# ------------------------------------------------------------------ the stage, end to end (1 and 2 processes)

def _classify_argv(tmp_path, tok, workdir, **kw):
    return detox_argv(tmp_path, tok, workdir, stage="classify", method__llm_steps=6, data__valid_fraction=0.25, **kw)


def test_classify_stage_end_to_end(tmp_path):
    tok = _fixture(tmp_path)
    run = subprocess.run(_classify_argv(tmp_path, tok, tmp_path / "run"), cwd=REPO, env=_env(2), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    data = _data_config(tmp_path, tok)
    data.valid_fraction = 0.25
    corpus = build_corpus(data, seed=0)
    held_out = [e for e in corpus.valid["toxic"] if e.label is not None]
    assert 0 < sum(e.label for e in held_out) < len(held_out)
    for name in ("base", "sft", "ours", "sft_label"):
        r = results[name]
        assert 0 <= r["auc"] <= 1 and r["auc_se"] > 0, name
        assert (r["test_n"], r["test_positive"]) == (len(held_out), sum(e.label >= 0.5 for e in held_out))
        assert set(r["toxicity"]) == {"regex", "insult_classifier"} and r["ppl_general"] > 1
    assert len({results[n]["auc"] for n in ("base", "sft", "sft_label")}) == 3  # each trained differently
    for name in ("sft", "ours", "sft_label"):  # checkpoints of their own, apart from the detox stage's
        assert (tmp_path / "run" / "checkpoints" / f"classify_{name}").is_dir()
    assert "classification (" in run.stdout and "| sft_label |" in run.stdout
    # free continuations are cut before the template (the model labeling its own text), and say so
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert not any("\nInsult:" in r["continuation"] for r in records)
    for name in results.keys() - {"judges"}:
        own = [r for r in records if r["model"] == name and r["domain"] == "toxic"]
        assert results[name]["stopped_toxic"] == pytest.approx(np.mean([bool(r.get("stopped")) for r in own]))
    bad = subprocess.run(_classify_argv(tmp_path, tok, tmp_path / "bad", classify__variants="sft,rl"), cwd=REPO,
                         env=_env(2), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config.classify.variants" in bad.stderr


def test_classify_stage_two_processes_equals_one_process(tmp_path):
    tok = _fixture(tmp_path)
    argv = lambda workdir, cache, **kw: _classify_argv(tmp_path, tok, workdir, data__cache_dir=tmp_path / cache,
                                                       classify__variants="base,sft_label", eval__judge="none", **kw)
    port = _port()
    outs = _two_processes(lambda i: argv(tmp_path / "two", "cache2", coordinator=f"127.0.0.1:{port}",
                                         num_processes=2, process_id=i), timeout=600)
    for o in outs:
        assert o.returncode == 0, o.stderr[-3000:]
    one = subprocess.run(argv(tmp_path / "one", "cache1"), cwd=REPO, env=_env(4), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    r2, r1 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    for name in ("base", "sft_label"):
        for key in ("auc", "auc_se", "ppl_general"):
            assert r2[name][key] == pytest.approx(r1[name][key], rel=1e-4), (name, key)
        assert r2[name]["toxicity"] == r1[name]["toxicity"]


def test_report_puts_roc_auc_first_for_classify_runs(tmp_path):
    from regft_jax import report

    judges = {"eval_oracles": ["judge"], "domain": "toxic", "training_oracle": "regex",
              "judge": {"role": "independent"}}
    dirs = []
    for seed, auc in enumerate((0.70, 0.80)):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        results = {"sft": {"auc": auc, "auc_se": 0.03, "toxicity_judge_toxic": 0.1, "stopped_toxic": 0.5,
                           "ppl_general": 100.0}}
        (d / "results.json").write_text(json.dumps({**results, "judges": judges}))
        dirs.append(str(d))
    summary, keys, labels = report.aggregate(report.load_runs(dirs))
    assert keys[:3] == ["auc", "toxicity_judge_toxic", "stopped_toxic"] and labels["auc"] == "ROC-AUC ↑"
    assert "| sft | 0.750 ± 0.071 | 10.0% ± 0.0 | 50.0% ± 0.0 |" in report.markdown(summary, keys, labels)
