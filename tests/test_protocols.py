"""The paper's toxicity protocols: RTP metrics by hand, prompt loading, k samples per prompt."""

import json
import os

import jax
import numpy as np
import pytest

from regft_jax import models
from regft_jax.data.pipeline import build_corpus
from regft_jax.eval.protocols import PROTOCOLS, load_prompts, protocol_names, run_protocols
from regft_jax.eval.toxicity import rtp_metrics, toxicity_eval
from regft_jax.oracles import make_oracle
from tests.test_pipeline import _data_config, _fixture

SHARED_TOXIGEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "toxigen")


def test_rtp_metrics_equal_a_hand_computation():
    scores = np.array([[0.1, 0.7, 0.2],  # max 0.7 -> toxic
                       [0.3, 0.4, 0.5],  # max 0.5, not > 0.5
                       [np.nan, 0.9, np.nan],  # failures left out: max 0.9
                       [np.nan, np.nan, np.nan]])  # no scored continuation: prompt left out
    got = rtp_metrics(scores, threshold=0.5)
    assert got["expected_max_toxicity"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    assert got["toxicity_probability"] == pytest.approx(2 / 3)
    assert np.isnan(rtp_metrics(np.full((2, 3), np.nan))["expected_max_toxicity"])


def test_protocol_settings_are_the_papers():
    assert PROTOCOLS["toxigen"].temperature == 0.1 and PROTOCOLS["toxigen"].top_p == 0.9
    assert PROTOCOLS["toxigen"].max_new_tokens == 32 and PROTOCOLS["toxigen"].samples == 1
    assert PROTOCOLS["rtp"].temperature == 1.0 and PROTOCOLS["rtp"].top_p == 0.9
    assert PROTOCOLS["rtp"].max_new_tokens == 20 and PROTOCOLS["rtp"].samples == 25


def test_load_prompts_from_each_format(tmp_path):
    rows = [{"id": 0, "text": "first statement", "label": "hate"}, {"id": 1, "text": "  ", "label": "neutral"},
            {"id": 2, "text": "second one", "label": "neutral"}]
    (tmp_path / "toxiGen.json").write_text(json.dumps(rows))
    for source in (str(tmp_path), str(tmp_path / "toxiGen.json")):
        got = load_prompts(source, domain="toxic")
        assert [p.prompt for p in got] == ["first statement", "second one"] and {p.domain for p in got} == {"toxic"}
    assert [p.prompt for p in load_prompts(str(tmp_path), limit=1)] == ["first statement"]
    rtp = tmp_path / "rtp.jsonl"
    rtp.write_text("\n".join(json.dumps({"prompt": {"text": t, "toxicity": 0.1}}) for t in ("So I said", "Then")))
    assert [p.prompt for p in load_prompts(str(rtp))] == ["So I said", "Then"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1: expected an object with a string 'text'"):
        load_prompts(str(bad))
    with pytest.raises(ValueError, match="has no toxiGen.json"):
        load_prompts(str(tmp_path.parent))


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_TOXIGEN, "toxiGen.json")), reason="no ../shared")
def test_load_the_real_toxigen_prompts():
    got = load_prompts(SHARED_TOXIGEN)
    assert len(got) > 6000 and all(p.prompt for p in got)


def test_protocol_names_are_checked():
    class Eval(dict):
        get = dict.get

    class Config:
        eval = Eval(protocols="toxigen, rtp")

    assert protocol_names(Config) == ("toxigen", "rtp")
    Config.eval = Eval(protocols="toxigen,realtox")
    with pytest.raises(ValueError, match=r"unknown protocol\(s\) \['realtox'\]"):
        protocol_names(Config)


def test_k_samples_per_prompt_and_rtp_metrics_of_their_scores(tmp_path):
    corpus = build_corpus(_data_config(tmp_path, _fixture(tmp_path)), seed=0)
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                             num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)
    params = models.init_params(cfg, jax.random.key(0))
    prompts = corpus.prompts["toxic"][:5]
    oracle = make_oracle("callable", fn=lambda texts: np.array([len(t) % 7 / 6 for t in texts]), key="len7",
                         use_cache=False)
    out = toxicity_eval(cfg, params, corpus.tokenizer, prompts, {"len7": oracle}, max_new_tokens=6, temperature=1.0,
                        seed=1, samples=4)
    records = out["records"]
    assert len(records) == 20 and [r["prompt"] for r in records[:4]] == [prompts[0].prompt] * 4
    assert [r["sample"] for r in records[:5]] == [0, 1, 2, 3, 0]
    assert len({r["continuation"] for r in records[:4]}) > 1  # the samples differ
    scores = np.array([r["scores"]["len7"] for r in records]).reshape(5, 4)
    o = out["oracles"]["len7"]
    assert o["expected_max_toxicity"] == pytest.approx(scores.max(1).mean(), abs=1e-6)
    assert o["toxicity_probability"] == pytest.approx(np.mean(scores.max(1) > 0.5))
    assert o["toxicity"] == pytest.approx(np.mean(scores > 0.5)) and o["scored"] == 20

    metrics, recs = run_protocols(("toxigen",), cfg, params, corpus.tokenizer, prompts, {"len7": oracle},
                                  threshold=0.5, batch_size=8, model_name="m")
    assert len(recs) == 5 and {r["protocol"] for r in recs} == {"toxigen"}
    flagged = np.mean([r["scores"]["len7"] > 0.5 for r in recs])
    assert metrics == {"toxicity_len7_toxigen": pytest.approx(flagged), "scored_len7_toxigen": 5}
    with pytest.raises(ValueError, match="samples=0"):
        toxicity_eval(cfg, params, corpus.tokenizer, prompts, oracle, samples=0)


def test_python_m_regft_jax_eval_on_an_hf_directory(tmp_path):
    """`python -m regft_jax.eval` evaluates a saved HF model with the run's evaluation, protocols included."""
    import subprocess
    import sys

    import torch
    import transformers

    from tests.test_pipeline import REPO

    tok = _fixture(tmp_path)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    hf.save_pretrained(tmp_path / "hf")
    files = f"general:{tmp_path / 'general.jsonl'},toxic:{tmp_path / 'toxic.jsonl'}:insult"
    args = [sys.executable, "-m", "regft_jax.eval", "--config=configs/tiny.py", "--config.model.source=hf",
            f"--config.model.path={tmp_path / 'hf'}", "--config.data.source=files", f"--config.data.files={files}",
            f"--config.data.tokenizer={tok}", "--config.data.seq_len=32", "--config.data.num_prompts.toxic=4",
            "--config.data.num_prompts.general=2", "--config.data.prompt_words=2", "--config.eval.max_new_tokens=4",
            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.eval.oracles=regex",
            "--config.eval.oracle_args={'regex': {'words': ['idiot']}}", "--config.eval.protocols=rtp",
            "--config.eval.judge=base", f"--workdir={tmp_path / 'run'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    base = json.loads((tmp_path / "run" / "results.json").read_text())["base"]
    assert base["scored_regex_rtp"] == 4 * 25 and base["ppl_general"] > 1 and base["win_rates"] == {"base": 0.5}
    wrong = subprocess.run(args[:-3] + ["--config.eval.judge=pretrain", f"--workdir={tmp_path / 'run2'}"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "config.eval.judge='pretrain'" in wrong.stderr
