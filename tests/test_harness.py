"""The lm-evaluation-harness backend "regft_jax" against lm-eval's own `hf` backend (PyTorch) on the same
tiny random Llama: per-choice log-likelihoods and accuracy of a local multiple-choice task, rolling
log-likelihoods over several windows, greedy generate_until."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend

import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from regft_jax.data import train_bpe_tokenizer  # noqa: E402
from regft_jax.eval import harness  # noqa: E402  (registers "regft_jax")

WORDS = "the a cat dog sat ran on under mat log red big small quickly home".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 10)) for _ in range(200)]
    path = tmp / "model"
    train_bpe_tokenizer(texts, path, vocab_size=300)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path), texts


def _task(tmp_path, texts):
    rng = np.random.default_rng(1)
    with open(tmp_path / "cloze.jsonl", "w") as f:
        for i, t in enumerate(texts[:12]):
            words = t.split()
            choices = [" ".join(words[6:])] + [" ".join(rng.choice(WORDS, 4)) for _ in range(3)]
            f.write(json.dumps({"context": " ".join(words[:6]), "choices": choices, "label": 0}) + "\n")
    (tmp_path / "cloze.yaml").write_text(
        f"task: tiny_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\n"
        "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
    return str(tmp_path)


def test_multiple_choice_equals_lm_evals_hf_backend(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path, texts = model_dir
    tasks = TaskManager(include_path=_task(tmp_path, texts))
    runs = {}
    for name, args in (("hf", f"pretrained={path},dtype=float32,device=cpu"), ("regft_jax", f"pretrained={path}")):
        out = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["tiny_cloze"], task_manager=tasks,
                                      batch_size=4, log_samples=True)
        samples = sorted(out["samples"]["tiny_cloze"], key=lambda s: s["doc_id"])
        runs[name] = (out["results"]["tiny_cloze"]["acc,none"],
                      np.array([[float(r[0][0]) for r in s["resps"]] for s in samples]))
    assert runs["regft_jax"][0] == runs["hf"][0]
    assert runs["hf"][1].shape == (12, 4)
    np.testing.assert_allclose(runs["regft_jax"][1], runs["hf"][1], atol=1e-4, rtol=0)


def test_rolling_loglikelihood_and_greedy_generation_equal_the_hf_backend(model_dir):
    from lm_eval.models.huggingface import HFLM

    path, texts = model_dir
    ours = harness.RegftLM(pretrained=path, max_length=16, batch_size=4)
    theirs = HFLM(pretrained=path, dtype="float32", device="cpu", max_length=16, batch_size=4)
    docs = [texts[0] + " " + texts[1], texts[2]]  # the first spans several 16-token windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(docs)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling), atol=1e-4)
    # the default max_length is the model's whole context (128): windows of 128 inputs + 1 target token
    ours_full = harness.RegftLM(pretrained=path, batch_size=4)
    theirs_full = HFLM(pretrained=path, dtype="float32", device="cpu", max_length=128, batch_size=4)
    assert ours_full.max_length == 128
    long_doc = [Instance("loglikelihood_rolling", {}, (" ".join(texts[6:40]),), 0)]  # several 128-token windows
    np.testing.assert_allclose(ours_full.loglikelihood_rolling(long_doc), theirs_full.loglikelihood_rolling(long_doc),
                               atol=1e-3)
    gen = [Instance("generate_until", {}, (t[:20], {"until": ["mat"], "max_gen_toks": 6}), i)
           for i, t in enumerate(texts[3:6])]
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_cloze_task_from_held_out_documents_runs_through_lm_eval(tmp_path, monkeypatch, model_dir):
    from regft_jax.data.records import Example
    from regft_jax.eval.tasks import cloze_docs, write_task

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path, texts = model_dir
    examples = [Example(text=t, domain="general") for t in texts[:40]] + [Example(text="too short", domain="g")]
    for distractors in ("shuffled", "other_docs"):
        docs = cloze_docs(examples, words=3, limit=10, distractors=distractors)
        assert len(docs) == 10
        for d in docs:
            true = d["choices"][d["label"]]
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
            assert any(t.startswith(d["context"] + " " + true) for t in texts)  # the true next words
            same_words = [sorted(c.split()) == sorted(true.split()) for c in d["choices"]]
            assert all(same_words) if distractors == "shuffled" else sum(same_words) < 4  # (other orders)
        assert len({d["label"] for d in docs}) > 1  # the answer's position varies
    write_task(str(tmp_path / "tasks"), docs)
    out = lm_eval.simple_evaluate(model="regft_jax", model_args=f"pretrained={path}", tasks=["regft_cloze"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=8)
    assert 0.0 <= out["results"]["regft_cloze"]["acc,none"] <= 1.0 and "acc_norm,none" in out["results"]["regft_cloze"]
