"""HF classifier oracle: Flax RoBERTa/BERT vs PyTorch transformers on tiny random checkpoints.

Checkpoints and tokenizers are built locally (no hub): a byte-level BPE trained on a few
sentences (RoBERTa) and a small WordPiece vocabulary (BERT).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from regft_jax.errors import UserInputError  # noqa: E402
from regft_jax.oracles import CheckpointError, OracleError, make_oracle  # noqa: E402
from regft_jax.oracles.hf_classifier import (  # noqa: E402
    HFClassifierOracle,
    default_buckets,
    plan_batches,
    resolve_positive_label,
)
from regft_jax.sharding import make_mesh  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "you are a stupid idiot and everyone knows it",
    "hello there my friend, how are you today?",
    "what a lovely morning for a walk in the park",
    "shut up, nobody asked for your opinion",
]
TEXTS = [
    "hello",
    "",
    "you are a stupid idiot",
    "what a lovely morning for a walk in the park with my dog and my friend " * 4,  # truncated
    "Ünïcödé 🙂 text",
    "the lazy dog",
    "shut up",
    "nobody asked how are you today, quick brown fox",
    "a",
    "hello",  # duplicate
    "park park park park park park park park",
]
MAX_POSITIONS = 40  # RoBERTa: 38 usable tokens


def _randomize(model: "torch.nn.Module", seed: int) -> None:
    """Large random weights, so that logits (and probabilities) vary a lot between texts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name else 0.4 * noise)
        for name, p in model.named_parameters():  # no class prior: probabilities spread around 0.5
            if name in ("classifier.out_proj.bias", "classifier.bias"):
                p.zero_()


def _roberta_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 5, vocab_size=300, min_frequency=1, show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )  # fmt: skip
    merges = [tuple(m) for m in json.loads(bpe._tokenizer.to_str())["model"]["merges"]]
    return transformers.RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)


def _bert_tokenizer():
    words = sorted({w for line in CORPUS for w in line.replace(",", " ").replace("?", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "?", *words, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))})


def _save_checkpoint(path, model, tokenizer, **save_kwargs) -> str:
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    tokenizer = _roberta_tokenizer()
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=MAX_POSITIONS, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, id2label={0: "benign", 1: "toxic"},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(config).eval()
    _randomize(model, seed=0)
    return _save_checkpoint(tmp_path_factory.mktemp("roberta"), model, tokenizer)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    tokenizer = _bert_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, hidden_act="gelu_new", num_labels=3,
        id2label={0: "neutral", 1: "hate", 2: "offensive"},
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(config).eval()
    _randomize(model, seed=1)
    return _save_checkpoint(tmp_path_factory.mktemp("bert"), model, tokenizer)


def torch_logits(model_dir: str, texts, max_length: int, dtype=None) -> np.ndarray:
    """Reference: transformers' PyTorch model, one unpadded text at a time."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype or "auto").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0].numpy())
    return np.stack(rows)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def roberta_reference(roberta_dir):
    return torch_logits(roberta_dir, TEXTS, max_length=MAX_POSITIONS - 2)


def test_roberta_matches_torch(roberta_dir, roberta_reference):
    oracle = make_oracle("hf_classifier", model_dir=roberta_dir, device_batch_size=3, buckets=(8, 16))
    assert oracle.max_length == MAX_POSITIONS - 2 and oracle.buckets == (8, 16, 38)
    assert oracle.positive_index == 1  # id2label {0: benign, 1: toxic}
    np.testing.assert_allclose(oracle.logits(TEXTS), roberta_reference, atol=1e-4, rtol=1e-4)
    expected = softmax(roberta_reference)[:, 1]
    assert expected.max() - expected.min() > 0.3, "reference probabilities too uniform to test anything"
    probs = oracle.score(TEXTS)
    assert probs.dtype == np.float32 and probs.shape == (len(TEXTS),)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(oracle.satisfies(TEXTS), 1 - expected, atol=1e-4)
    # Token counts 2..38 in four device batches padded to 8, 16, 38, 38: one program per
    # bucket, and texts of yet other lengths compile nothing new.
    assert oracle._forward._cache_size() == 3
    oracle.logits([" ".join(["fox"] * n) for n in range(1, 40, 3)])
    assert oracle._forward._cache_size() == 3


def test_roberta_on_8_device_mesh_matches_torch(roberta_dir, roberta_reference):
    assert jax.device_count() == 8
    oracle = HFClassifierOracle(roberta_dir, mesh=make_mesh({"data": 4, "fsdp": 2, "tensor": 1}), device_batch_size=5)
    assert oracle.device_batch_size == 8  # rounded up to a multiple of the 8 batch shards
    np.testing.assert_allclose(oracle.logits(TEXTS), roberta_reference, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(oracle.score(TEXTS), softmax(roberta_reference)[:, 1], atol=1e-4)
    # The compiled program really splits the batch over data x fsdp and replicates params.
    ids, mask = oracle._pad_batch([[0, 5, 2]], 16)
    compiled = oracle._forward.lower(oracle._params, ids, mask).compile()
    param_shardings, ids_sharding, _ = compiled.input_shardings[0]
    assert ids_sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
    leaf = jax.tree.leaves(oracle._params)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    tensor_parallel = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})  # batch over "data" only
    assert HFClassifierOracle(roberta_dir, mesh=tensor_parallel, device_batch_size=5).device_batch_size == 6


def test_sharded_safetensors_checkpoint(roberta_dir, roberta_reference, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(roberta_dir)
    sharded = _save_checkpoint(
        tmp_path / "sharded", model, transformers.AutoTokenizer.from_pretrained(roberta_dir), max_shard_size="20KB"
    )
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    oracle = HFClassifierOracle(sharded, device_batch_size=16)
    np.testing.assert_allclose(oracle.logits(TEXTS), roberta_reference, atol=1e-4, rtol=1e-4)


def test_bert_matches_torch(bert_dir):
    texts = ["hello there my friend", "you stupid idiot", "", "the quick brown fox jumps", "zzz qqq unknownword"]
    reference = torch_logits(bert_dir, texts, max_length=64)
    oracle = HFClassifierOracle(bert_dir, device_batch_size=8)
    assert oracle.positive_index == 1  # "hate" precedes "offensive" in VIOLATION_LABEL_NAMES
    np.testing.assert_allclose(oracle.logits(texts), reference, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(oracle.score(texts), softmax(reference)[:, 1], atol=1e-4)
    by_name = HFClassifierOracle(bert_dir, positive_label="offensive", use_cache=False)
    np.testing.assert_allclose(by_name.score(texts), softmax(reference)[:, 2], atol=1e-4)


def _rewrite_tensors(src: str, dst, edit) -> str:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_tensor_is_named(roberta_dir, tmp_path):
    name = "roberta.encoder.layer.1.attention.self.key.weight"
    broken = _rewrite_tensors(roberta_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        HFClassifierOracle(broken)


def test_misshaped_tensor_is_named(roberta_dir, tmp_path):
    name = "roberta.encoder.layer.0.intermediate.dense.weight"
    broken = _rewrite_tensors(roberta_dir, tmp_path / "shape", lambda t: t.update({name: t[name][:60]}))
    with pytest.raises(CheckpointError, match=rf"{name}' has shape \(60, 32\), config.json implies \(64, 32\)"):
        HFClassifierOracle(broken)


def test_bfloat16_checkpoint(roberta_dir, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(roberta_dir).to(torch.bfloat16)
    bf16 = _save_checkpoint(tmp_path / "bf16", model, transformers.AutoTokenizer.from_pretrained(roberta_dir))
    reference = torch_logits(bf16, TEXTS, max_length=MAX_POSITIONS - 2, dtype=torch.float32)
    oracle = HFClassifierOracle(bf16, device_batch_size=16)  # bf16 weights, float32 compute
    np.testing.assert_allclose(oracle.logits(TEXTS), reference, atol=1e-4, rtol=1e-4)


def test_bad_checkpoint_dirs_are_user_errors(roberta_dir, tmp_path):
    assert issubclass(CheckpointError, UserInputError)
    with pytest.raises(CheckpointError, match="not a local directory"):
        HFClassifierOracle("tomh/toxigen_roberta")
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        HFClassifierOracle(str(tmp_path))
    broken = shutil.copytree(roberta_dir, tmp_path / "cfg")
    config = json.loads((broken / "config.json").read_text())
    del config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: missing key 'num_hidden_layers'"):
        HFClassifierOracle(str(broken))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        HFClassifierOracle(str(broken))
    os.remove(broken / "model.safetensors")
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFClassifierOracle(str(broken))
    with pytest.raises(OracleError, match="positive_label 'nope' is not a label"):
        HFClassifierOracle(roberta_dir, positive_label="nope")


def test_resolve_positive_label():
    assert resolve_positive_label({0: "LABEL_0", 1: "LABEL_1"}) == 1  # ToxiGen RoBERTa's config
    assert resolve_positive_label({0: "toxic", 1: "non-toxic"}) == 0
    assert resolve_positive_label({"0": "Non Toxic", "1": "Toxic"}) == 1
    toxic_bert = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    assert resolve_positive_label(dict(enumerate(toxic_bert))) == 0
    assert resolve_positive_label({0: "score"}) == 0
    assert resolve_positive_label({0: "a", 1: "b"}, positive_label="B") == 1
    assert resolve_positive_label({0: "a", 1: "b"}, positive_label=0) == 0
    with pytest.raises(ValueError, match="cannot tell which class"):
        resolve_positive_label({0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="not a label"):
        resolve_positive_label({0: "a", 1: "b"}, positive_label="c")
    with pytest.raises(ValueError, match="out of range"):
        resolve_positive_label({0: "a", 1: "b"}, positive_label=2)


def test_plan_batches_groups_by_length():
    lengths = [3, 30, 5, 15, 4, 9, 31, 2]
    plan = plan_batches(lengths, rows=3, buckets=(8, 16, 32))
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(lengths)))
    assert all(len(idx) <= 3 for idx, _ in plan)
    for idx, padded in plan:  # smallest bucket that fits the batch's longest text
        longest = max(lengths[i] for i in idx)
        assert padded == min(b for b in (8, 16, 32) if b >= longest)
    assert [padded for _, padded in plan] == [8, 16, 32]  # sorted: [2,3,4] [5,9,15] [30,31]
    assert default_buckets(100) == (16, 32, 64, 100)
    with pytest.raises(ValueError, match="more than the largest bucket"):
        plan_batches([40], rows=2, buckets=(8, 32))
