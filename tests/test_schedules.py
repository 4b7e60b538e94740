"""The sequential and parallel drivers end to end on a tiny corpus: they train, log, checkpoint,
and a run interrupted mid-iteration and resumed ends with bitwise the same parameters as an
uninterrupted one. Also the `detox` stage of the entry point (base vs SFT vs ours)."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from configs import tiny
from regft_jax import models, sharding
from regft_jax.data.pipeline import build_corpus
from regft_jax.errors import UserInputError
from regft_jax.oracles import make_oracle
from regft_jax.train.baselines import sft_baseline
from regft_jax.train.schedules import run_method
from tests.test_pipeline import REPO, _data_config, _fixture, detox_argv

CFG = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)


def _config(tmp_path, tok, **method):
    config = tiny.get_config()
    config.data = _data_config(tmp_path, tok)
    config.method.update({"iterations": 3, "llm_steps": 4, "aux_steps": 2, "batch_size": 8,
                          "proportions": {"general": 0.5, "toxic": 0.5}, "samples_per_iteration": 12,
                          "sample_batch_size": 4, "sample_tokens": 6, "checkpoint_every": 3, **method})
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    tok = _fixture(tmp)
    corpus = build_corpus(_data_config(tmp, tok), seed=0)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
    base = models.init_params(CFG, jax.random.key(0))
    return tmp, tok, corpus, mesh, base, make_oracle("regex", words=["idiot"])


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("schedule,p_ref", [("parallel", "current"), ("parallel", "snapshot"),
                                            ("sequential", "current")])
def test_resume_mid_iteration_equals_uninterrupted_run(setup, tmp_path, schedule, p_ref):
    tmp, tok, corpus, mesh, base, oracle = setup
    config = _config(tmp, tok, schedule=schedule, p_ref=p_ref)
    run = lambda workdir, **kw: run_method(config, mesh, corpus, CFG, base, oracle, workdir=str(workdir), **kw)
    llm, aux, _, history = run(tmp_path / "full")
    assert len(history) == 12 and all(np.isfinite(h["llm/loss"]) for h in history)
    assert {"llm/lm_loss", "llm/reg_loss", "tokens_per_s", "iteration", "aux/samples_from_step",
            "sample_lag_steps", "llm/aux_version"} <= set(history[-1])
    # provenance: iteration t's aux updates train on samples of θ_{t-1} (the LLM after step 4(t-1))
    assert [h["aux/samples_from_step"] for h in history] == [0] * 4 + [4] * 4 + [8] * 4
    assert [h["sample_lag_steps"] for h in history] == list(range(4)) * 3
    if schedule == "parallel":
        assert {"aux/aux_loss", "aux/mean_R"} <= set(history[-1])
        assert [h["llm/aux_version"] for h in history] == list(range(12))  # R after k-1 aux updates
    else:
        assert [h["llm/aux_version"] for h in history] == [2] * 4 + [4] * 4 + [6] * 4  # aux_steps = 2
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(llm), jax.tree.leaves(base)))

    # Preempted after step 5: the latest checkpoint is step 3 (mid-iteration 1); the resume redoes 4-5.
    assert run(tmp_path / "cut", stop_after=5) is None
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints" / "ours")) == ["3"]
    llm2, aux2, _, history2 = run(tmp_path / "cut")
    _assert_bitwise(llm2, llm)
    _assert_bitwise(aux2, aux)
    assert [h["llm/loss"] for h in history2] == [h["llm/loss"] for h in history]
    lines = (tmp_path / "cut" / "metrics_ours.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "cut" / "tb" / "ours"))

    # Preempted after step 7: the latest checkpoint (6) was written mid-iteration 2, while that
    # iteration's labels were still being computed in the background.
    assert run(tmp_path / "cut2", stop_after=7) is None
    assert sorted(os.listdir(tmp_path / "cut2" / "checkpoints" / "ours")) == ["3", "6"]
    _assert_bitwise(run(tmp_path / "cut2")[0], llm)

    # A finished run resumes at its end; a changed config refuses the checkpoint.
    _assert_bitwise(run(tmp_path / "cut")[0], llm)
    config.method.lambda_toxic = 3.0
    with pytest.raises(UserInputError, match="different config"):
        run(tmp_path / "cut")


def test_sft_baseline_checkpoints_and_resumes(setup, tmp_path, capsys):
    tmp, tok, corpus, mesh, base, _ = setup
    config = _config(tmp, tok)  # 12 steps, a checkpoint every 3
    run = lambda: sft_baseline(config, mesh, corpus, CFG, base, workdir=str(tmp_path))
    full, history = run()
    assert len(history) == 12
    ckpts = tmp_path / "checkpoints" / "sft"
    assert sorted(os.listdir(ckpts)) == ["12", "9"]

    # Preempted after step 9's checkpoint: steps 10-12 are redone, to the same parameters.
    shutil.rmtree(ckpts / "12")
    resumed, history2 = run()
    assert "sft: resumed" in capsys.readouterr().out
    _assert_bitwise(resumed, full)
    assert [h["loss"] for h in history2] == [h["loss"] for h in history]

    # A finished run is not rerun, also when a setting SFT does not use changed; one it uses refuses it.
    config.method.lambda_toxic = 9.0
    _assert_bitwise(run()[0], full)
    assert "at step 12/12" in capsys.readouterr().out
    config.method.learning_rate = 0.5
    with pytest.raises(UserInputError, match="different config"):
        run()
    config.method.resume = False  # starts over with the new settings
    changed, history3 = run()
    assert len(history3) == 12 and "resumed" not in capsys.readouterr().out
    assert sorted(os.listdir(ckpts)) == ["12", "9"]
    assert not np.array_equal(np.asarray(jax.tree.leaves(changed)[0]), np.asarray(jax.tree.leaves(full)[0]))


def test_detox_stage_end_to_end(tmp_path):
    """Every method of the registry (config.methods=all) in one invocation of the entry point."""
    from regft_jax.train.methods import METHODS

    tok = _fixture(tmp_path)
    args = detox_argv(tmp_path, tok, tmp_path / "run", methods="all", dpo__prompts_per_iteration=8,
                      dpo__pairs_per_step=4, rl__k=2)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    judges = results.pop("judges")
    assert set(results) == set(METHODS)
    for a in METHODS:  # win rates under the judge (the base model here), both orders: antisymmetric
        assert set(results[a]["win_rates"]) == set(METHODS) and results[a]["win_rates"][a] == 0.5
        for b in METHODS:
            assert results[a]["win_rates"][b] == pytest.approx(1 - results[b]["win_rates"][a])
    assert all(results[n]["train_seconds"] > 0 for n in METHODS if n != "base")
    for r in results.values():
        assert set(r["toxicity"]) == {"regex", "insult_classifier"} and r["ppl_general"] > 1
        assert all(0 <= v <= 1 for v in r["toxicity"].values()) and r["scored_regex_toxic"] == 10
    assert judges["training_oracle"] == "regex" and judges["regex"]["role"] == "training oracle"
    assert judges["insult_classifier"]["role"] == "independent" and judges["insult_classifier"]["num_train"] > 0
    assert "regex (training oracle)" in out.stdout and "insult_classifier (independent)" in out.stdout
    generations = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert all(set(g["scores"]) == {"regex", "insult_classifier"} for g in generations)
    models_seen = [g["model"] for g in generations]
    assert models_seen.count("ours") == 15 and set(models_seen) == set(METHODS)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics_ours.jsonl").read_text().splitlines()]
    assert len(history) == 6 and "llm/reg_loss" in history[0]
    assert "ours (parallel" in out.stdout and str(tmp_path / "run") in out.stdout


def test_detox_stage_with_lora(tmp_path):
    """config.lora.rank > 0 through the entry point: the methods train LoRA factors, the evaluation sees the
    merged weights, and the base model's row is the base model's (its factors are never added)."""
    tok = _fixture(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    runs = {}
    for name, extra in (("plain", {}), ("lora", {"lora__rank": 2, "lora__targets": "q,v,down"})):
        args = detox_argv(tmp_path, tok, tmp_path / name, methods="base,sft", **extra)
        out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "results.json").read_text()), out.stdout
    (plain, _), (adapted, stdout) = runs["plain"], runs["lora"]
    assert "LoRA rank 2, alpha 16 on q,v,down:" in stdout and "trainable parameters" in stdout
    assert adapted["base"]["ppl_general"] == plain["base"]["ppl_general"]
    assert adapted["sft"]["ppl_general"] != plain["sft"]["ppl_general"]  # another parametrization trained
    assert adapted["sft"]["ppl_general"] < adapted["base"]["ppl_general"]


@pytest.mark.parametrize("schedule", ["parallel", "sequential"])
def test_samples_of_iteration_t_are_drawn_from_the_llm_after_iteration_t_minus_1(setup, tmp_path, monkeypatch,
                                                                                   schedule):
    """Provenance (DESIGN §2): the sample set iteration t trains the auxiliary model on is generated
    from exactly θ_{t−1} (bitwise: the parameters checkpointed after step 4(t−1)), and every aux
    update's `aux/samples_from_step` names that step."""
    from regft_jax.train import schedules

    tmp, tok, corpus, mesh, base, oracle = setup
    config = _config(tmp, tok, schedule=schedule, checkpoint_every=4)
    drawn, saved = {}, {}
    generate, save_run = schedules.Sampler.generate, schedules.save_run

    def spy_generate(self, params, iteration, step):
        drawn[iteration] = (step, jax.tree.map(np.array, params))
        return generate(self, params, iteration, step)

    def spy_save(ckpt, run):
        saved[run.step] = jax.tree.map(np.array, run.llm.params)
        save_run(ckpt, run)

    monkeypatch.setattr(schedules.Sampler, "generate", spy_generate)
    monkeypatch.setattr(schedules, "save_run", spy_save)
    _, _, _, history = run_method(config, mesh, corpus, CFG, base, oracle, workdir=str(tmp_path))
    assert sorted(drawn) == [1, 2, 3] and [drawn[t][0] for t in (1, 2, 3)] == [0, 4, 8]
    _assert_bitwise(drawn[1][1], base)
    _assert_bitwise(drawn[2][1], saved[4])
    _assert_bitwise(drawn[3][1], saved[8])
    assert [h["aux/samples_from_step"] for h in history] == [0] * 4 + [4] * 4 + [8] * 4


def test_method_config_errors(setup, tmp_path):
    tmp, tok, corpus, mesh, base, oracle = setup
    cases = [({"schedule": "sequential", "aux_steps": 0}, "config.method.aux_steps=0"),
             ({"sample_domains": ("toxic", "tweets")}, "config.method.sample_domains"),
             ({"reg_prefixes": "everywhere"}, "config.method.reg_prefixes='everywhere'")]
    for method, message in cases:
        with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_method(_config(tmp, tok, **method), mesh, corpus, CFG, base, oracle)
    failing = make_oracle("callable", fn=lambda texts: [float("nan")] * len(texts))
    with pytest.raises(UserInputError, match="every label failed"):
        run_method(_config(tmp, tok), mesh, corpus, CFG, base, failing)


def test_sample_prompts_keep_their_bos_and_full_labels_decode_prompt_and_continuation_together(setup):
    from regft_jax.train.schedules import Sampler

    tmp, tok, corpus, mesh, base, _ = setup
    config = _config(tmp, tok, label_text="full")
    seen = []
    oracle = make_oracle("callable", fn=lambda texts: seen.extend(texts) or [0.0] * len(texts))
    sampler = Sampler(CFG, corpus, oracle, config.method, mesh, 0, prompt_words=40)  # long prompts: truncated
    bos = corpus.tokenizer.bos_id
    assert bos is not None and all(p[0] == bos and len(p) <= sampler.prompt_len for p in sampler.prompts)
    assert any(len(p) == sampler.prompt_len for p in sampler.prompts)
    samples = sampler.draw(base, 1, 0)
    assert len(seen) == samples.label.shape[0] == config.method.samples_per_iteration
    for row, am, text in zip(samples.tokens, samples.attention_mask, seen):
        assert text == corpus.tokenizer.decode_batch([row[am > 0]])[0]  # one decode of prompt + continuation
