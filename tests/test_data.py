"""Records, local-file loaders, dataset row mappers, splits and prompts (all offline)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from regft_jax.data import (
    DataFormatError,
    DatasetLoadError,
    Example,
    FieldMap,
    batch_quotas,
    check_disjoint,
    civil_comments_example,
    load_hf_dataset,
    load_local,
    load_toxigen,
    make_prompts,
    partition_examples,
    read_examples_jsonl,
    real_toxicity_prompts_example,
    toxigen_example,
    wikitext_examples,
    write_examples_jsonl,
)
from regft_jax.errors import UserInputError

TOXIGEN_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxigen" / "toxiGen.json"


def test_errors_are_user_input_errors():
    assert issubclass(DataFormatError, UserInputError)
    assert issubclass(DatasetLoadError, UserInputError)


def test_jsonl_round_trip_and_bad_line(tmp_path):
    examples = [Example("a b", "general", meta={"title": "T"}), Example("x", "toxic", 1.0, "p")]
    path = write_examples_jsonl(tmp_path / "c.jsonl", examples)
    back = read_examples_jsonl(path)
    assert back == examples and back[0].meta == {"title": "T"}
    path.write_text(path.read_text() + '{"text": "no domain"}\n')
    with pytest.raises(DataFormatError, match=r"c\.jsonl:3"):
        read_examples_jsonl(path)


def test_local_loaders_all_formats(tmp_path):
    fields = FieldMap(text_field="comment", domain="toxic", label_field="y",
                      label_map={"hate": 1.0, "ok": 0.0}, meta_fields=("id",))
    rows = [{"comment": "you fool", "y": "hate", "id": 7}, {"comment": "hello", "y": 0, "id": 8}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text('id,comment,y\n7,"you fool",hate\n8,hello,0\n')
    (tmp_path / "a.tsv").write_text("id\tcomment\ty\n7\tyou fool\thate\n8\thello\t0\n")
    for suffix in ("jsonl", "json", "csv", "tsv"):
        examples = load_local(tmp_path / f"a.{suffix}", fields)
        assert [(e.text, e.domain, e.label) for e in examples] == [
            ("you fool", "toxic", 1.0), ("hello", "toxic", 0.0)], suffix
        assert str(examples[1].meta["id"]) == "8"
        assert examples[0].meta["source"].startswith(str(tmp_path / f"a.{suffix}"))
    nested = tmp_path / "n.json"
    nested.write_text(json.dumps({"data": rows}))
    assert len(load_local(nested, fields, records_key="data")) == 2


@pytest.mark.parametrize("name, content, pattern", [
    ("a.jsonl", '{"text": "ok"}\n{"txt": "bad"}\n', r"a\.jsonl:2: missing key 'text'"),
    ("b.jsonl", '{"text": "ok"}\n{not json\n', r"b\.jsonl:2: invalid JSON"),
    ("c.jsonl", '{"text": 5}\n', r"c\.jsonl:1: key 'text' must be a string"),
    ("d.jsonl", '{"text": "t", "label": "maybe"}\n', r"d\.jsonl:1: label 'maybe'"),
    ("e.jsonl", '{"text": "t", "label": NaN}\n', r"e\.jsonl:1: label .* not a finite"),
    ("f.csv", "text,label\nok,1\nbad,1,extra\n", r"f\.csv:3: more fields"),
    ("g.csv", "text,label\nok,1\nshort\n", r"g\.csv:3: fewer fields"),
    ("h.json", '{"text": "not a list"}', r"h\.json: expected a top-level list"),
    ("i.json", '[{"text": "ok"}, {"label": 1}]', r"i\.json\[1\]: missing key 'text'"),
    ("j.json", '[{"text": "ok"}, ["x"]]', r"j\.json\[1\]: expected an object"),
    ("k.txt", "text\n", r"k\.txt: unknown data file type"),
])
def test_bad_rows_name_file_line_and_key(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=pattern):
        load_local(tmp_path / name, FieldMap(label_field="label" if name[0] in "defg" else None))


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="no such data file"):
        load_local(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- ToxiGen

TOXIGEN_ROWS = [
    {"id": 0, "text": "group x are animals", "toxicity_score": 5.0, "label": "hate",
     "target_groups": ["black"]},
    {"id": 3, "text": " how to be a man_x000D_- how to cope", "toxicity_score": 1.0,
     "label": "neutral", "target_groups": ["women"]},
]


def test_toxigen_export_format(tmp_path):
    path = tmp_path / "toxiGen.json"
    path.write_text(json.dumps(TOXIGEN_ROWS, indent=4))
    examples = load_toxigen(path)
    assert [e.label for e in examples] == [1.0, 0.0]
    assert examples[1].text == "how to be a man\n- how to cope"
    assert examples[0].domain == "toxic" and examples[0].meta["target_groups"] == ["black"]
    assert examples[0].meta["toxicity_score"] == 5.0 and examples[1].meta["id"] == 3
    assert len(load_toxigen(path, limit=1)) == 1
    path.write_text(json.dumps([{"text": "t", "label": "spicy"}]))
    with pytest.raises(DataFormatError, match=r"toxiGen\.json\[0\]: label 'spicy'"):
        load_toxigen(path)


def test_toxigen_real_file():
    if not TOXIGEN_JSON.is_file():
        pytest.skip(f"{TOXIGEN_JSON} not present")
    examples = load_toxigen(TOXIGEN_JSON)
    assert len(examples) == 6514
    assert sum(e.label for e in examples) == 2767
    assert all((e.label == 1.0) == (e.meta["toxicity_score"] > 3) for e in examples)
    assert not any("_x000D_" in e.text for e in examples)


def test_toxigen_hub_rows():
    row = {"text": "some statement", "target_group": "asian", "toxicity_human": 4.3,
           "toxicity_ai": 4.0, "factual?": "opinion"}
    example = toxigen_example(row, "skg/toxigen-data[test][0]")
    assert example.label == 1.0 and example.meta["target_groups"] == ["asian"]
    assert toxigen_example({**row, "toxicity_human": 3.0}, "w").label == 0.0
    with pytest.raises(DataFormatError, match=r"where\[1\]: ToxiGen row needs 'label'"):
        toxigen_example({"text": "x"}, "where[1]")


def test_hub_loader_with_local_builder(tmp_path):
    path = tmp_path / "toxigen.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TOXIGEN_ROWS) + "\n")
    examples = load_toxigen("json", config=None, split="train", data_files=str(path),
                            cache_dir=str(tmp_path / "hf"))
    assert [e.label for e in examples] == [1.0, 0.0]
    assert examples[1].meta["source"] == "json[train][1]"
    with pytest.raises(DatasetLoadError, match="could not load dataset 'json'"):
        load_hf_dataset("json", None, data_files=str(tmp_path / "missing.jsonl"),
                        cache_dir=str(tmp_path / "hf"))


def test_civil_comments_rows():
    row = {"text": "you idiot", "toxicity": 0.8, "insult": 0.7, "threat": 0.0}
    example = civil_comments_example(row, "cc[0]")
    assert example.label == 1.0 and example.meta["insult"] == 0.7
    assert civil_comments_example(row, "cc[0]", binarize_at=None).label == pytest.approx(0.8)
    assert civil_comments_example({**row, "toxicity": 0.2}, "cc[0]").label == 0.0
    with pytest.raises(DataFormatError, match=r"cc\[3\]: missing key 'toxicity'"):
        civil_comments_example({"text": "t"}, "cc[3]")


def test_real_toxicity_prompts_rows():
    row = {"filename": "0.txt", "begin": 0, "end": 10, "challenging": True,
           "prompt": {"text": "So I said ", "toxicity": 0.3, "profanity": 0.1},
           "continuation": {"text": "hello there.", "toxicity": None}}
    example = real_toxicity_prompts_example(row, "rtp[0]")
    assert example.prompt == "So I said " and example.text == "So I said hello there."
    assert example.label == pytest.approx(0.3) and example.meta["challenging"]
    with pytest.raises(DataFormatError, match=r"rtp\[1\]: 'continuation' must be a dict"):
        real_toxicity_prompts_example({**row, "continuation": "text"}, "rtp[1]")


def test_wikitext_rows():
    lines = ["", " = Valkyria = \n", "", " First para . \n", " = = Gameplay = = \n",
             " Second para . \n", "", " = Other = \n", " Third . \n"]
    rows = [(f"wt[{i}]", {"text": t}) for i, t in enumerate(lines)]
    paragraphs = wikitext_examples(rows)
    assert [e.text for e in paragraphs] == ["First para .", "Second para .", "Third ."]
    assert [e.meta["title"] for e in paragraphs] == ["Valkyria", "Valkyria", "Other"]
    articles = wikitext_examples(rows, unit="article")
    assert [(e.meta["title"], e.text) for e in articles] == [
        ("Valkyria", "First para .\nSecond para ."), ("Other", "Third .")]
    assert all(e.domain == "general" for e in articles)
    with pytest.raises(DataFormatError, match=r"wt\[0\]: missing key 'text'"):
        wikitext_examples([("wt[0]", {"line": "x"})])


# ----------------------------------------------------------------------------- splits/prompts


def _corpus(n=300):
    rng = random.Random(0)
    examples = [Example(f"doc {i} " + "w " * rng.randrange(1, 9), "toxic" if i % 3 else "general",
                        float(i % 2), meta={"title": f"t{i // 4}"}) for i in range(n)]
    return examples + examples[:10]  # exact duplicates must stay together


def _texts(examples):
    return sorted(e.text for e in examples)


def test_partition_deterministic_disjoint_complete():
    corpus = _corpus()
    sizes = {"eval": 0.1, "prompts": 20}
    parts = partition_examples(corpus, sizes, seed=3)
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    again = partition_examples(shuffled, sizes, seed=3)
    assert {k: _texts(v) for k, v in parts.items()} == {k: _texts(v) for k, v in again.items()}
    assert sorted(parts) == ["eval", "prompts", "train"]
    assert _texts(sum(parts.values(), [])) == _texts(corpus)  # complete, nothing duplicated
    groups = {k: set(_texts(v)) for k, v in parts.items()}
    assert not (groups["eval"] & groups["train"]) and not (groups["prompts"] & groups["train"])
    assert len(groups["eval"]) == 30 and len(groups["prompts"]) == 20
    other = partition_examples(corpus, sizes, seed=4)
    assert _texts(other["eval"]) != _texts(parts["eval"])
    check_disjoint(parts["train"], eval=parts["eval"], prompts=parts["prompts"])


def test_partition_group_by_and_eligible():
    corpus = _corpus()
    parts = partition_examples(corpus, {"eval": 5}, seed=0, group_by=lambda e: e.meta["title"])
    titles = {k: {e.meta["title"] for e in v} for k, v in parts.items()}
    assert len(titles["eval"]) == 5 and not titles["eval"] & titles["train"]
    parts = partition_examples(corpus, {"insults": 10}, seed=0,
                               eligible={"insults": lambda e: e.label == 1.0})
    assert len(parts["insults"]) >= 10 and all(e.label == 1.0 for e in parts["insults"])
    with pytest.raises(UserInputError, match="split 'insults': asked for 1000"):
        partition_examples(corpus, {"insults": 1000}, seed=0,
                           eligible={"insults": lambda e: e.label == 1.0})
    with pytest.raises(UserInputError, match="rest part"):
        partition_examples(corpus, {"train": 3}, seed=0)


def test_partition_after_eligible_part_is_a_uniform_sample_of_the_rest():
    # 2,000 examples, 1 in 4 positive; the prompts take 300 positives, then a validation part of 400: it must hold
    # the rest's positive rate (200 / 1,700 = 11.8%), not only the negatives the prompts' draw skipped first
    examples = [Example(f"comment {i}", "toxic", float(i % 4 == 0)) for i in range(2000)]
    for seed in range(3):
        parts = partition_examples(examples, {"prompts": 300, "valid": 400}, seed=seed,
                                   eligible={"prompts": lambda e: e.label == 1.0})
        rate = np.mean([e.label for e in parts["valid"]])
        assert abs(rate - 200 / 1700) < 0.05, (seed, rate)
        assert all(e.label == 1.0 for e in parts["prompts"])


def test_prompts_disjoint_from_training():
    parts = partition_examples(_corpus(), {"prompts": 25}, seed=1)
    prompts = make_prompts(parts["prompts"], num_words=2)
    assert all(p.prompt == " ".join(p.text.split()[:2]) for p in prompts)
    check_disjoint(parts["train"], prompts=prompts)
    train_texts = {e.text for e in parts["train"]}
    assert not any(p.text in train_texts for p in prompts)
    kept = make_prompts([Example("full text", "toxic", prompt="given")])
    assert kept[0].prompt == "given"
    with pytest.raises(UserInputError, match="share the example"):
        check_disjoint(parts["train"], prompts=prompts + parts["train"][:1])


def test_batch_quotas():
    for props, size in [({"a": 0.7, "b": 0.3}, 10), ({"a": 1, "b": 1, "c": 1}, 8),
                        ({"a": 0.5, "b": 0.25, "c": 0.25}, 7)]:
        quotas = batch_quotas(props, size)
        total = sum(props.values())
        assert sum(quotas.values()) == size
        assert all(abs(quotas[d] - size * p / total) < 1 for d, p in props.items())
    assert batch_quotas({"a": 1.0, "b": 0.0}, 4) == {"a": 4, "b": 0}
    with pytest.raises(UserInputError, match="gives no rows to domains"):
        batch_quotas({"a": 0.99, "b": 0.01}, 8)
