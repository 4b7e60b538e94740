"""Our Flax decoder vs HF PyTorch (Llama, Falcon): import, export round trip, KV cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from regft_jax import models, sharding
from regft_jax.models.hf import CheckpointError
from tests.hf_reference import VARIANTS, VOCAB, hf_logits, make_hf_model

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path


def _ids(batch=2, seq=13, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, seq))


def test_logits_match_hf(hf_checkpoint):
    variant, model, path = hf_checkpoint
    cfg, params = models.load_hf(path)
    ids = _ids()
    ours = np.asarray(models.forward(cfg, params, ids))
    assert ours.dtype == np.float32 and ours.shape == (2, 13, VOCAB)
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=ATOL, rtol=0)


def test_left_padded_batch_matches_hf(hf_checkpoint):
    variant, model, path = hf_checkpoint
    cfg, params = models.load_hf(path)
    ids = _ids(3, 9, seed=1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ours = np.asarray(models.forward(cfg, params, ids, attention_mask=mask))
    ref = hf_logits(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def test_export_round_trip_loads_in_hf(hf_checkpoint, tmp_path):
    variant, model, path = hf_checkpoint
    cfg, params = models.load_hf(path)
    out = str(tmp_path / "exported")
    models.save_hf(cfg, params, out)
    reloaded = type(model).from_pretrained(out).float().eval()
    ids = _ids(seed=2)
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(model, ids), atol=ATOL, rtol=0)
    # ... and back into Flax again.
    cfg2, params2 = models.load_hf(out)
    assert cfg2.architecture == cfg.architecture
    np.testing.assert_allclose(np.asarray(models.forward(cfg2, params2, ids)), hf_logits(model, ids), atol=ATOL)


def test_gradients_match_hf(hf_checkpoint, tmp_path):
    """The LM loss's gradient w.r.t. every weight equals PyTorch autograd's on the HF model."""
    import safetensors.numpy
    import torch

    variant, model, path = hf_checkpoint
    cfg, params = models.load_hf(path)
    ids = _ids(3, 11, seed=4)

    def loss(p):
        logp = jax.nn.log_softmax(models.forward(cfg, p, ids)[:, :-1])
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    grads = jax.jit(jax.grad(loss))(params)
    models.save_hf(cfg, grads, str(tmp_path))  # the same name and layout mapping as the weights
    ours = {}
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            ours.update(safetensors.numpy.load_file(str(tmp_path / name)))
    model.zero_grad()
    logits = model(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), torch.tensor(ids[:, 1:]).flatten()).backward()
    theirs = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert set(theirs) <= set(ours) and len(theirs) > 10
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g, atol=2e-5, rtol=1e-4, err_msg=name)


def test_cached_decoding_equals_full_forward(hf_checkpoint):
    """Prefill a left-padded prompt batch, then feed one token at a time through the KV cache."""
    variant, model, path = hf_checkpoint
    cfg, params = models.load_hf(path)
    ids = _ids(2, 12, seed=3)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 is a shorter, left-padded prompt
    prompt = 7
    full = np.asarray(models.forward(cfg, params, ids, attention_mask=mask))
    cache = models.init_cache(cfg, batch=2, max_len=16)
    step = jax.jit(lambda p, t, c, m: models.forward_cached(cfg, p, t, c, m))
    logits, cache = step(params, ids[:, :prompt], cache, mask[:, :prompt])
    pieces = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        logits, cache = step(params, ids[:, t:t + 1], cache, mask[:, t:t + 1])
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)
    assert int(cache["index"]) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache["positions"]), mask.sum(-1))


def test_scan_and_unrolled_layers_and_remat_agree(tmp_path):
    """Layer execution options change how, not what, is computed (logits and gradients)."""
    path = str(tmp_path / "m")
    make_hf_model("llama_gqa").save_pretrained(path)
    ids = _ids()
    outs = []
    for scan, remat in [(True, "none"), (False, "none"), (True, "full"), (False, "dots")]:
        cfg, params = models.load_hf(path, scan_layers=scan, remat=remat)
        loss = lambda p: models.forward(cfg, p, ids).sum()  # noqa: E731
        outs.append((np.asarray(models.forward(cfg, params, ids)), jax.grad(loss)(params)))
    for logits, grads in outs[1:]:
        np.testing.assert_allclose(logits, outs[0][0], atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), grads, outs[0][1])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compilation's structure")
def test_rotary_tables_are_computed_once_per_pass(monkeypatch):
    """XLA on CPU fuses the rotary tables' cos and sin into every fusion that rotates queries or keys and
    evaluates them there (18 sine ops in a 3-layer unrolled forward and gradient); `decoder.computed_once`
    leaves one per branch of its conditional, and the logits and gradients are those of the fused program."""
    from regft_jax.models import decoder

    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                             head_dim=8, mlp_dim=64, max_seq_len=32, scan_layers=False)
    params = models.init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(0).randint(0, 64, (2, 16))

    def logits_and_grads():
        loss = lambda p: models.forward(cfg, p, ids).sum()  # noqa: E731
        fn = jax.jit(lambda p: (models.forward(cfg, p, ids), jax.grad(loss)(p)))
        return fn(params), fn.lower(params).compile().as_text()

    (logits, grads), hlo = logits_and_grads()
    assert hlo.count(" sine(") <= 2 and hlo.count(" cosine(") <= 2, (hlo.count(" sine("), hlo.count(" cosine("))
    monkeypatch.setattr(decoder, "computed_once", lambda f, *args: f(*args))
    (fused_logits, fused_grads), fused_hlo = logits_and_grads()
    assert fused_hlo.count(" sine(") > 2  # what the test guards against: the tables evaluated in each rotation
    np.testing.assert_allclose(logits, fused_logits, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), grads, fused_grads)


def test_sharded_index_checkpoint_round_trip(tmp_path):
    """Export in several safetensors shards + index; both HF and our loader read it back."""
    model = make_hf_model("llama_gqa")
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    cfg, params = models.load_hf(src, mesh=sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4}))
    out = str(tmp_path / "sharded")
    files = models.save_hf(cfg, params, out, max_shard_bytes=20_000)
    assert len(files) > 2
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == {os.path.basename(p) for p in files}
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    ids = _ids()
    ref = hf_logits(model, ids)
    np.testing.assert_allclose(hf_logits(transformers.LlamaForCausalLM.from_pretrained(out), ids), ref, atol=ATOL)
    cfg2, params2 = models.load_hf(out)
    np.testing.assert_allclose(np.asarray(models.forward(cfg2, params2, ids)), ref, atol=ATOL)


def test_bfloat16_params_load_and_stay_close(tmp_path):
    model = make_hf_model("llama_gqa")
    path = str(tmp_path / "m")
    model.save_pretrained(path)
    cfg, params = models.load_hf(path, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids = _ids()
    ours = np.asarray(models.forward(cfg, params, ids))
    ref = hf_logits(model, ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()


# --------------------------------------------------------------------------- bad inputs


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_directory_without_weights(tmp_path):
    make_hf_model("llama_gqa").config.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        models.load_hf(str(tmp_path))
    assert "no model.safetensors" in _one_line(e.value) and str(tmp_path) in str(e.value)


def test_unsupported_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8}, f)
    with pytest.raises(models.ConfigError) as e:
        models.load_hf(str(tmp_path))
    assert "unsupported model_type 'gpt2'" in _one_line(e.value)


def test_falcon_alibi_is_rejected(tmp_path):
    cfg = transformers.FalconConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    alibi=True)
    cfg.save_pretrained(str(tmp_path))
    with pytest.raises(models.ConfigError, match="alibi"):
        models.load_hf(str(tmp_path))


def _resave(path, mutate):
    from safetensors.numpy import load_file, save_file
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    mutate(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["wrong_shape", "missing", "unexpected"])
def test_bad_tensors_are_named(tmp_path, case):
    make_hf_model("llama_gqa").save_pretrained(str(tmp_path))
    name = "model.layers.1.self_attn.k_proj.weight"
    if case == "wrong_shape":
        _resave(str(tmp_path), lambda t: t.__setitem__(name, np.zeros((3, 32), np.float32)))
        expected = f"tensor '{name}' has shape (3, 32), expected (16, 32)"
    elif case == "missing":
        _resave(str(tmp_path), lambda t: t.pop(name))
        expected = f"missing tensor '{name}'"
    else:
        _resave(str(tmp_path), lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", np.zeros((2, 2), np.float32)))
        expected = "unexpected tensor 'model.layers.2.mlp.up_proj.weight'"
    with pytest.raises(CheckpointError) as e:
        models.load_hf(str(tmp_path))
    assert expected in _one_line(e.value)
