"""Generation quality: win rate in both orders, judges, fluency and distinct-n against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regft_jax import models
from regft_jax.data.pipeline import build_corpus
from regft_jax.eval.quality import (LikelihoodJudge, PromptedJudge, distinct_n, fluency, format_win_rates, win_rate,
                                    win_rate_matrix)
from tests.test_pipeline import _data_config, _fixture

PROMPTS = ["p1", "p2", "p3", "p4"]


def test_a_judge_that_always_prefers_position_a_gives_50_percent():
    always_first = lambda prompts, first, second: np.ones(len(prompts))
    assert win_rate(always_first, PROMPTS, ["a"] * 4, ["b"] * 4) == 0.5
    matrix = win_rate_matrix(always_first, PROMPTS, {"x": ["a"] * 4, "y": ["bb"] * 4, "z": ["c"] * 4})
    assert all(v == 0.5 for row in matrix.values() for v in row.values())


def test_win_rate_of_a_content_judge_equals_the_hand_count():
    longer = lambda prompts, first, second: np.array([float(len(a) > len(b)) + 0.5 * (len(a) == len(b))
                                                       for a, b in zip(first, second)])
    a, b = ["xx", "x", "xxx", "xx"], ["x", "xx", "x", "xx"]  # a wins 2, loses 1, ties 1
    assert win_rate(longer, PROMPTS, a, b) == pytest.approx((2 + 0.5) / 4)
    m = win_rate_matrix(longer, PROMPTS, {"a": a, "b": b})
    assert m["a"]["b"] == pytest.approx(0.625) and m["b"]["a"] == pytest.approx(0.375) and m["a"]["a"] == 0.5
    assert "| a | 50% | 62% |" in format_win_rates(m) or "| a | 50% | 63% |" in format_win_rates(m)
    with pytest.raises(ValueError, match="4 prompts but 3 continuations"):
        win_rate(longer, PROMPTS, a[:3], b)


def test_distinct_n_by_hand():
    texts = ["the cat the cat", "the dog"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # the, cat, dog of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat the), (the dog)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["one"], 2) == 0.0


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    corpus = build_corpus(_data_config(tmp, _fixture(tmp)), seed=0)
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512)
    return cfg, models.init_params(cfg, jax.random.key(0)), corpus.tokenizer


def _brute_logprob(cfg, params, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    ctx = tokenizer.encode_batch([context], add_bos=True)[0]
    cont = tokenizer.encode_batch([continuation])[0] or [tokenizer.eos_id]
    ids = ctx + cont
    logp = jax.nn.log_softmax(models.forward(cfg, params, jnp.asarray([ids]))[0])
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)), len(cont)


def test_fluency_and_judges_equal_brute_force_likelihoods(lm):
    cfg, params, tok = lm
    prompts = ["you are a", "the weather"]
    conts = ["good friend of mine", "is nice today"]
    others = ["idiot idiot", ""]
    sums = [_brute_logprob(cfg, params, tok, p, c) for p, c in zip(prompts, conts)]
    expected = np.exp(-sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert fluency(cfg, params, tok, prompts, conts, batch_size=1) == pytest.approx(expected, rel=1e-5)

    judge = LikelihoodJudge(cfg, params, tok)
    mine = np.array([s / n for s, n in sums])
    theirs = np.array([s / n for s, n in (_brute_logprob(cfg, params, tok, p, c) for p, c in zip(prompts, others))])
    np.testing.assert_array_equal(judge(prompts, conts, others), (mine > theirs).astype(float))
    np.testing.assert_array_equal(judge(prompts, conts, others) + judge(prompts, others, conts), 1.0)  # no position bias

    prompted = PromptedJudge(cfg, params, tok)
    got = prompted(prompts[:1], conts[:1], others[:1])
    question = PromptedJudge.TEMPLATE.format(prompt=prompts[0], first=conts[0], second=others[0])
    la, _ = _brute_logprob(cfg, params, tok, question, " A")
    lb, _ = _brute_logprob(cfg, params, tok, question, " B")
    np.testing.assert_allclose(got, [np.exp(la) / (np.exp(la) + np.exp(lb))], rtol=1e-4)


def test_quality_report_scores_each_continuation_once_for_fluency_and_win_rates(lm, monkeypatch):
    from regft_jax.eval import quality

    cfg, params, tok = lm
    conts = {"a": ["good friend of mine", "is nice today"], "b": ["idiot idiot", ""], "c": ["good friend of mine", "x"]}
    records = [{"model": m, "domain": "toxic", "prompt": p, "continuation": c}
               for m, texts in conts.items() for p, c in zip(["you are a", "the weather"], texts)]
    records.append({"model": "a", "domain": "toxic", "prompt": "you are a", "continuation": "ok", "protocol": "rtp"})
    expected_fluency = {m: fluency(cfg, params, tok, ["you are a", "the weather"], t) for m, t in conts.items()}
    expected_wins = win_rate_matrix(LikelihoodJudge(cfg, params, tok), ["the weather", "you are a"],
                                    {m: t[::-1] for m, t in conts.items()})
    scored = []
    real = quality.continuation_logprobs

    def counting(cfg, params, tokenizer, prompts, texts, **kw):
        scored.extend(zip(prompts, texts))
        return real(cfg, params, tokenizer, prompts, texts, **kw)

    monkeypatch.setattr(quality, "continuation_logprobs", counting)
    judge = quality.JudgeLM(LikelihoodJudge(cfg, params, tok), cfg, params, tok, "test")
    report = quality.quality_report(judge, records, "toxic")
    assert sorted(scored) == sorted({(r["prompt"], r["continuation"]) for r in records if "protocol" not in r})
    for m in conts:
        assert report["models"][m]["fluency"] == pytest.approx(expected_fluency[m], rel=1e-5)
    assert report["win_rates"] == expected_wins and report["prompts"] == 2
