"""Sharded execution equals single-device execution; sharding rules; orbax checkpoints; CLI."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from regft_jax import checkpoint, models, sharding
from regft_jax.train import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings

RTOL, ATOL = 1e-5, 5e-5

LLAMA = models.ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                           head_dim=8, mlp_dim=96, init_std=0.1)
FALCON_MQA = models.ModelConfig(family="falcon", vocab_size=128, hidden_size=64, num_layers=2, num_heads=8,
                                num_kv_heads=1, head_dim=8, mlp_dim=128, norm="layer", activation="gelu",
                                parallel_block=True, num_block_norms=1, qkv_layout="falcon_mqa",
                                tie_embeddings=True, init_std=0.1)
MESHES = {"2data_x_4tensor": {"data": 2, "fsdp": 1, "tensor": 4}, "8fsdp": {"data": 1, "fsdp": 8, "tensor": 1}}


def _place(cfg, params, mesh):
    shardings = sharding.param_shardings(mesh, models.param_logical_axes(cfg), models.abstract_params(cfg))
    return sharding.shard_tree(params, shardings)


def _batch(cfg, b=8, s=17, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, cfg.vocab_size, (b, s)).astype(np.int32)
    mask = (rng.rand(b, s) > 0.2).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask}


@pytest.mark.parametrize("cfg", [LLAMA, FALCON_MQA], ids=["llama_gqa", "falcon_mqa"])
@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_sharded_forward_equals_single_device(cfg, mesh_shape):
    assert len(jax.devices()) == 8
    params = models.init_params(cfg, jax.random.key(0))
    tokens = _batch(cfg)["tokens"]
    single = np.asarray(jax.jit(functools.partial(models.forward, cfg))(jax.device_get(params), tokens))
    mesh = sharding.make_mesh(MESHES[mesh_shape])
    sharded_params = _place(cfg, params, mesh)

    @jax.jit
    def fwd(p, t):
        with sharding.use_mesh(mesh):
            return models.forward(cfg, p, t)

    out = fwd(sharded_params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, rtol=RTOL, atol=ATOL)


def test_params_are_actually_partitioned():
    mesh = sharding.make_mesh(MESHES["2data_x_4tensor"])
    params = _place(LLAMA, models.init_params(LLAMA, jax.random.key(0)), mesh)
    assert params["layers"]["mlp"]["up"].sharding.spec == P(None, None, "tensor")
    assert params["layers"]["attn"]["q"].sharding.spec == P(None, None, "tensor", None)
    # One shard holds a quarter of the MLP kernel.
    shard = params["layers"]["mlp"]["up"].addressable_shards[0].data
    assert shard.shape == (2, 64, 24)
    # Multi-query KV (1 head) cannot be split over tensor=4: replicated on that axis instead.
    fparams = _place(FALCON_MQA, models.init_params(FALCON_MQA, jax.random.key(0)), mesh)
    assert fparams["layers"]["attn"]["k"].sharding.spec == P(None, None, None, None)
    fsdp = sharding.make_mesh(MESHES["8fsdp"])
    assert _place(LLAMA, params, fsdp)["embed"].sharding.spec == P(None, "fsdp")


def _run_steps(cfg, mesh, n=3):
    # eps 1e-4, not 1e-8: Adam's update m / (sqrt(v) + eps) of a near-zero gradient element turns float32
    # summation-order noise (~1e-9) into an lr-sized difference (CI: one of 8,192 LM-head weights off by
    # 1e-4 after 3 steps). With eps 1e-4 the update is at most lr / eps-Lipschitz in the gradient: sharding
    # noise stays below 1e-5, while a real sharding error moves gradients by ~their size and fails.
    optimizer = make_optimizer(1e-2, weight_decay=0.1, grad_clip=1.0, eps=1e-4)
    state_sh = train_state_shardings(mesh, cfg, optimizer)
    params = models.init_params(cfg, jax.random.key(1))
    state = sharding.shard_tree(init_train_state(params, optimizer), state_sh)
    step = jit_sharded(functools.partial(sft_step, cfg, optimizer), mesh, state_sh, _batch(cfg))
    metrics = []
    for i in range(n):
        state, m = step(state, _batch(cfg))  # same batch: the loss must fall
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, state


@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_sharded_adamw_step_equals_unsharded(mesh_shape):
    single_state, single_metrics, _ = _run_steps(LLAMA, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state, metrics, device_state = _run_steps(LLAMA, sharding.make_mesh(MESHES[mesh_shape]))
    assert device_state.params["layers"]["mlp"]["up"].sharding.spec != P()
    assert int(state.step) == 3
    for a, b in zip(metrics, single_metrics):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4, atol=ATOL)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), state.params,
                 single_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state.opt_state,
                 single_state.opt_state)


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("batch", "length"), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(2, 5)) == P("data", None)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh, shape=(6, 3)) == P("fsdp", None)
    with pytest.raises(sharding.ShardingError, match="'nonsense'"):
        sharding.logical_to_spec(("nonsense",), mesh)


def test_make_mesh_errors_and_fill():
    assert dict(sharding.make_mesh({"data": 2, "tensor": -1}).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(sharding.ShardingError, match="needs 12 devices, but 8"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 4})
    with pytest.raises(sharding.ShardingError, match="unknown axes"):
        sharding.make_mesh({"model": 8})


def test_orbax_checkpoint_round_trip_across_meshes(tmp_path):
    mesh_a = sharding.make_mesh(MESHES["2data_x_4tensor"])
    params = _place(LLAMA, models.init_params(LLAMA, jax.random.key(3)), mesh_a)
    path = checkpoint.save_model(str(tmp_path / "ckpt"), LLAMA, params)
    cfg, restored = checkpoint.load_model(path, mesh=sharding.make_mesh(MESHES["8fsdp"]))
    assert cfg == LLAMA
    assert restored["embed"].sharding.spec == P(None, "fsdp")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
