"""The method's steps: joint step == separate steps, sharded == single device, row-sliced extra
forwards == full ones, NaN guard, and the sequential / parallel drivers end to end."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from regft_jax import losses, models, sharding
from regft_jax.models import ModelConfig, forward, init_params
from regft_jax.models.aux import aux_config, aux_logits, init_aux_params
from regft_jax.train.aux import aux_step
from regft_jax.train.method import (Frozen, MethodSpec, joint_step, llm_objective, llm_step, make_joint_step,
                                    sample_regularizer)
from regft_jax.train.steps import init_train_state, make_optimizer, sft_step

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_seq_len=64)
ACFG = aux_config(CFG, 1)
B, S = 8, 12  # corpus batch: 5 general rows (domain 0) then 3 toxic rows (domain 1)
DOMAIN_ROWS = (5, 3)


def _setup(seed=0, p_ref="current", adaptive=True):
    rng = np.random.default_rng(seed)
    params = init_params(CFG, jax.random.key(seed))
    base = init_params(CFG, jax.random.key(seed + 1))  # anchor differs from θ, so Ω_keep is not 0
    aux_params = init_aux_params(ACFG, jax.random.key(seed + 2), mean_label=0.7, llm_params=params)
    aux_params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(9), aux_params["head"]["kernel"].shape)
    corpus = {"tokens": jnp.asarray(rng.integers(0, 61, (B, S + 1)), jnp.int32),
              "loss_mask": jnp.asarray(rng.random((B, S + 1)) < 0.9, jnp.int32),
              "domain": jnp.asarray([0] * 5 + [1] * 3, jnp.int32)}
    samples = {"tokens": jnp.asarray(rng.integers(0, 61, (8, 10)), jnp.int32),
               "loss_mask": jnp.asarray([[0] * 4 + [1] * 6] * 8, jnp.int32),
               "attention_mask": jnp.ones((8, 10), jnp.int32),
               "label": jnp.asarray([1.0, 0.0, 1.0, np.nan, 0.2, 0.9, 0.0, 1.0], jnp.float32)}
    method = ml_collections.ConfigDict({"adaptive": adaptive, "lambda_toxic": 2.0, "lambda_keep": 0.5,
                                        "p_ref": p_ref, "beta": 1.0})
    spec = MethodSpec.from_config(method, (False, True), domain_rows=DOMAIN_ROWS)
    frozen = Frozen(anchor=base, snapshot=init_params(CFG, jax.random.key(seed + 3)) if p_ref == "snapshot" else None)
    opt, aux_opt = make_optimizer(1e-2), make_optimizer(1e-2)
    return spec, frozen, opt, aux_opt, init_train_state(params, opt), init_train_state(aux_params, aux_opt), corpus, samples


def _close(a, b, rtol=1e-5, atol=5e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("p_ref", ["current", "snapshot"])
def test_llm_objective_equals_explicit_formula(p_ref):
    """L = mean CE + Σ_t m_t λ_d Ω_d(h_t) / Σ m, with Ω computed from full forwards on every row."""
    spec, frozen, _, _, state, aux_state, corpus, _ = _setup(p_ref=p_ref)
    loss, metrics = llm_objective(CFG, ACFG, spec, state.params, aux_state.params, frozen, corpus)
    inputs, targets, mask = corpus["tokens"][:, :-1], corpus["tokens"][:, 1:], np.asarray(corpus["loss_mask"][:, 1:])
    logits = forward(CFG, state.params, inputs)
    ref = logits if p_ref == "current" else forward(CFG, frozen.snapshot, inputs)
    z = aux_logits(ACFG, aux_state.params, inputs)
    tox = np.asarray(losses.closed_form_regularizer(ref, z, logits))
    keep = np.asarray(losses.anchor_regularizer(forward(CFG, frozen.anchor, inputs), logits))
    omega = np.where(np.asarray(corpus["domain"])[:, None] == 1, 2.0 * tox, 0.5 * keep)
    lm = np.asarray(losses.token_cross_entropy(logits, targets))
    expected = (lm * mask).sum() / mask.sum() + (omega * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["reg_loss"]) > 0
    # The same objective without row slicing (every extra forward on every row).
    full = dataclasses.replace(spec, domain_rows=None)
    np.testing.assert_allclose(float(llm_objective(CFG, ACFG, full, state.params, aux_state.params, frozen, corpus)[0]),
                               float(loss), rtol=1e-6)


def test_joint_step_equals_separate_steps():
    spec, frozen, opt, aux_opt, state, aux_state, corpus, samples = _setup()
    llm_alone, m1 = jax.jit(functools.partial(llm_step, CFG, ACFG, spec, opt))(state, aux_state.params, frozen, corpus)
    aux_alone, m2 = jax.jit(functools.partial(aux_step, ACFG, CFG, aux_opt, spec.beta))(aux_state, state.params, samples)
    llm_j, aux_j, m = jax.jit(functools.partial(joint_step, CFG, ACFG, spec, opt, aux_opt))(
        state, aux_state, frozen, corpus, samples)
    _close(llm_j.params, llm_alone.params, rtol=1e-6, atol=1e-7)
    _close(aux_j.params, aux_alone.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(m["llm/loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["aux/loss"]), float(m2["loss"]), rtol=1e-6)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), llm_j.params, state.params))


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 1, "tensor": 4}, {"data": 1, "fsdp": 8, "tensor": 1}])
def test_sharded_joint_step_equals_single_device(mesh_shape):
    """Two joint steps with SGD+momentum (Adam's first steps are ≈ lr·sign(g), which turns float
    noise in near-zero gradient entries into lr-sized differences; tests/test_sharding.py covers
    sharded AdamW at a small learning rate)."""
    spec, frozen, _, _, _, _, corpus, samples = _setup()
    opt, aux_opt = optax.sgd(0.5, momentum=0.9), optax.sgd(0.5, momentum=0.9)
    _, _, _, _, state, aux_state, _, _ = _setup()
    state, aux_state = init_train_state(state.params, opt), init_train_state(aux_state.params, aux_opt)
    single = jax.jit(functools.partial(joint_step, CFG, ACFG, spec, opt, aux_opt))
    s_llm, s_aux = state, aux_state
    for _ in range(2):
        s_llm, s_aux, s_m = single(s_llm, s_aux, frozen, corpus, samples)
    mesh = sharding.make_mesh(mesh_shape)
    step = make_joint_step(CFG, ACFG, spec, opt, aux_opt, mesh, frozen, corpus, samples)
    m_llm, m_aux = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, aux_state)
    for _ in range(2):
        m_llm, m_aux, m_m = step(m_llm, m_aux, frozen, corpus, samples)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, m_llm.params)))
    _close(m_llm.params, s_llm.params)
    _close(m_aux.params, s_aux.params)
    _close(m_m, s_m)


def test_non_finite_gradients_skip_the_update():
    spec, frozen, opt, _, state, _, corpus, _ = _setup()
    bad = jax.tree.map(lambda a: a, state)
    bad.params["embed"] = bad.params["embed"].at[0, 0].set(jnp.nan)
    corpus = {**corpus, "tokens": corpus["tokens"].at[0, 0].set(0)}  # row 0 reads the NaN embedding
    new, m = jax.jit(functools.partial(sft_step, CFG, opt))(bad, corpus)
    assert float(m["skipped"]) == 1.0 and int(new.step) == int(bad.step)
    ok = [np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
          for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad.params))]
    assert all(ok)
    new, m = jax.jit(functools.partial(sft_step, CFG, opt))(state, corpus)
    assert float(m["skipped"]) == 0.0 and int(new.step) == 1


def test_constant_R_and_equal_anchor_make_the_method_plain_sft():
    """With R constant (fresh head) Ω_tox = 0; with the anchor = θ, Ω_keep = 0 and its gradient too:
    the LLM update then equals an SFT step."""
    spec, frozen, _, _, state, aux_state, corpus, _ = _setup()
    opt = optax.sgd(1.0)  # linear in the gradient, so equal updates mean equal gradients
    state = init_train_state(state.params, opt)
    aux_params = init_aux_params(ACFG, jax.random.key(5), mean_label=0.6)  # zero head: R constant
    frozen = Frozen(anchor=state.params)
    ours, _ = jax.jit(functools.partial(llm_step, CFG, ACFG, spec, opt))(state, aux_params, frozen, corpus)
    sft, _ = jax.jit(functools.partial(sft_step, CFG, opt))(state, corpus)
    _close(ours.params, sft.params, rtol=1e-5, atol=1e-6)


def test_joint_step_with_snapshot_reference_equals_explicit_updates():
    """p_ref = "snapshot": the LLM half regularizes toward q = p_snapshot · R and the aux half
    trains against p_snapshot (not θ); with SGD the updates are exactly the explicit gradients."""
    spec, frozen, _, _, state, aux_state, corpus, samples = _setup(p_ref="snapshot")
    opt = optax.sgd(1.0)
    state, aux_state = init_train_state(state.params, opt), init_train_state(aux_state.params, opt)
    llm_j, aux_j, _ = jax.jit(functools.partial(joint_step, CFG, ACFG, spec, opt, opt))(
        state, aux_state, frozen, corpus, samples)
    inputs, targets = corpus["tokens"][:, :-1], corpus["tokens"][:, 1:]
    mask = corpus["loss_mask"][:, 1:].astype(jnp.float32)
    ref = forward(CFG, frozen.snapshot, inputs)  # computed outside: a constant of the loss
    z = aux_logits(ACFG, aux_state.params, inputs)
    anchor = forward(CFG, frozen.anchor, inputs)
    toxic = (corpus["domain"] == 1)[:, None]

    def explicit(params):
        logits = forward(CFG, params, inputs)
        omega = jnp.where(toxic, 2.0 * losses.closed_form_regularizer(ref, z, logits),
                          0.5 * losses.anchor_regularizer(anchor, logits))
        return ((losses.token_cross_entropy(logits, targets) + omega) * mask).sum() / mask.sum()

    grads = jax.grad(explicit)(state.params)
    _close(llm_j.params, jax.tree.map(lambda p, g: p - g, state.params, grads), rtol=1e-5, atol=1e-6)
    aux_snapshot, _ = aux_step(ACFG, CFG, opt, spec.beta, aux_state, frozen.snapshot, samples)
    aux_current, _ = aux_step(ACFG, CFG, opt, spec.beta, aux_state, state.params, samples)
    _close(aux_j.params, aux_snapshot.params, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(aux_snapshot.params["head"]["kernel"]),
                           np.asarray(aux_current.params["head"]["kernel"]), atol=1e-6)


@pytest.mark.parametrize("p_ref", ["current", "snapshot"])
def test_sample_regularizer_equals_brute_force_and_stops_the_reference_gradient(p_ref):
    """λ_s · mean over the prefixes of generated tokens of Σ_v q (log q − log p_θ), q ∝ p_ref σ(z);
    its gradient treats q as a constant (for p_ref = "current" too: the gradient of a KL to a fixed
    target)."""
    spec, frozen, _, _, state, aux_state, _, samples = _setup(p_ref=p_ref)
    spec = dataclasses.replace(spec, sample_lambda=3.0)
    samples = {**samples, "attention_mask": samples["attention_mask"].at[2, :2].set(0)}  # a left-padded row
    value, metrics = sample_regularizer(CFG, ACFG, spec, state.params, aux_state.params, frozen, samples)
    tokens, am = samples["tokens"], samples["attention_mask"]
    logp = np.asarray(jax.nn.log_softmax(forward(CFG, state.params, tokens, attention_mask=am)), np.float64)
    ref_params = state.params if p_ref == "current" else frozen.snapshot
    ref = np.asarray(forward(CFG, ref_params, tokens, attention_mask=am), np.float64)
    z = np.asarray(aux_logits(ACFG, aux_state.params, tokens, am), np.float64)
    q = np.exp(ref) / (1 + np.exp(-z))
    q /= q.sum(-1, keepdims=True)
    kl = (q * (np.log(q) - logp)).sum(-1)  # [b, s]
    prefix = np.asarray(samples["loss_mask"])[:, 1:]  # slot t is the prefix of generated token t + 1
    expected = 3.0 * (kl[:, :-1] * prefix).sum() / prefix.sum()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["omega_samples"]), expected / 3.0, rtol=1e-5)
    q_const = jnp.log(jnp.asarray(q, jnp.float32))

    def fixed_target(params):
        lp = jax.nn.log_softmax(forward(CFG, params, tokens, attention_mask=am))
        return 3.0 * ((jnp.exp(q_const) * (q_const - lp)).sum(-1)[:, :-1] * prefix).sum() / prefix.sum()

    grads = jax.grad(lambda p: sample_regularizer(CFG, ACFG, spec, p, aux_state.params, frozen, samples)[0])(
        state.params)
    _close(grads, jax.grad(fixed_target)(state.params), rtol=1e-4, atol=1e-6)


def test_joint_step_with_sample_prefixes_equals_separate_steps():
    spec, frozen, opt, aux_opt, state, aux_state, corpus, samples = _setup()
    spec = dataclasses.replace(spec, sample_lambda=2.0)
    llm_alone, m1 = jax.jit(functools.partial(llm_step, CFG, ACFG, spec, opt))(state, aux_state.params, frozen,
                                                                               corpus, samples)
    llm_j, _, m = jax.jit(functools.partial(joint_step, CFG, ACFG, spec, opt, aux_opt))(
        state, aux_state, frozen, corpus, samples)
    _close(llm_j.params, llm_alone.params, rtol=1e-6, atol=1e-7)
    plain, m0 = jax.jit(functools.partial(llm_step, CFG, ACFG, dataclasses.replace(spec, sample_lambda=0.0), opt))(
        state, aux_state.params, frozen, corpus)
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]) + 2.0 * float(m1["omega_samples"]), rtol=1e-5)
    assert float(m1["omega_samples"]) > 0


@pytest.mark.parametrize("p_ref", ["current", "snapshot"])
def test_packed_rows_give_the_objective_of_their_documents_alone(p_ref):
    """With segment ids, L(θ) on packed rows (LM loss, Ω_keep with the anchor, Ω_tox with the
    auxiliary model and p_ref) equals L(θ) on the same documents one per row: nothing attends or
    rotates across a document boundary. Without them it differs."""
    spec, frozen, _, _, state, aux_state, _, _ = _setup(p_ref=p_ref)
    spec = dataclasses.replace(spec, domain_rows=None)
    rng = np.random.default_rng(3)
    docs = [[1] + list(rng.integers(3, 61, n)) + [2] for n in (4, 6, 3, 5)]  # bos ... eos
    rows, seg = [], []
    for a, b in ((docs[0], docs[1]), (docs[2], docs[3])):  # row 0: general, row 1: toxic
        rows.append(a + b)
        seg.append([1] * len(a) + [2] * len(b))
    width = max(map(len, rows))
    pad = lambda r, v=0: r + [v] * (width - len(r))
    tokens = np.array([pad(r) for r in rows], np.int32)
    segment_ids = np.array([pad(s) for s in seg], np.int32)
    loss_mask = ((segment_ids > 0) & (tokens != 1)).astype(np.int32)  # targets: every real token but BOS
    positions = np.asarray(models.segment_positions(jnp.asarray(segment_ids)))
    packed = {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions,
              "domain": np.array([0, 1], np.int32)}
    alone = {"tokens": np.array([pad(d) for d in docs], np.int32),
             "loss_mask": np.array([pad([0] + [1] * (len(d) - 1)) for d in docs], np.int32),
             "domain": np.array([0, 0, 1, 1], np.int32)}
    objective = lambda batch: llm_objective(CFG, ACFG, spec, state.params, aux_state.params, frozen, batch)
    (l_packed, m_packed), (l_alone, m_alone) = objective(packed), objective(alone)
    for key in ("lm_loss", "omega_closed_form", "omega_anchor", "tokens"):
        np.testing.assert_allclose(float(m_packed[key]), float(m_alone[key]), rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(float(l_packed), float(l_alone), rtol=2e-5)
    crossing = objective({k: v for k, v in packed.items() if k not in ("segment_ids", "positions")})[0]
    assert abs(float(crossing) - float(l_alone)) > 1e-3
