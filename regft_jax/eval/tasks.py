"""Offline lm-eval tasks built from the run's own corpus, and the base model exported for lm-eval.

    python -m regft_jax.eval.tasks --config=configs/tiny.py --out runs/lm_eval
    python -m regft_jax.eval.harness --model regft_jax --model_args pretrained=runs/lm_eval/base_model \\
        --tasks regft_cloze --include_path runs/lm_eval --batch_size 32

writes `regft_cloze.yaml` + `regft_cloze.jsonl` (a 4-way cloze on the held-out general-domain documents, the
validation split and the evaluation prompts' sources: the first 60% of a document's words, then its next
`--words` words in their order or in three other orders (`--distractors shuffled`, default), or the same
number of words from three other documents (`other_docs`); accuracy by log-likelihood, `acc` and
length-normalized `acc_norm`) and, with
`--export_base` (default on), the configured base model (pretrained and cached as `main` does) as an HF
directory `base_model/` with the corpus tokenizer (`eval.export.export_model`). Any model exported with
`eval.export` (e.g. by `main --config.eval.save_models=True`) runs the same way; a model that learned the
domain does better than the 25% of chance.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from regft_jax.data.records import Example

TASK = "regft_cloze"


DISTRACTORS = ("shuffled", "other_docs")


def cloze_docs(examples: Sequence[Example], *, words: int = 6, choices: int = 4, limit: int = 500,
               seed: int = 0, distractors: str = "shuffled") -> list[dict]:
    """{"context", "choices", "label"} per held-out document long enough (>= 2 x words words): the context
    is its first 60% of words, the true choice the next `words` words, the others the same words in other
    orders ("shuffled": word order, which even a small LM has learned) or `words`-word spans of other documents
    ("other_docs": topic, which a tiny one barely has); the true choice's position is random. A document whose
    span has too few distinct orders is skipped."""
    if distractors not in DISTRACTORS:
        raise ValueError(f"distractors={distractors!r}: expected one of {DISTRACTORS}")
    rng = np.random.default_rng(seed)
    texts = [e.text.split() for e in examples if len(e.text.split()) >= 2 * words]
    docs = []
    for i, w in enumerate(texts):
        if len(docs) == limit:
            break
        cut = max(1, min(int(0.6 * len(w)), len(w) - words))
        true = " ".join(w[cut:cut + words])
        others = []
        for _ in range(100 * choices):
            if len(others) == choices - 1:
                break
            if distractors == "shuffled":
                span = " ".join(rng.permutation(w[cut:cut + words]))
            else:
                j = int(rng.integers(len(texts)))
                start = int(rng.integers(0, len(texts[j]) - words + 1))
                span = " ".join(texts[j][start:start + words]) if j != i else true
            if span != true and span not in others:
                others.append(span)
        if len(others) < choices - 1:
            continue
        label = int(rng.integers(choices))
        docs.append({"context": " ".join(w[:cut]), "choices": others[:label] + [true] + others[label:],
                     "label": label})
    return docs


def write_task(out_dir: str, docs: Sequence[dict]) -> str:
    """`regft_cloze.jsonl` and its lm-eval task `regft_cloze.yaml` (absolute data path) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.abspath(os.path.join(out_dir, f"{TASK}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    yaml = (f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(data)}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
            "doc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    path = os.path.join(out_dir, f"{TASK}.yaml")
    with open(path, "w") as f:
        f.write(yaml)
    return path


def main(argv=None) -> None:
    import argparse

    from regft_jax.config_utils import load_config_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--words", type=int, default=6)
    ap.add_argument("--distractors", choices=DISTRACTORS, default="shuffled",
                    help="wrong choices: the true words in other orders, or spans of other documents")
    ap.add_argument("--limit", type=int, default=500, help="documents (tasks rows) at most")
    ap.add_argument("--export_base", type=int, default=1, help="export the base model as out/base_model (1/0)")
    args = ap.parse_args(argv)
    config = load_config_file(args.config)

    from regft_jax.data.pipeline import build_corpus

    corpus = build_corpus(config.data, seed=config.seed)
    general = [d for d in corpus.domains if d != config.data.toxic_domain]
    held_out = [e for d in general for e in corpus.valid[d] + corpus.prompts[d]]  # (never trained on)
    docs = cloze_docs(held_out, words=args.words, limit=args.limit, seed=config.seed, distractors=args.distractors)
    print(f"{write_task(args.out, docs)}: {len(docs)} held-out {'/'.join(general)} documents, 4 choices "
          f"({args.distractors})")
    if args.export_base:
        from regft_jax import sharding
        from regft_jax.eval.export import export_model
        from regft_jax.train.base_model import base_model

        cfg, params, _ = base_model(config, sharding.make_mesh(dict(config.mesh)), corpus)
        out = export_model(os.path.join(args.out, "base_model"), cfg, params, corpus.tokenizer, hf=True)
        print(f"{out}: the base model ({cfg.num_params() / 1e6:.2f}M params) and its tokenizer, for "
              f"--model regft_jax --model_args pretrained={out} (or --model hf)")


if __name__ == "__main__":
    main()
