"""Exported models (regft_jax/eval/export.py) through lm-eval's backend "regft_jax" (regft_jax/eval/harness.py).

- a guided (NADO decoding) export is scored under q = p · R: per-pair and rolling log-likelihoods equal a float64
  brute force from the two models' full logits and differ from p's; greedy generate_until is q's greedy
  continuation;
- main's `_save_models` (config.eval.save_models) writes every model with its tokenizer: the backend loads it
  without a tokenizer argument and scores it like a brute force on the saved parameters; nothing when off;
- the backend on an 8-device data-parallel mesh equals the 1-device one (batches not a multiple of 8);
- an export written by 2 processes (parameters sharded over both) loads in one process equal to the parameters.
"""

import json
import os
import sys
import textwrap
import types

import jax
import ml_collections
import numpy as np
import pytest

from regft_jax import checkpoint, models
from regft_jax.data import train_bpe_tokenizer
from regft_jax.data.tokenizer import load_tokenizer
from regft_jax.errors import UserInputError
from regft_jax.eval.export import AUX_DIR, export_model, load_model_dir
from regft_jax.models.aux import AuxGuidance
from regft_jax.train.baselines import Trained
from tests.test_multihost import _port, _two_processes
from tests.test_nado import _log_q, _log_softmax, _varied_aux
from tests.test_packed_attention import aux_logits, forward  # (jitted)

CFG = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, mlp_dim=64, max_seq_len=64, init_std=0.3)
WORDS = "the a cat dog sat ran on under mat log red big small quickly home".split()
# (context ids, continuation ids) of several lengths; 5 pairs: not a multiple of the batch size 3 nor of 8 devices
PAIRS = [([1, 5, 9], [17, 4]), ([1], [260, 7, 7, 31]), ([1, 40, 41, 42, 43, 44, 45], [9]), ([1, 3], [3, 3, 3]),
         ([1, 99, 12, 250], [6, 8, 10])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, random LLM parameters, a varied auxiliary model, and the guided model exported."""
    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    tok = load_tokenizer(train_bpe_tokenizer([" ".join(rng.choice(WORDS, 10)) for _ in range(200)], tmp / "tok",
                                             vocab_size=300))
    params = models.init_params(CFG, jax.random.key(0))
    acfg, aux = _varied_aux(CFG, params)
    guided = export_model(str(tmp / "nado"), CFG, params, tok, guidance=AuxGuidance(acfg), guidance_params=aux)
    return types.SimpleNamespace(tmp=tmp, tok=tok, params=params, aux=(acfg, aux), guided=guided)


def _harness():
    pytest.importorskip("lm_eval")
    from regft_jax.eval import harness

    return harness


def _log_probs(params, tokens, aux=None) -> np.ndarray:
    """Brute force, float64 [len(tokens), V]: log p(·|tokens[:t+1]) from one full forward, or log q with
    aux = (aux cfg, aux params)."""
    x = np.asarray([tokens], np.int32)
    logits = np.asarray(forward(CFG, params, x))[0]
    return _log_softmax(logits) if aux is None else _log_q(logits, np.asarray(aux_logits(aux[0], aux[1], x))[0])


def _pair_logl(params, context, continuation, aux=None) -> float:
    tokens = list(context) + list(continuation)
    lp = _log_probs(params, tokens, aux)
    return sum(lp[t, tokens[t + 1]] for t in range(len(context) - 1, len(tokens) - 1))


def _greedy(params, prompt, n, aux=None) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(_log_probs(params, tokens, aux)[-1])))
    return tokens[len(prompt):]


def _requests():
    from lm_eval.api.instance import Instance

    texts = ("the cat sat on the mat", "a dog")
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    gen = [Instance("generate_until", {}, (t, {"until": ["never stop"], "max_gen_toks": 5}), i)
           for i, t in enumerate(("the big dog", "a red cat ran", "home"))]
    return rolling, gen


def test_guided_export_scores_and_generates_under_q(setup):
    harness = _harness()
    lm = harness.RegftLM(pretrained=setup.guided, batch_size=3)  # the tokenizer: the export's own
    assert isinstance(lm.guidance, AuxGuidance) and lm.guidance.cfg.num_layers == 1
    pairs = PAIRS + [([1, 5], _greedy(setup.params, [1, 5], 3, setup.aux))]  # q's greedy continuation
    out = lm._loglikelihood_tokens([(None, c, y) for c, y in pairs])
    q = [_pair_logl(setup.params, c, y, setup.aux) for c, y in pairs]
    p = [_pair_logl(setup.params, c, y) for c, y in pairs]
    np.testing.assert_allclose([lp for lp, _ in out], q, rtol=1e-5, atol=5e-5)
    assert np.abs(np.subtract(q, p)).min() > 0.05  # R changes every score: q's, not p's
    assert [g for _, g in out] == [False] * len(PAIRS) + [True]

    rolling, gen = _requests()
    expected = [_pair_logl(setup.params, [lm.prefix_token_id], lm.tok_encode(r.args[0]), setup.aux) for r in rolling]
    np.testing.assert_allclose(lm.loglikelihood_rolling(rolling), expected, rtol=1e-5, atol=5e-5)
    texts = [lm.tokenizer.decode(_greedy(setup.params, lm.tok_encode(r.args[0]), 5, setup.aux),
                                 skip_special_tokens=False).split("<eos>")[0] for r in gen]
    assert lm.generate_until(gen) == texts


def test_main_saves_every_model_for_lm_eval(setup):
    harness = _harness()
    from regft_jax.main import _save_models

    acfg, aux = setup.aux
    trained = {"base": Trained(setup.params), "nado_decoding": Trained(setup.params, guidance=AuxGuidance(acfg),
                                                                         guidance_params=aux)}
    config = ml_collections.ConfigDict({"eval": {"save_models": False}})
    corpus = types.SimpleNamespace(tokenizer=setup.tok)
    _save_models(config, str(setup.tmp / "off"), trained, corpus, CFG)
    assert not os.path.exists(setup.tmp / "off" / "models")  # off by default

    config.eval.save_models = True
    workdir = setup.tmp / "run"
    _save_models(config, str(workdir), trained, corpus, CFG)
    base = str(workdir / "models" / "base")
    assert sorted(os.listdir(workdir / "models")) == ["base", "nado_decoding"]
    assert not os.path.exists(os.path.join(base, AUX_DIR))
    assert os.path.isdir(workdir / "models" / "nado_decoding" / AUX_DIR)
    saved_cfg, saved = checkpoint.load_model(base)
    assert saved_cfg == CFG
    lm = harness.RegftLM(pretrained=base, batch_size=3)  # no tokenizer argument
    assert lm.guidance is None and lm.tokenizer.decode([1]) == "<bos>"
    np.testing.assert_allclose([lp for lp, _ in lm._loglikelihood_tokens([(None, c, y) for c, y in PAIRS])],
                               [_pair_logl(saved, c, y) for c, y in PAIRS], rtol=1e-5, atol=5e-5)
    # a guided model exported again without its guidance leaves no stale auxiliary model behind
    export_model(str(workdir / "models" / "nado_decoding"), CFG, setup.params, setup.tok)
    assert load_model_dir(str(workdir / "models" / "nado_decoding"))[2] is None


def test_backend_on_eight_devices_equals_one_device(setup):
    harness = _harness()
    assert jax.local_device_count() == 8
    default = harness.RegftLM(pretrained=setup.guided)
    assert dict(default.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    one = harness.RegftLM(pretrained=setup.guided, batch_size=3, mesh="data:1")
    eight = harness.RegftLM(pretrained=setup.guided, batch_size=3, mesh="data:2/fsdp:4")  # params sharded too
    assert one.mesh.devices.size == 1 and len(jax.tree.leaves(eight.params)[0].sharding.device_set) == 8
    assert len(jax.tree.leaves(eight.guidance_params)[0].sharding.device_set) == 8
    requests = [(None, c, y) for c, y in PAIRS]
    a, b = one._loglikelihood_tokens(requests), eight._loglikelihood_tokens(requests)
    np.testing.assert_allclose([x for x, _ in b], [x for x, _ in a], rtol=1e-5, atol=5e-5)
    assert [g for _, g in a] == [g for _, g in b]
    rolling, gen = _requests()
    np.testing.assert_allclose(eight.loglikelihood_rolling(rolling), one.loglikelihood_rolling(rolling), rtol=1e-5)
    assert eight.generate_until(gen) == one.generate_until(gen)


@pytest.mark.parametrize("mesh, needle", [("data8", "expected AXIS:SIZE"), ("gpu:2", "unknown axes"),
                                          ("data:16", "needs 16 devices")])
def test_bad_mesh_and_missing_tokenizer_name_the_model_arg(setup, mesh, needle):
    harness = _harness()
    with pytest.raises(UserInputError, match=f"model_args mesh={mesh!r}.*{needle}"):
        harness.RegftLM(pretrained=setup.guided, mesh=mesh)
    bare = checkpoint.save_model(str(setup.tmp / f"bare_{mesh}"), CFG, setup.params, overwrite=True)
    with pytest.raises(UserInputError, match="holds no tokenizer.*tokenizer=HF_TOKENIZER_DIR"):
        harness.RegftLM(pretrained=bare)


_EXPORT = textwrap.dedent("""
    import sys
    import jax, ml_collections
    from regft_jax import models, multihost, sharding
    from regft_jax.data.tokenizer import load_tokenizer
    from regft_jax.eval.export import export_model
    from regft_jax.models.aux import AuxGuidance, aux_abstract_params, aux_config, aux_logical_axes, init_aux_params
    multihost.initialize(ml_collections.ConfigDict(
        {"coordinator": sys.argv[1], "num_processes": 2, "process_id": int(sys.argv[2])}))
    cfg = models.ModelConfig.from_dict(__import__("json").loads(sys.argv[5]))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1})  # 2 devices in each process
    place = lambda axes, abstract: sharding.param_shardings(mesh, axes, abstract)
    params = jax.jit(lambda k: models.init_params(cfg, k), out_shardings=place(
        models.param_logical_axes(cfg), models.abstract_params(cfg)))(jax.random.key(0))
    acfg = aux_config(cfg, 1)
    aux = jax.jit(lambda k: init_aux_params(acfg, k, mean_label=0.3), out_shardings=place(
        aux_logical_axes(acfg), aux_abstract_params(acfg)))(jax.random.key(1))
    assert not params["embed"].is_fully_addressable  # spans both processes
    export_model(sys.argv[3], cfg, params, load_tokenizer(sys.argv[4]), guidance=AuxGuidance(acfg), guidance_params=aux)
""")


def test_export_by_two_processes_loads_in_one(setup, tmp_path):
    from regft_jax.models.aux import aux_config, init_aux_params

    script = tmp_path / "export.py"
    script.write_text(_EXPORT)
    port, out = _port(), tmp_path / "two"
    outs = _two_processes(lambda i: [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(out),
                                     setup.tok.name, json.dumps(CFG.to_dict())], timeout=300)
    for o in outs:
        assert o.returncode == 0, o.stderr[-3000:]
    assert os.path.isfile(out / "tokenizer.json")
    cfg, params, guidance, aux = load_model_dir(str(out))
    acfg = aux_config(CFG, 1)
    assert cfg == CFG and guidance == AuxGuidance(acfg)
    expected = (models.init_params(CFG, jax.random.key(0)), init_aux_params(acfg, jax.random.key(1), mean_label=0.3))
    for got, want in zip(jax.tree.leaves((params, aux)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
