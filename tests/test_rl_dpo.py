"""The RL (RLOO + KL) and DPO baselines: their formulas against hand computations and closed forms, and
short runs on the tiny fixture that move the policy and resume to bitwise the same parameters."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regft_jax import preemption
from regft_jax.errors import UserInputError
from regft_jax.losses import dpo_loss, policy_gradient_loss, policy_kl, rloo_advantages, sequence_log_prob
from regft_jax.oracles import make_oracle
from regft_jax.train.rl import check_rl_config, preference_pairs, run_dpo, run_rl
from tests.test_schedules import CFG, _assert_bitwise, _config, setup  # noqa: F401 (setup: a fixture)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_rloo_advantages_by_hand_sum_to_zero_per_prompt_and_skip_unscored():
    rewards = jnp.array([[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]])
    a = np.asarray(rloo_advantages(rewards))
    # A_i = r_i − mean of the other two
    np.testing.assert_allclose(a, [[1 - 0.25, 0 - 0.75, 0.5 - 0.5], [0.2 - 0.5, 0.2 - 0.5, 0.8 - 0.2]], atol=1e-6)
    np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-6)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(np.asarray(rloo_advantages(jnp.asarray(rng.random((5, 4))))).sum(-1), 0, atol=1e-6)
    # NaN (oracle failure): A = 0 there, left out of the others' baselines; < 2 scored in a prompt: all 0
    a = np.asarray(rloo_advantages(jnp.array([[1.0, np.nan, 0.0, 0.5], [np.nan, 0.3, np.nan, np.nan]])))
    np.testing.assert_allclose(a, [[1 - 0.25, 0, 0 - 0.75, 0.5 - 0.5], [0, 0, 0, 0]], atol=1e-6)


def test_policy_gradient_matches_a_hand_computation():
    """A tiny 'policy': free logits θ [T, V] per position, shared by every sequence. n = 3 sampled
    sequences of one prompt with rewards r: ∇L = −(1/n) Σ_i A_i Σ_t (onehot(y_it) − softmax(θ_t))."""
    rng = np.random.default_rng(1)
    T, V = 3, 5
    theta = rng.normal(size=(T, V)).astype(np.float32)
    ys = np.array([[4, 0, 2], [1, 1, 3], [0, 2, 2]])
    rewards = np.array([0.9, 0.1, 0.5], np.float32)
    # the sequences as rows: a BOS then the three generated tokens, every one counted
    tokens = np.concatenate([np.zeros((3, 1), np.int32), ys], 1)
    mask = np.array([[0, 1, 1, 1]] * 3)

    def loss(theta):
        logits = jnp.broadcast_to(jnp.concatenate([theta, jnp.zeros((1, V))])[None], (3, T + 1, V))
        logp = sequence_log_prob(logits, jnp.asarray(tokens), jnp.asarray(mask))
        return policy_gradient_loss(logp, rloo_advantages(jnp.asarray(rewards)[None])[0])

    grad = np.asarray(jax.grad(loss)(jnp.asarray(theta)))
    adv = [0.9 - 0.3, 0.1 - 0.7, 0.5 - 0.5]
    p = np.exp(_log_softmax(theta))
    hand = np.zeros((T, V))
    for a, y in zip(adv, ys):
        for t in range(T):
            hand[t] -= a * (np.eye(V)[y[t]] - p[t]) / 3
    np.testing.assert_allclose(grad, hand, rtol=1e-5, atol=1e-6)
    # and the loss value: −(1/n) Σ A_i log p(y_i)
    logp = [sum(_log_softmax(theta)[t, y[t]] for t in range(T)) for y in ys]
    np.testing.assert_allclose(float(loss(jnp.asarray(theta))), -np.dot(adv, logp) / 3, rtol=1e-5)


def test_policy_kl_value_and_gradient_through_the_policy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    ref = rng.normal(size=(2, 3, 6)).astype(np.float32)
    lp, lr = _log_softmax(logits), _log_softmax(ref)
    kl = (np.exp(lp) * (lp - lr)).sum(-1)
    np.testing.assert_allclose(np.asarray(policy_kl(jnp.asarray(logits), jnp.asarray(ref))), kl, rtol=1e-5)
    # gradient w.r.t. the policy's logits: closed form p (log p − log r − KL), and finite differences
    g = np.asarray(jax.grad(lambda x: policy_kl(x, jnp.asarray(ref)).sum())(jnp.asarray(logits)))
    np.testing.assert_allclose(g, np.exp(lp) * (lp - lr - kl[..., None]), rtol=1e-4, atol=1e-6)
    f = lambda x: float(((np.exp(_log_softmax(x)) * (_log_softmax(x) - lr)).sum(-1)).sum())
    eps, e = 1e-4, np.zeros_like(logits, np.float64)
    e[1, 2, 4] = eps
    np.testing.assert_allclose(g[1, 2, 4], (f(logits + e) - f(logits - e)) / (2 * eps), rtol=1e-4)
    # the reference is fixed; equal distributions: 0
    g_ref = jax.grad(lambda r: policy_kl(jnp.asarray(logits), r).sum())(jnp.asarray(ref))
    assert not np.asarray(g_ref).any()
    np.testing.assert_allclose(np.asarray(policy_kl(jnp.asarray(logits), jnp.asarray(logits + 3.0))), 0, atol=1e-6)


def test_dpo_loss_equals_its_closed_form_on_tiny_logits():
    rng = np.random.default_rng(3)
    V, beta = 4, 0.5
    tokens = jnp.array([[0, 2, 3], [0, 1, 1]])  # pair 0 chosen / rejected continuations (2 tokens each)
    mask = jnp.array([[0, 1, 1], [0, 1, 1]])
    pol_c, pol_r, ref_c, ref_r = (rng.normal(size=(2, 3, V)).astype(np.float32) for _ in range(4))

    def seq(logits, row):  # log p of row `row`'s continuation, by hand
        lp = _log_softmax(logits[row])
        return sum(lp[t - 1, int(tokens[row, t])] for t in (1, 2))

    logp = lambda x: sequence_log_prob(jnp.asarray(x), tokens, mask)  # [2]: the two pairs (row r of each)
    loss = float(dpo_loss(logp(pol_c), logp(pol_r), logp(ref_c), logp(ref_r), beta))
    margins = [beta * ((seq(pol_c, i) - seq(ref_c, i)) - (seq(pol_r, i) - seq(ref_r, i))) for i in (0, 1)]
    hand = np.mean([-np.log(1 / (1 + np.exp(-m))) for m in margins])
    np.testing.assert_allclose(loss, hand, rtol=1e-5)
    # weights: a masked pair does not count; no pair at all: 0
    w = jnp.array([1.0, 0.0])
    np.testing.assert_allclose(float(dpo_loss(logp(pol_c), logp(pol_r), logp(ref_c), logp(ref_r), beta, w)),
                               -np.log(1 / (1 + np.exp(-margins[0]))), rtol=1e-5)
    assert float(dpo_loss(logp(pol_c), logp(pol_r), logp(ref_c), logp(ref_r), beta, jnp.zeros(2))) == 0.0
    # d L / d π_c = −β σ(−margin) / n; the reference gets no gradient
    args = [jnp.asarray([0.3, -1.0]), jnp.asarray([0.1, 0.4]), jnp.asarray([0.0, -0.5]), jnp.asarray([0.2, 0.2])]
    g = jax.grad(lambda *a: dpo_loss(*a, beta), argnums=(0, 1, 2))(*args)
    m = beta * ((args[0] - args[2]) - (args[1] - args[3]))
    np.testing.assert_allclose(np.asarray(g[0]), -beta / (1 + np.exp(np.asarray(m))) / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g[1]), -np.asarray(g[0]), rtol=1e-5)
    assert not np.asarray(g[2]).any()


def test_preference_pairs_take_the_extremes_and_drop_ties_and_unscored():
    labels = np.array([[0.2, 0.9, 0.5], [0.4, 0.4, 0.4], [np.nan, 0.3, np.nan], [np.nan, 0.1, 0.7]])
    chosen, rejected, is_pair = preference_pairs(labels)
    assert is_pair.tolist() == [True, False, False, True]
    assert (chosen[[0, 3]].tolist(), rejected[[0, 3]].tolist()) == ([1, 2], [0, 1])


def _rl_config(tmp, tok, **overrides):
    config = _config(tmp, tok)  # 3 iterations × 4 LLM steps, a checkpoint every 3 steps, 6 sampled tokens
    config.rl.update({"k": 2, "prompts_per_step": 2, "chunks": 2})
    config.dpo.update({"k": 2, "prompts_per_iteration": 4, "pairs_per_step": 2})
    for key, value in overrides.items():
        block, name = key.split("__")
        config[block][name] = value
    return config


# a graded, deterministic oracle (continuous scores: few ties, non-zero advantages)
GRADED = make_oracle("callable", fn=lambda texts: [(len(t) % 7) / 7 for t in texts])


@pytest.mark.parametrize("name", ["rl", "dpo"])
def test_run_moves_the_policy_and_resumes_bitwise(setup, tmp_path, monkeypatch, name):
    tmp, tok, corpus, mesh, base, _ = setup
    # rl without the corpus loss: what moves the policy is the RLOO + KL term alone
    config = _rl_config(tmp, tok, **({"rl__lm_coef": 0.0} if name == "rl" else {}))
    run = lambda workdir, **kw: (run_rl if name == "rl" else run_dpo)(config, mesh, corpus, CFG, base, GRADED,
                                                                       workdir=str(workdir), desc=name, **kw)
    full = run(tmp_path / "full")
    h = full.history
    assert len(h) == 12 and all(np.isfinite(x["loss"]) and x["skipped"] == 0 for x in h)
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(full.params),
                                                                      jax.tree.leaves(base)))
    assert all(0 <= x["reward"] <= 1 for x in h)
    if name == "rl":
        assert {"pg_loss", "kl", "abs_advantage"} <= set(h[0]) and "lm_loss" not in h[0]
        assert h[0]["kl"] == pytest.approx(0, abs=1e-6) and h[-1]["kl"] > 0  # starts at the base model
        assert full.info["samples"] == 12 * 2 * 2 and set(full.info) == {"samples", "reward_first", "reward_last"}
    else:
        assert {"dpo_loss", "pair_accuracy", "pairs", "lm_loss"} <= set(h[0])
        assert h[0]["dpo_loss"] == pytest.approx(np.log(2), rel=1e-4) or h[0]["pairs"] == 0  # policy = reference
        assert full.info["samples"] == 3 * 4 * 2  # a pair set per iteration
        assert full.info["pairs"] + full.info["pairs_dropped"] == 3 * 4 and full.info["pairs"] > 0

    if name == "rl":  # stopped after step 5 (a simulated preemption): resumed from the checkpoint at step 3
        assert run(tmp_path / "cut", stop_after=5) is None
        assert sorted(os.listdir(tmp_path / "cut" / "checkpoints" / name)) == ["3"]
    else:  # a SIGINT during step 5: checkpointed at its end, mid-iteration 2 (with the iteration's pair set)
        boundaries, requested = [], preemption.requested

        def interrupt():
            boundaries.append(1)
            if len(boundaries) == 5:
                signal.raise_signal(signal.SIGINT)
            return requested()

        monkeypatch.setattr(preemption, "requested", interrupt)
        with pytest.raises(preemption.Preempted, match="^preempted at step 5 of dpo"):
            run(tmp_path / "cut")
        monkeypatch.setattr(preemption, "requested", requested)
        assert sorted(os.listdir(tmp_path / "cut" / "checkpoints" / name)) == ["3", "5"]
    resumed = run(tmp_path / "cut")  # the same parameters as the uninterrupted run
    _assert_bitwise(resumed.params, full.params)
    assert [x["loss"] for x in resumed.history] == [x["loss"] for x in h]
    assert resumed.info == full.info
    lines = (tmp_path / "cut" / f"metrics_{name}.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))

    # a changed setting of the method refuses the checkpoint
    config[name].k = 3 if name == "dpo" else 4
    with pytest.raises(UserInputError, match="different config"):
        run(tmp_path / "cut")


def test_rl_dpo_config_errors(setup):
    tmp, tok, corpus, mesh, base, _ = setup
    cases = [({"rl__k": 1}, "config.rl.k=1"), ({"rl__chunks": 3}, "config.rl.prompts_per_step=2"),
             ({"rl__k": 3}, "config.rl.chunks=2"),  # 3 rows per sampler call, 2 data shards
             ({"dpo__beta": 0.0}, "config.dpo.beta=0.0"), ({"dpo__pairs_per_step": 5}, "config.dpo.pairs_per_step=5"),
             ({"dpo__pairs_per_step": 1}, "config.dpo.pairs_per_step=1"),  # 1 row over 2 data shards
             ({"dpo__prompts_per_iteration": 20, "dpo__pairs_per_step": 2}, "config.dpo.prompts_per_iteration=20")]
    for overrides, message in cases:
        with pytest.raises(UserInputError, match=message.replace(".", r"\.")):
            check_rl_config(_rl_config(tmp, tok, **overrides), mesh)
    check_rl_config(_rl_config(tmp, tok), mesh)


def test_sampler_continues_each_prompt_k_times_in_consecutive_rows(setup):
    from regft_jax.train.schedules import Sampler

    tmp, tok, corpus, mesh, base, _ = setup
    config = _rl_config(tmp, tok)
    sampler = Sampler(CFG, corpus, GRADED, config.method, mesh, 0, prompt_words=2)
    s = Sampler.collect(sampler.generate(base, 7, 0, rows=8, repeats=2))
    prompts = np.where(s.loss_mask == 0, s.tokens, -1)
    assert all((prompts[i] == prompts[i + 1]).all() for i in range(0, 8, 2))
    assert len({prompts[i].tobytes() for i in range(0, 8, 2)}) > 1
    assert (s.tokens[0::2] != s.tokens[1::2]).any()  # each row its own continuation
    # repeats=1 (the default) chooses the prompts as before: rng (seed, iteration), samples_per_iteration rows
    s = Sampler.collect(sampler.generate(base, 7, 0))
    chosen = np.random.default_rng((0, 7)).choice(len(sampler.prompts), config.method.samples_per_iteration,
                                                  replace=False)
    for row, i in zip(s.tokens, chosen):
        p = sampler.prompts[i]
        assert row[sampler.prompt_len - len(p):sampler.prompt_len].tolist() == p
