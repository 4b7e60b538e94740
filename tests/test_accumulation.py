"""Gradient accumulation is exact: accum_steps = 2, 4 give the same update as one full batch, for
the SFT, LLM (adaptive, row-sliced domains), auxiliary and joint steps, with unequal token counts
per row (so the microbatches must be weighted by their normalizers, not averaged)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from regft_jax import sharding
from regft_jax.errors import UserInputError
from regft_jax.models import ModelConfig, forward, init_params
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.train.aux import aux_objective, aux_step
from regft_jax.train.method import Frozen, MethodSpec, joint_step, llm_step, make_joint_step
from regft_jax.train.steps import init_train_state, sft_step, target_count

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_seq_len=64)
ACFG = aux_config(CFG, 1)
B, S = 8, 12
DOMAIN_ROWS = (4, 4)  # rows 0-3 general (Ω_keep), rows 4-7 toxic (Ω_tox)


def _spec(accum_steps, domain_rows=DOMAIN_ROWS):
    method = ml_collections.ConfigDict({"adaptive": True, "lambda_toxic": 2.0, "lambda_keep": 0.5,
                                        "p_ref": "current", "beta": 1.0, "accum_steps": accum_steps})
    return MethodSpec.from_config(method, (False, True), domain_rows=domain_rows)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    params = init_params(CFG, jax.random.key(seed))
    frozen = Frozen(anchor=init_params(CFG, jax.random.key(seed + 1)))
    aux_params = init_aux_params(ACFG, jax.random.key(seed + 2), mean_label=0.7, llm_params=params)
    aux_params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(9), aux_params["head"]["kernel"].shape)
    lengths = np.array([13, 2, 9, 0, 5, 13, 1, 7])  # counted targets per row differ widely (one row has none)
    corpus = {"tokens": jnp.asarray(rng.integers(0, 61, (B, S + 1)), jnp.int32),
              "loss_mask": jnp.asarray(np.arange(S + 1)[None] < lengths[:, None], jnp.int32),
              "domain": jnp.asarray([0] * 4 + [1] * 4, jnp.int32)}
    generated = np.array([6, 2, 5, 1, 3, 6, 2, 4])
    samples = {"tokens": jnp.asarray(rng.integers(0, 61, (8, 10)), jnp.int32),
               "loss_mask": jnp.asarray((np.arange(10)[None] >= 4) & (np.arange(10)[None] < 4 + generated[:, None]),
                                        jnp.int32),
               "attention_mask": jnp.ones((8, 10), jnp.int32),
               "label": jnp.asarray([1.0, 0.0, 1.0, np.nan, 0.2, 0.9, 0.0, 1.0], jnp.float32),
               "proposal_logp": jnp.asarray(rng.uniform(-40.0, -38.0, 8), jnp.float32)}  # importance-weighted
    opt = optax.sgd(0.5)  # linear in the gradient: equal updates ⇔ equal gradients
    return params, aux_params, frozen, opt, corpus, samples


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _strided_weights(batch, k, weight_fn):
    return [float(weight_fn(jax.tree.map(lambda x: x[j::k], batch))) for j in range(k)]


def test_microbatch_weights_differ():
    """The check is meaningful: unweighted means of microbatch losses would not be exact."""
    params, aux_params, _, _, corpus, samples = _setup()
    aux_weight = lambda mb: aux_objective(ACFG, aux_params, mb, forward(CFG, params, mb["tokens"]), 1.0)[1]["aux_weight"]
    for k in (2, 4):
        assert len(set(_strided_weights(corpus, k, target_count))) == k
        assert len(set(_strided_weights(samples, k, aux_weight))) == k


@pytest.mark.parametrize("k", [2, 4])
def test_sft_step(k):
    params, _, _, opt, corpus, _ = _setup()
    state = init_train_state(params, opt)
    full, m1 = jax.jit(functools.partial(sft_step, CFG, opt))(state, corpus)
    acc, mk = jax.jit(functools.partial(sft_step, CFG, opt, accum_steps=k))(state, corpus)
    _close(acc.params, full.params)
    _close(mk, m1)


@pytest.mark.parametrize("k", [2, 4])
def test_llm_step(k):
    params, aux_params, frozen, opt, corpus, _ = _setup()
    state = init_train_state(params, opt)
    full, m1 = jax.jit(functools.partial(llm_step, CFG, ACFG, _spec(1), opt))(state, aux_params, frozen, corpus)
    acc, mk = jax.jit(functools.partial(llm_step, CFG, ACFG, _spec(k), opt))(state, aux_params, frozen, corpus)
    assert float(m1["reg_loss"]) > 0
    _close(acc.params, full.params)
    for key in ("loss", "lm_loss", "reg_loss", "tokens", "grad_norm"):
        np.testing.assert_allclose(float(mk[key]), float(m1[key]), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_aux_step(k):
    params, aux_params, _, opt, _, samples = _setup()
    state = init_train_state(aux_params, opt)
    full, m1 = jax.jit(functools.partial(aux_step, ACFG, CFG, opt, 1.0))(state, params, samples)
    acc, mk = jax.jit(functools.partial(aux_step, ACFG, CFG, opt, 1.0, accum_steps=k))(state, params, samples)
    _close(acc.params, full.params)
    assert 0 < float(m1["ess"]) < 0.99  # the importance weights are not uniform
    _close({k: v for k, v in mk.items() if k != "ess"}, {k: v for k, v in m1.items() if k != "ess"})  # ess: per microbatch


@pytest.mark.parametrize("k", [2, 4])
def test_joint_step(k):
    params, aux_params, frozen, opt, corpus, samples = _setup()
    llm, aux = init_train_state(params, opt), init_train_state(aux_params, opt)
    step = lambda spec: jax.jit(functools.partial(joint_step, CFG, ACFG, spec, opt, opt))(llm, aux, frozen, corpus,
                                                                                          samples)
    full_llm, full_aux, m1 = step(_spec(1))
    acc_llm, acc_aux, mk = step(_spec(k))
    _close(acc_llm.params, full_llm.params)
    _close(acc_aux.params, full_aux.params)
    np.testing.assert_allclose(float(mk["llm/loss"]), float(m1["llm/loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(mk["aux/loss"]), float(m1["aux/loss"]), rtol=1e-5)


def test_sharded_accumulated_joint_step():
    """On a data × tensor mesh, the strided microbatches split each data shard locally."""
    params, aux_params, frozen, opt, corpus, samples = _setup()
    llm, aux = init_train_state(params, opt), init_train_state(aux_params, opt)
    full_llm, full_aux, _ = jax.jit(functools.partial(joint_step, CFG, ACFG, _spec(1), opt, opt))(
        llm, aux, frozen, corpus, samples)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    step = make_joint_step(CFG, ACFG, _spec(2), opt, opt, mesh, frozen, corpus, samples, donate=False)
    acc_llm, acc_aux, _ = step(llm, aux, frozen, corpus, samples)
    _close(acc_llm.params, full_llm.params, atol=5e-6)
    _close(acc_aux.params, full_aux.params, atol=5e-6)


def test_indivisible_accum_steps_is_a_user_error():
    with pytest.raises(UserInputError, match="config.method.accum_steps"):
        _spec(3)  # 4 rows per domain
    with pytest.raises(UserInputError, match="config.method.accum_steps"):
        _spec(0)
    params, aux_params, frozen, opt, corpus, _ = _setup()
    state = init_train_state(params, opt)
    with pytest.raises(UserInputError, match="config.method.accum_steps"):  # no domain rows: the batch size
        llm_step(CFG, ACFG, _spec(3, domain_rows=None), opt, state, aux_params, frozen, corpus)
    with pytest.raises(UserInputError, match="accum_steps=3"):
        sft_step(CFG, opt, state, corpus, accum_steps=3)
