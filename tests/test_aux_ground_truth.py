"""Ground truth for the auxiliary model: a source small enough to enumerate exactly.

p_ref is a tiny random decoder over V = 5 tokens; every continuation y_1..y_T (T = 4) of a fixed
two-token prompt is enumerated (5^4 = 625 sequences) with its exact probability. For an oracle C,
the exact  R(h, v) = E_{x ~ p_ref | h, v}[C(x)]  is a conditional mean over the enumeration. The
aux model is trained with `aux_step` on samples of p_ref labeled by C; then
  * the learned R must match the exact R (errors weighted by the prefix probability p(h, v)), and
  * NADO decoding q(v|h) ∝ p_ref(v|h) R(h, v) must satisfy the oracle at the rate the theory
    predicts: with the exact R, q(x) = p(x) C(x) / E_p[C], so E_q[C] = E_p[C²] / E_p[C].
Run with -s to see the measured numbers.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regft_jax import losses, models, sampling
from regft_jax.models.aux import AuxGuidance, aux_config, aux_logits, init_aux_params
from regft_jax.train import init_train_state, make_optimizer
from regft_jax.oracles import make_oracle
from regft_jax.train.aux import make_aux_step
from regft_jax.train.schedules import Samples, oracle_labels

V, T = 5, 4
PROMPT = [3, 1]  # two distinct tokens: a run of one repeated token is invisible to RoPE attention
LLM = models.ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                         mlp_dim=64, init_std=0.2, max_seq_len=16)
ORACLES = {
    "hard": lambda y: (y[:, 1:] != 0).all(1).astype(np.float64),  # no token 0 after y_1
    "soft": lambda y: 0.3 ** (y[:, 1:] == 0).sum(1),  # each token 0 after y_1 costs a factor 0.3
}
STEPS, BATCH = 300, 256


@pytest.fixture(scope="module")
def source():
    params = models.init_params(LLM, jax.random.key(2))
    ys = np.array(list(itertools.product(range(V), repeat=T)), np.int32)  # [N, T] all continuations
    tokens = np.concatenate([np.tile(np.array(PROMPT, np.int32), (len(ys), 1)), ys], 1)
    logits = np.asarray(jax.jit(models.forward, static_argnums=0)(LLM, params, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # float64: exact normalization
    step_logp = logp[:, len(PROMPT) - 1:-1]  # [N, T, V]: log p_ref(· | h_{i-1})
    step_logp[:, 0] = step_logp[0, 0]  # one value per prefix (rows sharing h_{i-1} agree to float32 rounding)
    for i in range(1, T):
        _, first, inverse = np.unique(ys[:, :i], axis=0, return_index=True, return_inverse=True)
        step_logp[:, i] = step_logp[first[inverse.ravel()], i]
    px = np.exp(np.take_along_axis(step_logp, ys[..., None], -1)[..., 0].sum(1))
    assert abs(px.sum() - 1) < 1e-12
    return params, ys, tokens, step_logp, px


def _prefix_ids(ys, i):
    """An id per distinct prefix y_1..y_{i+1}."""
    return ys[:, :i + 1] @ (V ** np.arange(i + 1))


def _exact_R(ys, px, c):
    """R[x, i] = E[C | y_1..y_{i+1} of x] = Σ_{x' sharing that prefix} p(x') C(x') / Σ p(x')."""
    out = np.zeros((len(ys), T))
    for i in range(T):
        ids = _prefix_ids(ys, i)
        out[:, i] = (np.bincount(ids, px * c, V ** (i + 1)) / np.bincount(ids, px, V ** (i + 1)))[ids]
    return out


def _token_q(step_logp, ys, r_all):
    """q(x) = Π_i p(y_i|h) R(h, y_i) / Σ_v p(v|h) R(h, v), with r_all [N, T, V] = R(h_{i-1}, v)."""
    num = np.exp(step_logp) * r_all
    den = num.sum(-1)
    ratio = np.take_along_axis(num, ys[..., None], -1)[..., 0] / np.where(den > 0, den, 1.0)
    return ratio.prod(1)


def _train(params, ys, tokens, px, c, *, from_llm, seed=0, proposal=None, weighted=False):
    """Train on exact samples of p_ref (`px`), or of `proposal` (probabilities of the N sequences),
    then with `weighted` each batch carries log proposal(y) (importance weights p_ref/proposal)."""
    acfg = aux_config(LLM, 1, init_std=0.02)
    draw = px if proposal is None else proposal
    mean = float((draw * c).sum())
    aux = init_aux_params(acfg, jax.random.key(seed), mean_label=mean, llm_params=params if from_llm else None)
    optimizer = make_optimizer(5e-3, grad_clip=1.0, warmup_steps=20, total_steps=STEPS)
    state = init_train_state(aux, optimizer)
    step = make_aux_step(acfg, LLM, optimizer, beta=1.0)
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((BATCH, len(PROMPT) + T), np.int32)
    loss_mask[:, len(PROMPT):] = 1
    for _ in range(STEPS):
        idx = rng.choice(len(ys), BATCH, p=draw)  # exact samples of p_ref (or of the proposal)
        batch = {"tokens": tokens[idx], "loss_mask": loss_mask, "label": c[idx].astype(np.float32)}
        if weighted:
            batch["proposal_logp"] = np.log(draw[idx]).astype(np.float32)
        state, metrics = step(state, params, batch)
    assert np.isfinite(float(metrics["loss"]))
    z = np.asarray(jax.jit(aux_logits, static_argnums=0)(acfg, state.params, tokens), np.float64)
    return acfg, state.params, z[:, len(PROMPT) - 1:-1]  # [N, T, V]: z(h_{i-1})


def test_exact_R_gives_the_theoretical_distribution(source):
    """Sanity of the enumeration and of the theory: token-level q with the exact R telescopes to
    p(x) C(x) / E_p[C]."""
    _, ys, _, step_logp, px = source
    for c in (f(ys) for f in ORACLES.values()):
        r = _exact_R(ys, px, c)
        # R(h, v) for every v: the exact R at depth i of the sequence with y_i replaced by v
        # (`ys` is in lexicographic order, so a sequence's row is its base-V number)
        place = V ** np.arange(T)[::-1]
        r_all = np.zeros((len(ys), T, V))
        for i in range(T):
            for v in range(V):
                alt = ys.copy()
                alt[:, i] = v
                r_all[:, i, v] = r[alt @ place, i]
        q = _token_q(step_logp, ys, r_all)
        np.testing.assert_allclose(q, px * c / (px * c).sum(), atol=1e-9)


@pytest.mark.parametrize("oracle, from_llm, tol_mean, tol_max, tol_rate",
                         [("hard", False, 0.05, 0.25, 0.03), ("soft", True, 0.05, 0.25, 0.03)])
def test_learned_R_matches_exact_R_and_q_satisfies_the_oracle(source, oracle, from_llm, tol_mean, tol_max,
                                                               tol_rate):
    params, ys, tokens, step_logp, px = source
    c = ORACLES[oracle](ys)
    exact = _exact_R(ys, px, c)
    acfg, aux, z = _train(params, ys, tokens, px, c, from_llm=from_llm)
    learned_all = 1 / (1 + np.exp(-z))  # R̂(h_{i-1}, v) for every v
    learned = np.take_along_axis(learned_all, ys[..., None], -1)[..., 0]
    err = np.abs(learned - exact)
    # Σ over prefixes (h, v) of p(h, v)|err| = Σ_x p(x)|err_i(x)| per depth i.
    mean_err = (px[:, None] * err).sum(0)
    max_err = [err[np.bincount(_prefix_ids(ys, i), px)[_prefix_ids(ys, i)] >= 0.01, i].max() for i in range(T)]
    p_rate = float((px * c).sum())
    theory = float((px * c * c).sum()) / p_rate
    q = _token_q(step_logp, ys, learned_all)
    q_rate = float((q * c).sum())
    print(f"\n[{oracle}, trunk {'from LLM' if from_llm else 'fresh'}] p(h,v)-weighted mean |R̂−R| per depth "
          f"{np.round(mean_err, 4)}, max over p(h,v) >= 0.01 {np.round(max_err, 4)}; "
          f"E_p[C] = {p_rate:.4f}, E_q̂[C] = {q_rate:.4f}, theory E_p[C²]/E_p[C] = {theory:.4f}")
    assert abs(q.sum() - 1) < 1e-5
    assert mean_err.max() < tol_mean and max(max_err) < tol_max
    assert abs(q_rate - theory) < tol_rate
    assert q_rate - p_rate > 0.15  # guidance does satisfy the oracle far more often than p_ref
    # q computed through the library's guided_logits: the same distribution
    ref_logits = jnp.asarray(step_logp, jnp.float32)
    q_lib = jax.nn.log_softmax(losses.guided_logits(ref_logits, jnp.asarray(z, jnp.float32)), -1)
    np.testing.assert_allclose(np.exp(np.take_along_axis(np.asarray(q_lib), ys[..., None], -1)[..., 0].sum(1)), q,
                               rtol=1e-4, atol=1e-7)
    if oracle == "soft":  # NADO decoding through the sampler: empirical rate vs the exact E_q̂[C]
        n = 1024
        conts = sampling.generate(LLM, params, [PROMPT] * n, max_new_tokens=T, temperature=1.0, seed=3,
                                  batch_size=n, guidance=AuxGuidance(acfg), guidance_params=aux)
        rate = float(ORACLES[oracle](np.array(conts)).mean())
        sd = np.sqrt(float((q * c * c).sum()) - q_rate ** 2) / np.sqrt(n)
        print(f"  sampled with AuxGuidance: rate {rate:.4f} vs E_q̂[C] {q_rate:.4f} (± {sd:.4f})")
        assert abs(rate - q_rate) < 4 * sd


def _weighted_R_error(learned_all, ys, exact, px):
    learned = np.take_along_axis(learned_all, ys[..., None], -1)[..., 0]
    return (px[:, None] * np.abs(learned - exact)).sum(0)  # p(h, v)-weighted mean |R̂ − R| per depth


def test_importance_weights_recover_R_from_a_tempered_proposal(source):
    """Samples from p_ref at temperature 2 (a proposal ≠ p_ref): with the weights p_ref(y)/proposal(y)
    the auxiliary model still learns R under p_ref; without them it learns R under the proposal,
    which differs measurably (the exact R of both are computed by enumeration)."""
    params, ys, tokens, step_logp, px = source
    c = ORACLES["hard"](ys)
    tempered = step_logp / 2.0
    tempered = tempered - np.log(np.exp(tempered).sum(-1, keepdims=True))
    proposal = np.exp(np.take_along_axis(tempered, ys[..., None], -1)[..., 0].sum(1))
    exact, biased = _exact_R(ys, px, c), _exact_R(ys, proposal, c)
    gap = _weighted_R_error(np.stack([biased] * V, -1), ys, exact, px)  # how far R under the proposal is
    assert gap.max() > 0.07
    errors = {}
    for weighted in (True, False):
        _, _, z = _train(params, ys, tokens, px, c, from_llm=True, proposal=proposal, weighted=weighted)
        errors[weighted] = _weighted_R_error(1 / (1 + np.exp(-z)), ys, exact, px)
    print(f"\n|R under proposal − R| {np.round(gap, 4)}; learned with weights {np.round(errors[True], 4)}, "
          f"without {np.round(errors[False], 4)}")
    assert errors[True].max() < 0.035  # recovers the exact R
    assert errors[False].max() > 0.04 and errors[False].max() > 2.5 * errors[True].max()  # biased


class _Words:
    """A stand-in tokenizer: token v decodes to the word "w<v>"."""

    def decode_batch(self, rows):
        return [" ".join(f"w{int(t)}" for t in row) for row in rows]


@pytest.mark.parametrize("label_text", ["continuation", "full"])
def test_label_orientation_from_oracle_to_R(source, label_text):
    """The oracle's P(violation) → the schedule's labels C = 1 − P (`oracle_labels`, as the
    sampler calls it) → aux training → R, then q = p·R: the learned R matches the exact R of the
    "hard" policy and q satisfies it more often than p. Flipping the orientation anywhere on the way
    (labels P instead of C, BCE toward 1 − c, q = p·(1 − R)) breaks one of the assertions."""
    params, ys, tokens, step_logp, px = source
    oracle = make_oracle("callable", fn=lambda texts: [float("w0" in t.split()[len(PROMPT) * (label_text == "full") + 1:])
                                                       for t in texts])
    mask = np.zeros(tokens.shape, np.int32)
    mask[:, len(PROMPT):] = 1
    samples = Samples(tokens=tokens, loss_mask=mask, attention_mask=np.ones_like(mask),
                      label=np.zeros(len(ys), np.float32), proposal_logp=np.zeros(len(ys), np.float32), step=0)
    c = oracle_labels(_Words(), oracle, samples, 0, len(ys), label_text).astype(np.float64)
    np.testing.assert_array_equal(c, ORACLES["hard"](ys))  # C = 1 − P: 1 for sequences that satisfy the policy
    _, _, z = _train(params, ys, tokens, px, c, from_llm=True)
    r = 1 / (1 + np.exp(-z))
    assert _weighted_R_error(r, ys, _exact_R(ys, px, c), px).max() < 0.05
    q = _token_q(step_logp, ys, r)
    assert float((q * c).sum()) > float((px * c).sum()) + 0.15
