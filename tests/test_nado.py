"""NADO decoding: q = p · R for generation and every likelihood, and the nado_decoding baseline's runner.

- R ≡ const (aux head kernel 0, a constant bias): guided generation equals plain generation token for
  token (greedy and T = 1, same seed), and perplexity / log-likelihoods under q equal the base model's;
- a non-constant R: perplexity and per-pair log-likelihoods under q equal a numpy brute force from the two
  models' full logits, each packed document computed alone; a greedy guided continuation is q's greedy one;
- `run_nado_decoding` on the tiny corpus trains R away from constant, leaves the LLM untouched, and a
  run stopped or preempted mid-way resumes to bitwise the same aux parameters.
"""

import json
import os

import jax
import numpy as np
import pytest

from regft_jax import preemption
from regft_jax.errors import UserInputError
from regft_jax.eval.perplexity import loglikelihoods, perplexity
from regft_jax.models.aux import AuxGuidance, aux_config, init_aux_params
from regft_jax.oracles import make_oracle
from regft_jax.sampling import generate
from regft_jax.train.nado import run_nado_decoding
from tests.test_packed_attention import _pieces, _rows, aux_logits, forward  # (jitted)
from tests.test_schedules import CFG, _assert_bitwise, _config, setup  # noqa: F401 - the module fixture


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _log_q(logits, z):
    """Brute force log q(·|h) = log [p(·|h) σ(z) / Σ p σ(z)] in float64 [s, V]."""
    p = np.exp(_log_softmax(logits))
    r = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
    return np.log(p * r / (p * r).sum(-1, keepdims=True))


def _varied_aux(cfg, llm_params):
    """An aux model (trunk: the LLM's first layer) with a random head: R varies strongly over the
    vocabulary and the prefixes."""
    acfg = aux_config(cfg, num_layers=1)
    aux = init_aux_params(acfg, jax.random.key(1), mean_label=0.5, llm_params=llm_params)
    aux["head"]["kernel"] = 2.0 * np.random.default_rng(1).standard_normal(aux["head"]["kernel"].shape, np.float32)
    return acfg, aux


def _prompts(corpus, n=5):
    return corpus.tokenizer.encode_batch([p.prompt for p in corpus.prompts["toxic"][:n]], add_bos=True)


def test_constant_R_generates_and_scores_like_the_base_model(setup):
    _, _, corpus, mesh, base, _ = setup
    acfg = aux_config(CFG, num_layers=1)
    aux = init_aux_params(acfg, jax.random.key(1), mean_label=0.3, llm_params=base)  # kernel 0, bias logit(0.3)
    assert not np.asarray(aux["head"]["kernel"]).any() and np.ptp(np.asarray(aux["head"]["bias"])) == 0
    guided = {"guidance": AuxGuidance(acfg), "guidance_params": aux}
    prompts = _prompts(corpus)
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=10, temperature=temperature, seed=3, eos_id=corpus.tokenizer.eos_id, mesh=mesh,
                  return_logprobs=True)
        plain, plain_lp = generate(CFG, base, prompts, **kw)
        out, out_lp = generate(CFG, base, prompts, **kw, **guided)
        assert out == plain and all(len(o) == 10 or o[-1] == corpus.tokenizer.eos_id for o in out)
        for (lp, ref), (glp, gref) in zip(plain_lp, out_lp):
            np.testing.assert_allclose(glp, lp, atol=1e-5)  # q = p: the same sampling log-probs
            np.testing.assert_allclose(gref, ref, atol=1e-5)
    rows = corpus.packed("valid", 32)["toxic"]
    ppl = perplexity(CFG, base, rows, batch_size=4, mesh=mesh)
    assert perplexity(CFG, base, rows, batch_size=4, mesh=mesh, **guided) == pytest.approx(ppl, rel=1e-5)
    pairs = [(p, o) for p, o in zip(prompts, out)]
    logl, greedy = loglikelihoods(CFG, base, pairs, batch_size=2, mesh=mesh)
    glogl, ggreedy = loglikelihoods(CFG, base, pairs, batch_size=2, mesh=mesh, **guided)
    np.testing.assert_allclose(glogl, logl, rtol=1e-5)
    np.testing.assert_array_equal(ggreedy, greedy)


def test_guided_perplexity_equals_brute_force_per_document(setup):
    cfg, params = CFG, setup[4]
    acfg, aux = _varied_aux(cfg, params)
    rows = _rows()  # several documents per row, one spanning two rows, a padded row (token ids < 64)
    nll = {"p": 0.0, "q": 0.0}
    count = 0
    for r, slots in _pieces(rows):
        piece, mask = rows.tokens[r:r + 1, slots], rows.loss_mask[r, slots]
        logits = np.asarray(forward(cfg, params, piece))[0]  # each document alone
        z = np.asarray(aux_logits(acfg, aux, piece))[0]
        log_p, log_q = _log_softmax(logits), _log_q(logits, z)
        for t in range(len(slots) - 1):
            if mask[t + 1]:
                nll["p"] -= log_p[t, piece[0, t + 1]]
                nll["q"] -= log_q[t, piece[0, t + 1]]
                count += 1
    guidance = {"guidance": AuxGuidance(acfg), "guidance_params": aux}
    got = perplexity(cfg, params, rows, batch_size=3, **guidance)  # a padded last batch
    np.testing.assert_allclose(got, np.exp(nll["q"] / count), rtol=1e-5)
    np.testing.assert_allclose(perplexity(cfg, params, rows, batch_size=3), np.exp(nll["p"] / count), rtol=1e-5)
    assert abs(np.log(got) - nll["p"] / count) > 1e-2  # R is far from constant


def test_guided_loglikelihoods_equal_brute_force_and_greedy_matches_the_sampler(setup):
    _, _, corpus, mesh, base, _ = setup
    acfg, aux = _varied_aux(CFG, base)
    guidance = {"guidance": AuxGuidance(acfg), "guidance_params": aux}
    prompts = _prompts(corpus, 4)
    greedy_q = generate(CFG, base, prompts, max_new_tokens=5, **guidance)  # q's greedy continuations
    rng = np.random.default_rng(0)
    pairs = [(p, c) for p, c in zip(prompts, greedy_q)] + [(p, list(rng.integers(3, 300, n)))
                                                          for p, n in zip(prompts, (1, 3, 7))]
    # the longest pair the model can score: it reads max_seq_len tokens, the last one only a target
    pairs.append((list(rng.integers(3, 300, CFG.max_seq_len - 4)), list(rng.integers(3, 300, 5))))
    logl, greedy = loglikelihoods(CFG, base, pairs, batch_size=3, mesh=mesh, **guidance)
    plain, _ = loglikelihoods(CFG, base, pairs, batch_size=3, mesh=mesh)
    tokens = np.zeros((len(pairs), CFG.max_seq_len + 1), np.int32)  # each pair in its own row, unsorted
    for i, (context, continuation) in enumerate(pairs):
        tokens[i, :len(context) + len(continuation)] = list(context) + list(continuation)
    inputs = tokens[:, :-1]
    all_logits, all_z = np.asarray(forward(CFG, base, inputs)), np.asarray(aux_logits(acfg, aux, inputs))
    for i, (context, continuation) in enumerate(pairs):
        logits, z = all_logits[i], all_z[i]  # (right padding: causal attention never reads it)
        for name, log_dist, got in (("q", _log_q(logits, z), logl), ("p", _log_softmax(logits), plain)):
            want = sum(log_dist[len(context) + t - 1, y] for t, y in enumerate(continuation))
            np.testing.assert_allclose(got[i], want, rtol=1e-5, err_msg=f"pair {i} under {name}")
    assert greedy[:4].all() and not greedy[4:].any()
    assert not np.allclose(logl, plain)
    with pytest.raises(UserInputError, match="pair 1 has an empty context"):
        loglikelihoods(CFG, base, [([1], [5]), ([], [5])])
    with pytest.raises(UserInputError, match="pair 0 has 61 \\+ 5 tokens; the model reads all but the last, more than "
                       "its max_seq_len 64"):
        loglikelihoods(CFG, base, [([1] * 61, [5] * 5)])
    with pytest.raises(TypeError, match="AuxGuidance"):
        perplexity(CFG, base, corpus.packed("valid", 32)["toxic"], guidance=object())


def test_run_nado_decoding_trains_R_only_and_resumes_bitwise(setup, tmp_path, monkeypatch):
    tmp, tok, corpus, mesh, base, _ = setup
    config = _config(tmp, tok, iterations=2, llm_steps=3, samples_per_iteration=16, checkpoint_every=2,
                     aux_learning_rate=1e-2)
    oracle = make_oracle("regex", patterns=["e"])  # a continuation with an "e" anywhere violates: mixed labels
    before = jax.tree.map(np.array, base)
    run = lambda workdir, **kw: run_nado_decoding(config, mesh, corpus, CFG, base, oracle, workdir=str(workdir), **kw)
    full = run(tmp_path / "full")
    _assert_bitwise(full.params, before)  # no LLM update, and the base params are intact (not donated)
    assert isinstance(full.guidance, AuxGuidance) and full.guidance.cfg.num_layers == config.method.aux_layers
    assert full.info["aux_updates"] == 6 and full.info["samples_drawn"] == 32
    history = full.history
    assert len(history) == 6 and all(np.isfinite(h["aux_loss"]) and h["skipped"] == 0 for h in history)
    assert 0 < np.mean([h["mean_label"] for h in history]) < 1
    lines = (tmp_path / "full" / "metrics_nado_decoding.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints" / "nado_decoding")) == ["4", "6"]
    # R left its constant start in the oracle's direction: after a prompt, a next token containing "e"
    # (a certain violation) gets a lower R than the others
    aux = full.guidance_params
    has_e = np.array(["e" in t for t in corpus.tokenizer.decode_batch([[v] for v in range(CFG.vocab_size)])])
    for prompt in _prompts(corpus):
        z = np.asarray(aux_logits(full.guidance.cfg, aux, np.asarray([prompt])))[0, -1]
        assert z[has_e].mean() < z[~has_e].mean() and z.std() > 1e-2

    # preempted (SIGTERM) at the boundary after step 3: checkpointed there, then `Preempted`
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch:
        calls = iter(range(100))
        patch.setattr(preemption, "requested", lambda: next(calls) == 2)
        with pytest.raises(preemption.Preempted, match="step 3 of nado_decoding"):
            run(cut)
    assert sorted(os.listdir(cut / "checkpoints" / "nado_decoding")) == ["2", "3"]
    # resumed from 3 and stopped after step 5 (mid-iteration 2, whose labels were still computed in the
    # background when step 4 checkpointed), across a change nado does not depend on
    config.method.lambda_toxic = 9.0
    assert run(cut, stop_after=5) is None
    assert sorted(os.listdir(cut / "checkpoints" / "nado_decoding")) == ["3", "4"]
    resumed = run(cut)  # from 4: the same aux parameters and metrics as the uninterrupted run
    _assert_bitwise(resumed.guidance_params, aux)
    assert [h["aux_loss"] for h in resumed.history] == [h["aux_loss"] for h in history]
    assert [json.loads(line)["step"] for line in (cut / "metrics_nado_decoding.jsonl").read_text().splitlines()] \
        == list(range(1, 7))
    config.method.aux_learning_rate = 0.5  # an aux setting: the checkpoint is refused
    with pytest.raises(UserInputError, match="different config"):
        run(cut)
