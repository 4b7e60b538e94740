"""The auxiliary model: head init, trunk from the LLM, incremental guidance, NADO sampling, sharded step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from regft_jax import losses, models, sampling, sharding
from regft_jax.models.aux import (AuxGuidance, aux_abstract_params, aux_config, aux_logical_axes,
                                  aux_logits_cached, init_aux_params)
from regft_jax.models.aux import aux_logits as _aux_logits
from regft_jax.train import init_train_state, make_optimizer
from regft_jax.train import aux as train_aux
from regft_jax.train.aux import aux_state_shardings, make_aux_step

LLAMA = models.ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=4,
                           head_dim=8, mlp_dim=96, init_std=0.1, max_seq_len=64)
FALCON = models.ModelConfig(family="falcon", vocab_size=128, hidden_size=64, num_layers=2, num_heads=8,
                            num_kv_heads=1, head_dim=8, mlp_dim=128, norm="layer", activation="gelu",
                            parallel_block=True, num_block_norms=1, qkv_layout="falcon_mqa",
                            tie_embeddings=True, init_std=0.1, max_seq_len=64)
PROMPTS = [[5, 17, 3, 9, 44, 2, 8], [11, 60], [7, 7, 31, 90]]
aux_logits = jax.jit(_aux_logits, static_argnums=0)
forward = jax.jit(models.forward, static_argnums=0)


def _random_head(aux_params, seed=7, scale=0.3):
    d, v = aux_params["head"]["kernel"].shape
    k1, k2 = jax.random.split(jax.random.key(seed))
    head = {"kernel": scale * jax.random.normal(k1, (d, v)), "bias": jax.random.normal(k2, (v,))}
    return {**aux_params, "head": head}


@pytest.fixture(scope="module")
def llm():
    return LLAMA, models.init_params(LLAMA, jax.random.key(0))


def test_head_init_gives_constant_mean_label():
    acfg = aux_config(LLAMA, 2)
    aux = init_aux_params(acfg, jax.random.key(1), mean_label=0.83)
    z = aux_logits(acfg, aux, jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 8))))
    assert z.shape == (2, 8, 128) and z.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.sigmoid(z), 0.83, atol=1e-6)
    assert "lm_head" not in aux["trunk"]
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), aux)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), aux_abstract_params(acfg))
    assert jax.tree.structure(aux_logical_axes(acfg), is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.structure(aux)


def test_trunk_from_llm_copies_the_first_k_layers(llm):
    cfg, params = llm
    k = 2
    acfg = aux_config(cfg, k)
    aux = init_aux_params(acfg, jax.random.key(1), mean_label=0.3, llm_params=params)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 8)))
    np.testing.assert_allclose(jax.nn.sigmoid(aux_logits(acfg, aux, tokens)), 0.3, atol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(aux["trunk"]["layers"]):
        src = params["layers"]
        for key in path:
            src = src[key.key]
        np.testing.assert_array_equal(a, src[:k])
        assert a.unsafe_buffer_pointer() != src.unsafe_buffer_pointer()  # own copies: safe to donate
    np.testing.assert_array_equal(aux["trunk"]["embed"], params["embed"])
    # z = the hidden state of the LLM truncated to k layers, through the aux head
    aux = _random_head(aux)
    truncated = dataclasses.replace(cfg, num_layers=k)
    tparams = {**params, "layers": jax.tree.map(lambda a: a[:k], params["layers"])}
    _, h = jax.jit(models.forward, static_argnums=0, static_argnames="return_hidden")(
        truncated, tparams, tokens, return_hidden=True)
    np.testing.assert_allclose(aux_logits(acfg, aux, tokens), h @ aux["head"]["kernel"] + aux["head"]["bias"],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only 3 layers"):
        init_aux_params(aux_config(cfg, 4), jax.random.key(0), mean_label=0.5, llm_params=params)


def test_incremental_guidance_equals_full_forward():
    acfg = aux_config(FALCON, 2)  # multi-query attention, parallel blocks (the sampling test: Llama GQA)
    aux = _random_head(init_aux_params(acfg, jax.random.key(2), mean_label=0.6))
    tokens, mask = sampling.pad_prompts(PROMPTS, 8, 3)
    cont = np.random.RandomState(3).randint(0, 128, (3, 5)).astype(np.int32)
    full_tokens = np.concatenate([tokens, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], 1)
    full = np.asarray(aux_logits(acfg, aux, full_tokens, full_mask))
    g = AuxGuidance(acfg)
    state = g.init(aux, 3, 13)
    extra, state = jax.jit(g)(aux, state, tokens, mask)
    np.testing.assert_allclose(extra, jax.nn.log_sigmoid(full[:, 7]), rtol=1e-5, atol=1e-5)
    for t in range(5):
        extra, state = jax.jit(g)(aux, state, cont[:, t:t + 1], np.ones((3, 1), np.int32))
        np.testing.assert_allclose(extra, jax.nn.log_sigmoid(full[:, 8 + t]), rtol=1e-5, atol=1e-5)
    # the non-last-only path as well
    cache = models.init_cache(acfg, 3, 13)
    z, _ = aux_logits_cached(acfg, aux, full_tokens, cache, full_mask)
    np.testing.assert_allclose(z, full, rtol=1e-5, atol=1e-5)


def test_nado_sampling_logprobs_equal_teacher_forced_q(llm):
    cfg, params = llm
    acfg = aux_config(cfg, 1)
    aux = _random_head(init_aux_params(acfg, jax.random.key(3), mean_label=0.5, llm_params=params), scale=1.0)
    conts, logps = sampling.generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5,
                                     guidance=AuxGuidance(acfg), guidance_params=aux, return_logprobs=True)
    # teacher-forced on one right-padded batch (causal: the padding does not change earlier slots)
    ids = np.zeros((len(PROMPTS), 13), np.int32)
    for i, (prompt, cont) in enumerate(zip(PROMPTS, conts)):
        ids[i, :len(prompt) + len(cont)] = prompt + cont
    ref = forward(cfg, params, ids)
    q = np.asarray(jax.nn.log_softmax(losses.guided_logits(ref, aux_logits(acfg, aux, ids)), -1))
    ref = np.asarray(jax.nn.log_softmax(ref, -1))
    for i, (prompt, cont, (logp, ref_logp)) in enumerate(zip(PROMPTS, conts, logps)):
        slots = np.arange(len(cont)) + len(prompt) - 1
        np.testing.assert_allclose(logp, q[i, slots, cont], atol=1e-4)
        np.testing.assert_allclose(ref_logp, ref[i, slots, cont], atol=1e-4)
        assert np.abs(logp - ref_logp).max() > 0.05  # the guidance changes the distribution


def _aux_batch(b=8, s=12, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 128, (b, s)).astype(np.int32)
    loss_mask = np.zeros((b, s), np.int32)
    loss_mask[:, 4:] = 1
    loss_mask[1, 9:] = 0
    label = rng.rand(b).astype(np.float32)
    label[3] = np.nan
    return {"tokens": tokens, "loss_mask": loss_mask, "label": label,
            "proposal_logp": rng.uniform(-30.0, -28.0, b).astype(np.float32)}


def _run_aux_steps(mesh, params, n=3):
    acfg = aux_config(LLAMA, 1)
    optimizer = make_optimizer(3e-3, weight_decay=0.1, grad_clip=1.0)
    aux = init_aux_params(acfg, jax.random.key(4), mean_label=0.5, llm_params=params)
    state = init_train_state(aux, optimizer)
    if mesh is not None:
        state = sharding.shard_tree(state, aux_state_shardings(mesh, acfg, optimizer))
        params = sharding.shard_tree(params, sharding.param_shardings(
            mesh, models.param_logical_axes(LLAMA), models.abstract_params(LLAMA)))
    step = make_aux_step(acfg, LLAMA, optimizer, 0.5, mesh=mesh, batch_example=_aux_batch())
    metrics = []
    for i in range(n):
        state, m = step(state, params, _aux_batch(seed=i % 2))
        metrics.append(jax.device_get(m))
    return state, metrics


def test_aux_step_sharded_equals_single_device(llm):
    _, params = llm
    single, single_m = _run_aux_steps(None, params)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    state, metrics = _run_aux_steps(mesh, params)
    assert state.params["head"]["kernel"].sharding.spec == P(None, "tensor")
    assert int(state.step) == 3
    for a, b in zip(metrics, single_m):
        assert set(a) >= {"loss", "aux_bce", "aux_consistency", "mean_R", "grad_norm"}
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4 if k == "grad_norm" else 1e-5, atol=5e-5)
    assert metrics[2]["loss"] < metrics[0]["loss"]  # same batch again: it learned
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5),
                 jax.device_get(state.params), jax.device_get(single.params))
    np.testing.assert_allclose(single_m[0]["mean_R"], 0.5, atol=1e-6)  # head init: R = mean label


def test_aux_step_window_skips_prompt_slots_exactly(llm):
    """`sample_tokens`: the vocabulary projections run on the continuation's slots only; the step
    (loss, metrics, updated params) is the same as over every slot, and costs fewer FLOPs."""
    _, params = llm
    acfg = aux_config(LLAMA, 1)
    optimizer = make_optimizer(3e-3)
    state = init_train_state(_random_head(init_aux_params(acfg, jax.random.key(4), mean_label=0.5,
                                                          llm_params=params)), optimizer)
    batch = _aux_batch()  # prompt = 4 columns, the last 8 generated
    batch["attention_mask"] = np.ones_like(batch["tokens"])
    batch["attention_mask"][2, :3] = 0  # a left-padded prompt
    steps = {k: jax.jit(lambda s, p, b, k=k: train_aux.aux_step(acfg, LLAMA, optimizer, 0.5, s, p, b, sample_tokens=k))
             for k in (None, 8)}
    (full, m_full), (window, m_window) = (steps[k](state, params, batch) for k in (None, 8))
    for k in m_full:
        np.testing.assert_allclose(m_window[k], m_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), window.params, full.params)
    flops = {k: fn.lower(state, params, batch).compile().cost_analysis() for k, fn in steps.items()}
    flops = {k: (c[0] if isinstance(c, (list, tuple)) else c)["flops"] for k, c in flops.items()}
    assert flops[8] < flops[None]
