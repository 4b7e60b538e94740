"""Mixed precision: fp32 master weights with bf16 compute train like fp32 (bf16 weights do not), the
gradients reaching AdamW are fp32, the whole path (HF import, checkpoints, sampling, the method's
joint step) keeps fp32 storage and bf16 compute, and a config whose updates would round away is refused."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import optax
import pytest
import torch

from regft_jax import checkpoint, models, sampling
from regft_jax.models import ModelConfig, forward, init_params
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.precision import PrecisionError, check_update_precision
from regft_jax.train.method import Frozen, MethodSpec, joint_step
from regft_jax.train.steps import init_train_state, make_optimizer, sft_loss, sft_step

from tests.hf_reference import make_hf_model

TINY = ModelConfig(family="llama", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=64, max_seq_len=64, scan_layers=False)  # unrolled: compiles 3x faster
MIXED = {"param_dtype": "float32", "dtype": "bfloat16"}


def _bf16_init(seed=0):
    """fp32 parameters holding bf16 values: a bf16 checkpoint loaded with param_dtype=float32."""
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), init_params(TINY, jax.random.key(seed)))


def _train(init, param_dtype, dtype, batch, steps=50, lr=1e-5):
    cfg = TINY.replace(param_dtype=param_dtype, dtype=dtype)
    opt = make_optimizer(lr, grad_clip=1.0)
    state = init_train_state(jax.tree.map(lambda x: x.astype(param_dtype), init), opt)
    step = jax.jit(functools.partial(sft_step, cfg, opt))
    for _ in range(steps):
        state, _ = step(state, batch)
    return state


def test_fp32_master_with_bf16_compute_moves_weights_like_fp32_and_bf16_weights_freeze():
    """50 AdamW steps at lr 1e-5 on a fixed batch, from the same bf16-representable start. Deltas of
    fp32 master + bf16 compute vs fp32: per-tensor relative difference ||Δ_mixed − Δ_fp32|| / ||Δ_fp32||
    < 0.1 (measured: at most 0.028) and the same fraction of weights moved (the rows of tokens absent from the
    batch get no gradient in either; measured 99.4% both). bf16 parameters: 15% of the weights move (those below ~0.004,
    where half a bf16 ulp is under lr), no norm scale at all, and every tensor's delta is far from fp32's."""
    init = _bf16_init()
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, TINY.vocab_size, (8, 33)), jnp.int32),
             "loss_mask": jnp.ones((8, 33), jnp.int32)}
    delta = {}
    for name, dtypes in {"fp32": ("float32", "float32"), "mixed": ("float32", "bfloat16"),
                         "bf16": ("bfloat16", "bfloat16")}.items():
        state = _train(init, *dtypes, batch)
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(dtypes[0])}
        assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(dtypes[0])}  # moments
        delta[name] = jax.tree.map(lambda p, p0: np.asarray(p, np.float32) - np.asarray(p0), state.params, init)
    moved = {k: sum(int((x != 0).sum()) for x in jax.tree.leaves(d)) / TINY.num_params() for k, d in delta.items()}
    rel = {k: jax.tree.leaves(jax.tree.map(lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b), d, delta["fp32"]))
           for k, d in delta.items()}
    assert moved["fp32"] > 0.9 and abs(moved["mixed"] - moved["fp32"]) < 0.01, moved
    assert max(rel["mixed"]) < 0.1, rel["mixed"]
    assert moved["bf16"] < 0.3 and min(rel["bf16"]) > 0.5, (moved, rel["bf16"])
    norms = [delta["bf16"]["final_norm"]["scale"], delta["bf16"]["layers"]["attn_norm"]["scale"],
             delta["bf16"]["layers"]["mlp_norm"]["scale"]]
    assert all(not x.any() for x in norms)


class _Recording:
    """An optax transformation that records the dtypes of the gradients it receives (at trace time)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self):
        def update(grads, state, params=None):
            self.seen.append({x.dtype for x in jax.tree.leaves(grads)})
            return self.inner.update(grads, state, params)

        return optax.GradientTransformation(self.inner.init, update)


def test_joint_step_gradients_and_states_stay_fp32_with_bf16_compute():
    """The method's joint step (adaptive: anchor on the general rows; Ω_tox at sampled prefixes; the
    aux update) with fp32 params and bf16 compute: both optimizers receive fp32 gradients only, both
    states stay fp32; the anchor may be stored in bf16 (it only feeds a bf16 forward)."""
    cfg = TINY.replace(**MIXED)
    acfg = aux_config(cfg, 1)
    params = _bf16_init()
    aux_params = init_aux_params(acfg, jax.random.key(1), mean_label=0.7, llm_params=params)
    assert {x.dtype for x in jax.tree.leaves(aux_params)} == {jnp.dtype(jnp.float32)}
    llm_rec, aux_rec = _Recording(make_optimizer(1e-5)), _Recording(make_optimizer(1e-4))
    llm_opt, aux_opt = llm_rec(), aux_rec()
    rng = np.random.default_rng(1)
    corpus = {"tokens": jnp.asarray(rng.integers(0, 128, (4, 17)), jnp.int32), "loss_mask": jnp.ones((4, 17), jnp.int32),
              "domain": jnp.asarray([0, 0, 1, 1], jnp.int32)}
    samples = {"tokens": jnp.asarray(rng.integers(0, 128, (4, 12)), jnp.int32),
               "loss_mask": jnp.asarray([[0] * 4 + [1] * 8] * 4, jnp.int32),
               "attention_mask": jnp.ones((4, 12), jnp.int32), "label": jnp.asarray([1.0, 0.0, 1.0, 0.5], jnp.float32)}
    method = ml_collections.ConfigDict({"adaptive": True, "lambda_toxic": 2.0, "lambda_keep": 0.5, "p_ref": "current",
                                        "beta": 1.0, "reg_prefixes": "samples", "lambda_samples": 2.0})
    spec = MethodSpec.from_config(method, (False, True), domain_rows=(2, 2))
    assert spec.needs_anchor and spec.sample_lambda > 0
    frozen = Frozen(anchor=jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    step = jax.jit(functools.partial(joint_step, cfg, acfg, spec, llm_opt, aux_opt))
    llm, aux, metrics = step(init_train_state(params, llm_opt), init_train_state(aux_params, aux_opt), frozen,
                             corpus, samples)
    assert llm_rec.seen == [{jnp.dtype(jnp.float32)}] and aux_rec.seen == [{jnp.dtype(jnp.float32)}]
    for state in (llm, aux):
        assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["llm/loss"])) and float(metrics["llm/skipped"]) == 0


def test_fp32_master_forward_and_sampling_equal_the_bf16_model():
    """Compute is bf16 either way: fp32 params holding bf16 values give exactly the logits and greedy
    samples of the bf16-param model (the KV cache is in the compute dtype, bf16)."""
    params = _bf16_init()
    bf16 = TINY.replace(param_dtype="bfloat16", dtype="bfloat16")
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    mixed = TINY.replace(**MIXED)
    assert models.init_cache(mixed, 2, 8)["k"].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(forward(mixed, params, ids)), np.asarray(forward(bf16, bf16_params, ids)))
    prompts = [[1, 5, 7, 9], [3, 4]]
    out = [sampling.generate(c, p, prompts, max_new_tokens=6, temperature=0.0)
           for c, p in ((mixed, params), (bf16, bf16_params))]
    assert out[0] == out[1] and all(len(x) == 6 for x in out[0])


def test_bf16_hf_checkpoint_loads_as_fp32_master_and_checkpoints_keep_it(tmp_path):
    """A bf16 safetensors checkpoint loaded with param_dtype=float32 holds exactly the bf16 values in fp32;
    an orbax checkpoint of fp32 params restores fp32 (bitwise), or bf16 when asked (rounded)."""
    hf_dir = str(tmp_path / "hf")
    make_hf_model("llama_gqa").to(torch.bfloat16).save_pretrained(hf_dir)
    cfg16, p16 = models.load_hf(hf_dir)  # the checkpoint's own dtype
    assert cfg16.param_dtype == "bfloat16"
    cfg, p32 = models.load_hf(hf_dir, param_dtype="float32", dtype="bfloat16")
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
    trained = jax.tree.map(lambda x: x + 1e-5, p32)  # an update no bf16 weight could hold
    path = checkpoint.save_model(str(tmp_path / "ckpt"), cfg, trained)
    cfg_back, back = checkpoint.load_model(path)
    assert (cfg_back.param_dtype, cfg_back.dtype) == ("float32", "bfloat16")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, rounded = checkpoint.load_model(path, param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(trained)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16))


def _config(param_dtype, lr, aux_lr=1e-3, allow=None):
    model = {"param_dtype": param_dtype, "dtype": "bfloat16"}
    if allow is not None:
        model["allow_bf16_params"] = allow
    return ml_collections.ConfigDict({"model": model, "method": {"learning_rate": lr, "aux_learning_rate": aux_lr}})


def _movable_by_numpy(params, lr):
    """Reference: the fraction of bf16 weights that w ± lr, rounded to bf16 by numpy, changes."""
    moved = total = 0
    for w in jax.tree.leaves(params):
        w = np.asarray(w)
        wide = w.astype(np.float32)
        up, down = (wide + np.float32(lr)).astype(w.dtype), (wide - np.float32(lr)).astype(w.dtype)
        moved += int(((up != w) | (down != w)).sum())
        total += w.size
    return moved / total


def test_bf16_params_whose_updates_would_vanish_are_refused_with_the_numbers(capsys):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(TINY, jax.random.key(0)))
    keys = ("method.learning_rate", "method.aux_learning_rate")
    with pytest.raises(PrecisionError) as err:
        check_update_precision(_config("bfloat16", 1e-5, aux_lr=1e-4), params, keys)
    message = str(err.value)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert "\n" not in message  # one line; the 3 tensors that never move are the norm scales (all 1.0)
    for part in ("config.model.param_dtype='bfloat16'", f"config.method.learning_rate=1e-05 changes only "
                 f"{100 * _movable_by_numpy(params, 1e-5):.1f}% of the {n / 1e6:,.1f}M weights (3 of 12 tensors not at all)",
                 f"config.method.aux_learning_rate=0.0001 changes only {100 * _movable_by_numpy(params, 1e-4):.1f}%",
                 "--config.model.param_dtype=float32 --config.model.dtype=bfloat16", "--config.model.allow_bf16_params=True"):
        assert part in message, (part, message)
    assert 0.1 < _movable_by_numpy(params, 1e-5) < 0.2  # the measurement: ~15%
    # the opt-out: the same line as a warning
    assert check_update_precision(_config("bfloat16", 1e-5, allow=True), params, keys[:1]) in capsys.readouterr().out
    # fine: fp32 master weights; or bf16 weights with a learning rate that moves them all (norm scales too)
    fp32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    assert check_update_precision(_config("float32", 1e-5), fp32, keys) is None
    assert _movable_by_numpy(params, 1e-2) == 1.0
    assert check_update_precision(_config("bfloat16", 1e-2, aux_lr=1e-2), params, keys) is None


def test_sft_baseline_and_the_method_refuse_bf16_params_before_training(tmp_path):
    """The check runs where the runs build their optimizers: `sft_baseline` (method.learning_rate) and
    `run_method` (also method.aux_learning_rate) stop with the one-line error before any step."""
    from configs import tiny
    from regft_jax import sharding
    from regft_jax.data.pipeline import build_corpus
    from regft_jax.oracles import make_oracle
    from regft_jax.train.baselines import sft_baseline
    from regft_jax.train.schedules import run_method
    from tests.test_pipeline import _data_config, _fixture

    tok = _fixture(tmp_path)
    config = tiny.get_config()
    config.data = _data_config(tmp_path, tok)
    config.model.update(param_dtype="bfloat16", dtype="bfloat16")
    config.method.update({"learning_rate": 1e-5, "aux_learning_rate": 1e-4, "checkpoint_every": 0})
    corpus = build_corpus(config.data, seed=0)
    cfg = TINY.replace(vocab_size=300, param_dtype="bfloat16", dtype="bfloat16")
    base = init_params(cfg, jax.random.key(0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
    with pytest.raises(PrecisionError, match=r"config\.method\.learning_rate=1e-05 changes only 1\d\.\d%"):
        sft_baseline(config, mesh, corpus, cfg, base)
    with pytest.raises(PrecisionError, match=r"config\.method\.aux_learning_rate=0\.0001 changes only"):
        run_method(config, mesh, corpus, cfg, base, make_oracle("regex", words=["idiot"]))


def _dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """(result, lhs, rhs) element types of every dot in a compiled HLO module's text."""
    out = []
    for body in re.findall(r"\{\n(.*?)\n\}", hlo, re.S):
        for m in re.finditer(r"= (\w+)\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", body):
            out.append((m.group(1), *(re.search("%" + re.escape(p) + r" = (\w+)\[", body).group(1)
                                      for p in m.group(2, 3))))
    return out


@pytest.mark.parametrize("tokens", [24, 23])  # odd: the weight gradient pads a zero row
def test_bf16_matmuls_sum_in_float32_forward_and_backward(tokens):
    """`token_matmul` of bf16 operands on the CPU (`matmul_f32_accumulate`): the output and both gradients
    equal the float32 products of the bf16 values rounded once to bf16 (to one bf16 ulp: only the order of
    the float32 sums differs), float32 logits stay float32 and give the same gradients, and in the compiled
    backward both dots keep the form XLA gives the forward's bf16 x bf16 -> float32 dot (bf16 operands for
    YNNPACK: the choice depends on dtypes and layouts, not on the CPU), where `a @ b.T` or a transposed left
    operand would have XLA convert them to float32 first."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, tokens, 48)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(48, 40)) / 7, jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(1, tokens, 40)), jnp.bfloat16)
    f32 = lambda a: np.asarray(a, np.float32).reshape(-1, a.shape[-1])  # noqa: E731
    X, W, G = f32(x), f32(w), f32(g)

    def assert_rounded(a, exact):
        assert a.dtype == jnp.bfloat16
        rounded = exact.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_less(np.abs(f32(a) - rounded), np.abs(rounded) * 2.0 ** -7 + 1e-30)

    y, vjp = jax.vjp(models.decoder.token_matmul, x, w)
    dx, dw = vjp(g)
    assert_rounded(y, X @ W)
    assert_rounded(dx, G @ W.T)
    assert_rounded(dw, X.T @ G)

    logits, vjp = jax.vjp(lambda x, w: models.decoder.token_matmul(x, w, preferred_element_type=jnp.float32), x, w)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(f32(logits), X @ W, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp(g.astype(jnp.float32)), (dx, dw)):  # the float32 cotangent is rounded to bf16 first
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    # The backward's two dots in the form XLA gives the forward's bf16 x bf16 -> float32 dot.
    forward = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    (forward_form,) = _dot_types(forward.lower(x[0], w).compile().as_text())
    grads = jax.jit(jax.grad(lambda x, w: (models.decoder.token_matmul(x, w) * g).astype(jnp.float32).sum(), (0, 1)))
    assert _dot_types(grads.lower(x, w).compile().as_text()) == [forward_form] * 2
    f32_grads = jax.jit(jax.grad(lambda x, w: (models.decoder.token_matmul(x, w) * g).sum(), (0, 1)))
    assert {t for t in _dot_types(f32_grads.lower(X[None], W).compile().as_text())} == {("f32", "f32", "f32")}


@pytest.mark.parametrize("name", ["swiglu", "gelu"])
def test_mlp_activation_backward_equals_autodiff(name):
    """`decoder.swiglu` and `decoder.gelu`, whose hand-written backwards recompute from the saved inputs,
    against autodiff of silu(g) · u and of exact GELU: float32 to rounding (saturated inputs included);
    bf16 inputs give bf16 gradients equal to the float32 ones of the same values rounded once (to one
    bf16 ulp), and the forward is unchanged."""
    rng = np.random.default_rng(0)
    g, u, dh = (jnp.asarray(rng.normal(size=(6, 40)) * 3, jnp.float32) for _ in range(3))
    g = g.at[0, :8].set(jnp.asarray([-100.0, -30.0, -17.0, -1e-3, 0.0, 17.0, 30.0, 100.0]))  # saturated
    if name == "swiglu":
        ours, reference, args = models.decoder.swiglu, lambda g, u: jax.nn.silu(g) * u, (g, u)  # noqa: E731
    else:
        ours, reference, args = models.decoder.gelu, lambda g: jax.nn.gelu(g, approximate=False), (g,)  # noqa: E731
    y, vjp = jax.vjp(ours, *args)
    y_ref, vjp_ref = jax.vjp(reference, *args)
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(vjp(dh), vjp_ref(dh)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    bf16_args, dhb = tuple(a.astype(jnp.bfloat16) for a in args), dh.astype(jnp.bfloat16)
    y, vjp = jax.vjp(ours, *bf16_args)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(reference(*bf16_args), np.float32))
    exact = jax.vjp(reference, *(a.astype(jnp.float32) for a in bf16_args))[1](dhb.astype(jnp.float32))
    for a, b in zip(vjp(dhb), exact):
        assert a.dtype == jnp.bfloat16
        rounded = np.asarray(b.astype(jnp.bfloat16), np.float32)
        # (+ 1e-7: GELU's derivative in its far tail, ~1e-10, is a float32 cancellation in both)
        np.testing.assert_array_less(np.abs(np.asarray(a, np.float32) - rounded), np.abs(rounded) * 2.0 ** -7 + 1e-7)


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_scanned_bf16_backward_keeps_stacked_residuals_in_bf16(family):
    """With bf16 compute and scanned layers (no remat), the residuals the backward slices per layer (the
    matmuls', the attention's and the SwiGLU / GELU inputs, stacked over the layers) stay 2-byte arrays:
    the compiled gradient holds no float32 conversion of a stacked [layers, ...] array, which XLA on CPU
    makes of stacked bf16 residuals (a whole-stack convert outside the loop, at twice the bytes;
    bench/RESULTS.md). Falcon: GELU MLP, parallel block, LayerNorm, one KV head."""
    falcon = {"family": "falcon", "activation": "gelu", "norm": "layer", "parallel_block": True, "num_kv_heads": 1}
    cfg = TINY.replace(num_layers=3, scan_layers=True, **MIXED, **(falcon if family == "falcon" else {}))
    params = init_params(cfg, jax.random.key(0))
    batch = {"tokens": jnp.ones((2, 17), jnp.int32), "loss_mask": jnp.ones((2, 17), jnp.int32)}
    loss = lambda p: sft_loss(cfg, p, batch)[0]  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert re.search(r"= (bf16|u16)\[3,", hlo), "no stacked 2-byte residuals: the layers are not scanned"
    stacked_to_f32 = re.findall(r"= f32\[3,[^\]]*\]\S* convert\(", hlo)
    assert not stacked_to_f32, stacked_to_f32
