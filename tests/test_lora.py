"""LoRA (`models/lora.py`): a fresh adapter is the base model, a merged export is the adapted model (checked in
HF PyTorch), only the factors train and their gradient has the closed form, and the methods train with it."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regft_jax import models, sharding
from regft_jax.losses import lm_loss
from regft_jax.models import lora
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.models.config import ConfigError
from regft_jax.train.methods import train_method
from regft_jax.train.steps import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings
from tests.hf_reference import VOCAB, hf_logits, make_hf_model
from tests.test_schedules import CFG, _assert_bitwise, _config, setup  # noqa: F401 (fixture)

ATOL = 1e-4


def _ids(batch=2, seq=11, seed=0, vocab=VOCAB):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


def _perturbed(params: dict, seed: int = 1, scale: float = 0.3) -> dict:
    """Random non-zero LoRA B factors (a trained adapter)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: scale * jax.random.normal(next(keys), x.shape, x.dtype) if str(p[-1].key).endswith("_lora_b")
        else x, params)


@pytest.fixture(scope="module", params=["llama_gqa", "falcon_40b_grouped"])
def hf_model(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    cfg, params = models.load_hf(path)
    return request.param, model, cfg, params


def test_zero_b_equals_the_base_model(hf_model):
    _, model, cfg, params = hf_model
    lcfg, lparams = lora.add_lora(cfg, params, rank=4, alpha=8.0, targets="all", rng=jax.random.key(0))
    assert lcfg.lora_targets == cfg.projections and lcfg.lora_scale == 2.0
    factors = jax.tree.leaves(lora.lora_factors(lparams))
    assert len(factors) == 2 * len(cfg.projections) and any(np.abs(np.asarray(f)).max() > 0 for f in factors)
    _assert_bitwise(lora.merge_lora(lcfg, lparams)[1], params)
    ids = _ids()
    ours = np.asarray(models.forward(lcfg, lparams, ids))
    np.testing.assert_array_equal(ours, np.asarray(models.forward(cfg, params, ids)))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=ATOL, rtol=0)
    # the KV-cache path (the sampler's) too
    cache = models.init_cache(lcfg, 2, 16)
    cached, _ = models.forward_cached(lcfg, lparams, jnp.asarray(ids), cache)
    np.testing.assert_allclose(np.asarray(cached), ours, atol=1e-5, rtol=0)


def test_merged_export_equals_the_unmerged_forward(hf_model, tmp_path):
    _, model, cfg, params = hf_model
    lcfg, lparams = lora.add_lora(cfg, params, rank=3, alpha=6.0, targets="q,v,o,down", rng=jax.random.key(0))
    lparams = _perturbed(lparams)
    ids = _ids(seed=2)
    unmerged = np.asarray(models.forward(lcfg, lparams, ids))
    assert np.abs(unmerged - hf_logits(model, ids)).max() > 1e-2  # the adapter changes the model
    models.save_hf(lcfg, lparams, str(tmp_path / "export"))  # merges on export
    reloaded = type(model).from_pretrained(str(tmp_path / "export")).float().eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), unmerged, atol=ATOL, rtol=0)
    mcfg, merged = lora.merge_lora(lcfg, lparams)
    assert mcfg.lora_rank == 0 and not lora.lora_factors(merged)
    np.testing.assert_allclose(np.asarray(models.forward(mcfg, merged, ids)), unmerged, atol=1e-5, rtol=0)


def test_only_the_factors_have_gradients_and_they_follow_the_chain_rule():
    """With W' = W + s·A B (per layer, A and B flattened to matrices): dL/dA = s · dL/dW' Bᵀ and
    dL/dB = s · Aᵀ dL/dW', dL/dW' from the merged plain model; every other gradient is exactly 0."""
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             mlp_dim=48)
    lcfg, lparams = lora.add_lora(cfg, models.init_params(cfg, jax.random.key(0)), rank=4, alpha=2.0,
                                  rng=jax.random.key(1))
    lparams = _perturbed(lparams, scale=0.1)
    tokens = jnp.asarray(_ids(3, 9, vocab=64))
    mask = jnp.ones((3, 8))
    loss = lambda c, p: lm_loss(models.forward(c, p, tokens[:, :-1]), tokens[:, 1:], mask)[0]  # noqa: E731
    grads = jax.grad(lambda p: loss(lcfg, p))(lparams)
    mcfg, merged = lora.merge_lora(lcfg, lparams)
    grads_w = jax.grad(lambda p: loss(mcfg, p))(merged)
    for leaf in jax.tree.leaves(_non_factors(grads)):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    s = lcfg.lora_scale
    for part in ("attn", "mlp"):
        for name in (t for t in lcfg.lora_targets if f"{t}_lora_a" in lparams["layers"][part]):
            a, b = lparams["layers"][part][f"{name}_lora_a"], lparams["layers"][part][f"{name}_lora_b"]
            g_w = grads_w["layers"][part][name]
            layers, r = a.shape[0], a.shape[-1]
            a2, b2 = np.asarray(a).reshape(layers, -1, r), np.asarray(b).reshape(layers, r, -1)
            g2 = np.asarray(g_w).reshape(layers, a2.shape[1], -1)
            np.testing.assert_allclose(np.asarray(grads["layers"][part][f"{name}_lora_a"]).reshape(a2.shape),
                                       s * np.einsum("lio,lro->lir", g2, b2), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(np.asarray(grads["layers"][part][f"{name}_lora_b"]).reshape(b2.shape),
                                       s * np.einsum("lir,lio->lro", a2, g2), rtol=1e-4, atol=1e-7)


def _non_factors(tree: dict) -> dict:
    return lora._select(tree, False)


def test_lora_steps_move_only_the_factors_and_shard_like_one_device():
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             mlp_dim=48)
    base = models.init_params(cfg, jax.random.key(0))
    batch = {"tokens": jnp.asarray(_ids(8, 17, vocab=64)), "loss_mask": jnp.ones((8, 17), jnp.float32)}
    optimizer = make_optimizer(1e-2, weight_decay=0.1, only_lora=True)
    finals = []
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])
        lcfg, lparams = lora.add_lora(cfg, base, rank=4, alpha=8.0, rng=jax.random.key(1), mesh=mesh)
        state_sh = train_state_shardings(mesh, lcfg, optimizer)
        state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=state_sh)(lparams)
        step = jit_sharded(lambda st, b: sft_step(lcfg, optimizer, st, b), mesh, state_sh, batch)
        losses = []
        for _ in range(5):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0] - 0.05
        _assert_bitwise(_non_factors(state.params), _non_factors(lparams))  # frozen: no update, no weight decay
        assert np.abs(np.asarray(state.params["layers"]["attn"]["q_lora_b"])).max() > 0
        # no optimizer moments for the frozen weights
        mu = state.opt_state.inner_states["lora"].inner_state[1][0].mu
        assert not jax.tree.leaves(_non_factors(mu))
        finals.append(jax.device_get(state.params))
    for x, y in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1]), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-4)


def test_aux_model_starts_from_the_merged_llm():
    cfg = CFG
    lcfg, lparams = lora.add_lora(cfg, models.init_params(cfg, jax.random.key(0)), rank=2, alpha=4.0,
                                  rng=jax.random.key(1))
    lparams = _perturbed(lparams)
    acfg = aux_config(lcfg, 1)
    assert acfg.lora_rank == 0
    got = init_aux_params(acfg, jax.random.key(2), mean_label=0.3, llm_params=lora.merge_lora(lcfg, lparams)[1])
    merged = lora.merge_lora(lcfg, lparams)[1]
    np.testing.assert_array_equal(np.asarray(got["trunk"]["layers"]["attn"]["q"]),
                                  np.asarray(merged["layers"]["attn"]["q"][:1]))


@pytest.mark.parametrize("name", ["sft", "ours", "rl"])
def test_methods_train_only_the_factors_and_resume(setup, tmp_path, name):
    tmp, tok, corpus, mesh, base, oracle = setup
    config = _config(tmp, tok)
    config.rl.update({"k": 2, "prompts_per_step": 2, "chunks": 1})
    config.lora.update({"rank": 2, "targets": "q,v,up"})
    lcfg, lbase = lora.from_config(config, CFG, base, mesh)
    assert lcfg.lora_targets == ("q", "v", "up")
    trained = train_method(name, config, mesh, corpus, lcfg, lbase, oracle, workdir=str(tmp_path))
    _assert_bitwise(_non_factors(trained.params), base)
    moved = np.abs(np.asarray(trained.params["layers"]["attn"]["q_lora_b"])).max()
    assert moved > 0
    # resumed from the checkpoint before the last (optimizer state with its masked leaves): the same end
    ckpts = os.path.join(str(tmp_path), "checkpoints", name)
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert len(steps) == 2, os.listdir(ckpts)
    shutil.rmtree(os.path.join(ckpts, str(steps[-1])))
    again = train_method(name, config, mesh, corpus, lcfg, lbase, oracle, workdir=str(tmp_path))
    _assert_bitwise(again.params, trained.params)
    config.lora.rank = 3  # another rank: its checkpoints are not this run's
    with pytest.raises(Exception, match="different config"):
        train_method(name, config, mesh, corpus, *lora.from_config(config, CFG, base, mesh), oracle,
                     workdir=str(tmp_path))


def test_bad_targets_are_named():
    falcon = models.ModelConfig(family="falcon", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                num_kv_heads=1, head_dim=8, mlp_dim=64, norm="layer", activation="gelu",
                                parallel_block=True, num_block_norms=1, qkv_layout="falcon_mqa")
    params = models.init_params(falcon, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"config.lora.targets='q,gate'.*q, k, v, o, up, down"):
        lora.add_lora(falcon, params, rank=2, alpha=1.0, targets="q,gate", rng=jax.random.key(0))
    with pytest.raises(ConfigError, match=r"config.lora.rank=0"):
        lora.add_lora(falcon, params, rank=0, alpha=1.0, rng=jax.random.key(0))
    with pytest.raises(ConfigError, match="lora_targets"):
        falcon.replace(lora_rank=2, lora_targets=("gate",))
