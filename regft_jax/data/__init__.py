"""Corpora with domain tags, tokenization, packing, prompts and multi-host batching.

Heavy optional pieces stay lazy: ``datasets`` is imported only by the hub loaders, ``jax``
only by :func:`make_global_batch`.
"""
from regft_jax.data.batching import (
    IndexStream,
    MixtureBatcher,
    PromptBatcher,
    eval_batches,
    even_row_positions,
    make_global_batch,
    once_batches,
    process_row_positions,
)
from regft_jax.data.files import FieldMap, load_csv, load_json, load_jsonl, load_local, parse_label
from regft_jax.data.hub import (
    DatasetLoadError,
    civil_comments_example,
    load_civil_comments,
    load_hf_dataset,
    load_real_toxicity_prompts,
    load_toxigen,
    load_wikitext,
    real_toxicity_prompts_example,
    toxigen_example,
    wikitext_examples,
)
from regft_jax.data.mixture import batch_quotas, check_disjoint, make_prompts, partition_examples
from regft_jax.data.offline import (
    OfflineCorpusError,
    default_cache_dir,
    load_offline_corpus,
    offline_tokenizer,
)
from regft_jax.data.packing import PackedRows, left_pad, pack_documents, truncate_documents
from regft_jax.data.records import DataFormatError, Example, read_examples_jsonl, write_examples_jsonl
from regft_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DataFormatError", "DatasetLoadError", "Example", "FieldMap", "IndexStream",
    "MixtureBatcher", "OfflineCorpusError", "PackedRows", "PromptBatcher", "Tokenizer",
    "batch_quotas", "check_disjoint", "civil_comments_example", "default_cache_dir",
    "eval_batches", "even_row_positions", "left_pad", "load_civil_comments", "load_csv",
    "load_hf_dataset", "load_json", "load_jsonl", "load_local", "load_offline_corpus",
    "load_real_toxicity_prompts", "load_tokenizer", "load_toxigen", "load_wikitext",
    "make_global_batch", "make_prompts", "offline_tokenizer", "once_batches", "pack_documents",
    "parse_label", "partition_examples", "process_row_positions", "read_examples_jsonl",
    "real_toxicity_prompts_example", "toxigen_example", "train_bpe_tokenizer",
    "truncate_documents", "wikitext_examples", "write_examples_jsonl",
]
