"""From the `data` config section to a tokenized corpus split into train / validation / prompts.

    corpus = build_corpus(config.data, seed=config.seed)
    rows = corpus.packed("train", seq_len=128)           # domain -> PackedRows
    corpus.prompts["toxic"]                               # held-out prompt Examples

No leakage between the parts, in this order:

1. Deduplication on normalized text (`normalize_text`: casefold, punctuation and whitespace
   removed), within and across domains: one copy is kept, the first in load order; a text found
   in several domains is kept only in `data.toxic_domain` if it is one of them, else in the
   alphabetically first (`dedup_examples`).
2. Every domain is split on its own, deterministically by seed (`partition_examples`): evaluation
   prompts first (for the toxic domain only from examples the dataset labels as violating, e.g.
   insults, when `toxic_prompts_from_violations`), then a validation fraction; the rest trains.
3. Training examples whose first `data.prompt_words` words (the prompt the method samples
   continuations of) equal an evaluation prompt of any domain, or whose text starts with one
   as whole words, normalized, are dropped (`drop_prompt_overlaps`).
4. Checked over all domains together: train / valid / prompt source texts are disjoint
   (normalized); UserInputError otherwise.

The counts dropped per domain are in `Corpus.dropped` and `Corpus.summary()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np

from regft_jax import multihost
from regft_jax.data.files import LABEL_NAMES, FieldMap, load_local
from regft_jax.data.hub import load_hub_domains
from regft_jax.data.mixture import (
    check_disjoint,
    dedup_examples,
    drop_prompt_overlaps,
    make_prompts,
    partition_examples,
)
from regft_jax.data.offline import default_cache_dir, load_offline_corpus, offline_tokenizer
from regft_jax.data.packing import PackedRows, pack_documents
from regft_jax.data.records import Example
from regft_jax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer  # noqa: F401 - check_vocab re-exported
from regft_jax.errors import UserInputError

SOURCES = ("offline", "files", "hub")


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: dict[str, list[Example]]
    valid: dict[str, list[Example]]
    prompts: dict[str, list[Example]]  # held-out evaluation prompts (Example.prompt is set)
    # domain -> {"duplicates", "cross_domain", "prompt_overlap": examples dropped for that reason}
    dropped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    cache_dir: Optional[str] = None  # where `packed` keeps tokenized parts (None: memory only)
    _packed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # (part, seq_len) -> rows

    @property
    def domains(self) -> list[str]:
        return sorted(self.train)

    def packed(self, part: str, seq_len: int) -> dict[str, PackedRows]:
        """Each domain's `part` examples as [bos] doc [eos] streams cut into rows of seq_len + 1
        tokens (inputs are the first seq_len, targets the last seq_len). Pretraining, SFT, the method and
        evaluation share the result (treat it as read-only).

        With a `cache_dir`, the rows are tokenized once into `<cache_dir>/tokenized/<hash>.npz` (the hash of
        the texts, the tokenizer and seq_len) by process 0, and every process reads that file: on a
        filesystem all hosts share, the corpus is tokenized once for all of them and for later runs. A
        process that does not see the file (a cache directory of its own) tokenizes the same rows itself."""
        key = (part, seq_len)
        if key not in self._packed:
            path = None if self.cache_dir is None else self._packed_path(part, seq_len)
            if path is not None and multihost.is_primary() and not path.is_file():
                _save_rows(path, self._pack(part, seq_len))
            if path is not None and jax.process_count() > 1:
                multihost.all_agree(True)  # a barrier: process 0 has written the file
            self._packed[key] = (_load_rows(path) if path is not None and path.is_file()
                                 else self._pack(part, seq_len))
        return self._packed[key]

    def with_rows(self, part: str, seq_len: int, rows: Mapping[str, PackedRows]) -> "Corpus":
        """A copy whose `packed(part, seq_len)` gives `rows` for those domains (the others packed as here);
        examples and prompts unchanged (e.g. the classify stage's classification rows of the toxic domain)."""
        merged = {**self.packed(part, seq_len), **rows}
        return dataclasses.replace(self, _packed={**self._packed, (part, seq_len): merged})

    def _pack(self, part: str, seq_len: int) -> dict[str, PackedRows]:
        tok = self.tokenizer
        return {d: pack_documents(tok.encode_batch([e.text for e in examples]), seq_len + 1,
                                  pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
                for d, examples in getattr(self, part).items()}

    def _packed_path(self, part: str, seq_len: int) -> Path:
        h = hashlib.sha256(self.tokenizer.tok.to_str().encode())
        h.update(json.dumps([PACKED_VERSION, seq_len, self.tokenizer.pad_id, self.tokenizer.bos_id,
                             self.tokenizer.eos_id]).encode())
        for d, examples in sorted(getattr(self, part).items()):
            h.update(d.encode() + b"\0" + "\0".join(e.text for e in examples).encode() + b"\1")
        return Path(self.cache_dir) / "tokenized" / f"{h.hexdigest()[:24]}.npz"

    def summary(self) -> str:
        def dropped(d):
            n = self.dropped.get(d)
            if n is None:
                return ""
            return (f" (dropped {n['duplicates']} duplicates, {n['cross_domain']} kept in another domain, "
                    f"{n['prompt_overlap']} starting with an eval prompt)")
        return "; ".join(f"{d}: {len(self.train[d])} train / {len(self.valid[d])} valid / "
                         f"{len(self.prompts[d])} prompts{dropped(d)}" for d in self.domains)


PACKED_VERSION = 1
_ROW_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def _save_rows(path: Path, rows: dict[str, PackedRows]) -> None:
    """Atomically (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i}.{f}": getattr(r, f) for i, (_, r) in enumerate(sorted(rows.items())) for f in _ROW_FIELDS}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, domains=np.array(sorted(rows)), **arrays)
    os.replace(tmp, path)


def _load_rows(path: Path) -> dict[str, PackedRows]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(d) for d in z["domains"]]
        return {d: PackedRows(*(z[f"{i}.{f}"] for f in _ROW_FIELDS)) for i, d in enumerate(names)}


def load_examples(data: ml_collections.ConfigDict) -> list[Example]:
    """`data.source`: "offline" (the embedded corpus), "files" (`data.files`: comma-separated
    `domain:path[:label_field[:text_field]]` entries; jsonl/csv/json by suffix; string labels
    hate/neutral as in ToxiGen's `toxiGen.json`) or "hub" (`data.hub`: per domain, a dataset by HF
    name or local copy, see `hub.load_hub_domains`)."""
    if data.source == "offline":
        return load_offline_corpus(data.cache_dir or None)
    if data.source == "hub":
        return load_hub_domains(data.get("hub"))
    if data.source == "files":
        examples = []
        for spec in filter(None, (s.strip() for s in data.files.split(","))):
            parts = spec.split(":")
            if not 2 <= len(parts) <= 4 or not all(parts[:2]):
                raise UserInputError(f"config.data.files entry {spec!r}: expected domain:path[:label_field[:text_field]]")
            domain, path, label, text = (parts + ["", ""])[:4]
            fields = FieldMap(text_field=text or "text", domain=domain, label_field=label or None,
                              label_map=LABEL_NAMES)
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


def check_domains(key: str, names, corpus_domains, *, allow_empty: bool = False) -> None:
    """Raises UserInputError unless every name in `names` (the value of config `key`, e.g.
    "method.sample_domains") is one of `corpus_domains`:
    ``config.method.sample_domains=('x',): unknown domains ['x'] (the corpus has [...])``."""
    key = key if key.startswith("config.") else f"config.{key}"
    have = sorted(corpus_domains)
    if isinstance(names, str):
        raise UserInputError(f"{key}={names!r}: expected a tuple of domain names (of {have}), not a string")
    names = list(names)
    if not names and not allow_empty:
        raise UserInputError(f"{key}=(): expected at least one domain (the corpus has {have})")
    unknown = [n for n in names if n not in have]
    if unknown:
        raise UserInputError(f"{key}={tuple(names)!r}: unknown domains {unknown} (the corpus has {have})")


def build_corpus(data: ml_collections.ConfigDict, *, seed: int) -> Corpus:
    examples = load_examples(data)
    domains = sorted({e.domain for e in examples})
    if data.toxic_domain not in domains:
        raise UserInputError(f"config.data.toxic_domain={data.toxic_domain!r}: expected one of {domains}")
    num_prompts: Mapping[str, int] = dict(data.num_prompts)
    unknown = sorted(set(num_prompts) - set(domains))
    if unknown:
        raise UserInputError(f"config.data.num_prompts names domains {unknown} that the corpus lacks "
                             f"(it has {domains})")
    examples, dropped = dedup_examples(examples, prefer_domain=data.toxic_domain)
    by_domain: dict[str, list[Example]] = {}
    for e in examples:
        by_domain.setdefault(e.domain, []).append(e)
    train, valid, prompts = {}, {}, {}
    for domain, items in sorted(by_domain.items()):
        eligible = None
        if domain == data.toxic_domain and data.toxic_prompts_from_violations:
            eligible = {"prompts": lambda e: e.label is not None and e.label >= 0.5}
        parts = partition_examples(items, {"prompts": num_prompts.get(domain, 0), "valid": data.valid_fraction},
                                   seed=seed, eligible=eligible)
        train[domain], valid[domain] = parts["train"], parts["valid"]
        prompts[domain] = make_prompts(parts["prompts"], data.prompt_words)
    all_prompts = [p for d in sorted(prompts) for p in prompts[d]]
    for domain in sorted(train):
        train[domain], dropped[domain]["prompt_overlap"] = drop_prompt_overlaps(
            train[domain], all_prompts, data.prompt_words)
    empty = [d for d in domains if not train.get(d)]
    if empty:
        raise UserInputError(f"config.data: domains {empty} have no training examples left after the "
                             f"evaluation prompts and validation split (dropped: {dropped}); "
                             "lower config.data.num_prompts / valid_fraction")
    all_train = [e for d in sorted(train) for e in train[d]]
    check_disjoint(all_train, valid=[e for d in sorted(valid) for e in valid[d]], prompts=all_prompts)
    return Corpus(_tokenizer(data), train, valid, prompts, dropped, str(data.cache_dir or default_cache_dir()))
