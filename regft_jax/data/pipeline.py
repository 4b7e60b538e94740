"""From the `data` config section to a tokenized corpus split into train / validation / prompts.

    corpus = build_corpus(config.data, seed=config.seed)
    rows = corpus.packed("train", seq_len=128)           # domain -> PackedRows
    corpus.prompts["toxic"]                               # held-out prompt Examples

Every domain is split on its own, deterministically by seed (`partition_examples`): evaluation
prompts first (for the toxic domain only from examples the dataset labels as violating, e.g.
insults, when `toxic_prompts_from_violations`), then a validation fraction; the rest trains.
The three parts are checked to be disjoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import ml_collections

from regft_jax.data.files import FieldMap, load_local
from regft_jax.data.mixture import check_disjoint, make_prompts, partition_examples
from regft_jax.data.offline import load_offline_corpus, offline_tokenizer
from regft_jax.data.packing import PackedRows, pack_documents
from regft_jax.data.records import Example
from regft_jax.data.tokenizer import Tokenizer, load_tokenizer
from regft_jax.errors import UserInputError

SOURCES = ("offline", "files")


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: dict[str, list[Example]]
    valid: dict[str, list[Example]]
    prompts: dict[str, list[Example]]  # held-out evaluation prompts (Example.prompt is set)

    @property
    def domains(self) -> list[str]:
        return sorted(self.train)

    def packed(self, part: str, seq_len: int) -> dict[str, PackedRows]:
        """Each domain's `part` examples as [bos] doc [eos] streams cut into rows of seq_len + 1
        tokens (inputs are the first seq_len, targets the last seq_len)."""
        tok = self.tokenizer
        return {d: pack_documents(tok.encode_batch([e.text for e in examples]), seq_len + 1,
                                  pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
                for d, examples in getattr(self, part).items()}

    def summary(self) -> str:
        return "; ".join(f"{d}: {len(self.train[d])} train / {len(self.valid[d])} valid / "
                         f"{len(self.prompts[d])} prompts" for d in self.domains)


def load_examples(data: ml_collections.ConfigDict) -> list[Example]:
    """`data.source`: "offline" (the embedded corpus) or "files" (`data.files`: comma-separated
    `domain:path[:label_field[:text_field]]` entries; jsonl/csv/json by suffix)."""
    if data.source == "offline":
        return load_offline_corpus(data.cache_dir or None)
    if data.source == "files":
        examples = []
        for spec in filter(None, (s.strip() for s in data.files.split(","))):
            parts = spec.split(":")
            if not 2 <= len(parts) <= 4 or not all(parts[:2]):
                raise UserInputError(f"config.data.files entry {spec!r}: expected domain:path[:label_field[:text_field]]")
            domain, path, label, text = (parts + ["", ""])[:4]
            fields = FieldMap(text_field=text or "text", domain=domain, label_field=label or None)
            examples += load_local(os.path.expanduser(path), fields)
        if not examples:
            raise UserInputError(f"config.data.files={data.files!r}: no examples (data.source='files')")
        return examples
    raise UserInputError(f"config.data.source={data.source!r}: expected one of {SOURCES}")


def _tokenizer(data: ml_collections.ConfigDict) -> Tokenizer:
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if data.source != "offline":
        raise UserInputError("config.data.tokenizer is empty: give an HF tokenizer directory "
                             "(only the offline corpus trains its own)")
    return offline_tokenizer(data.cache_dir or None, data.vocab_size)


def build_corpus(data: ml_collections.ConfigDict, *, seed: int) -> Corpus:
    examples = load_examples(data)
    by_domain: dict[str, list[Example]] = {}
    for e in examples:
        by_domain.setdefault(e.domain, []).append(e)
    num_prompts: Mapping[str, int] = dict(data.num_prompts)
    unknown = sorted(set(num_prompts) - set(by_domain))
    if unknown:
        raise UserInputError(f"config.data.num_prompts names domains {unknown} that the corpus lacks "
                             f"(it has {sorted(by_domain)})")
    train, valid, prompts = {}, {}, {}
    for domain, items in sorted(by_domain.items()):
        eligible = None
        if domain == data.toxic_domain and data.toxic_prompts_from_violations:
            eligible = {"prompts": lambda e: e.label is not None and e.label >= 0.5}
        parts = partition_examples(items, {"prompts": num_prompts.get(domain, 0), "valid": data.valid_fraction},
                                   seed=seed, eligible=eligible)
        train[domain], valid[domain] = parts["train"], parts["valid"]
        prompts[domain] = make_prompts(parts["prompts"], data.prompt_words)
        check_disjoint(parts["train"], valid=parts["valid"], prompts=parts["prompts"])
    return Corpus(_tokenizer(data), train, valid, prompts)
