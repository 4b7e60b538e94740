"""Tokenizers: train a small byte-level BPE, and load any HF tokenizer directory.

Both sides use only the ``tokenizers`` library (fast batch encoding, no transformers import);
the directories written here are also loadable with ``transformers.AutoTokenizer``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from regft_jax.errors import UserInputError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4096
) -> str:
    """Trains a byte-level BPE on ``texts`` and saves an HF tokenizer directory.

    Special tokens: ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2). Every byte is in the
    alphabet, so any text encodes without unknown tokens. Returns ``out_dir`` as a string.
    """
    if vocab_size < 256 + 3:
        raise UserInputError(f"vocab_size must be >= 259 (bytes + specials), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(out)


def _special_token(config: dict, key: str) -> str | None:
    """A special token's string from tokenizer_config.json (plain or AddedToken-dict form)."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A thin wrapper around an HF ``tokenizer.json`` with batch encode/decode.

    Attributes:
      vocab_size: number of ids (including added/special tokens).
      bos_id, eos_id: ids of the tokenizer's BOS/EOS tokens (None when it has none).
      pad_id: id of the pad token; falls back to ``eos_id`` when there is no pad token.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict | None = None, name: str = ""):
        self.tok = tokenizer
        self.name = name
        config = config or {}
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _special_token(config, key)
            ids[key] = None if token is None else tokenizer.token_to_id(token)
            if token is not None and ids[key] is None:
                raise UserInputError(f"{name}: {key} {token!r} is not in the vocabulary")
        self.bos_id: int | None = ids["bos_token"]
        self.eos_id: int | None = ids["eos_token"]
        self.pad_id: int | None = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Token ids of every text (no special tokens, except a leading BOS if ``add_bos``)."""
        if add_bos and self.bos_id is None:
            raise UserInputError(f"{self.name}: add_bos=True but the tokenizer has no bos_token")
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos else []
        return [prefix + e.ids for e in encodings]

    def decode_batch(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Texts of id sequences (numpy rows are fine)."""
        rows = [[int(i) for i in row] for row in ids]
        return self.tok.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int, *, model_key: str = "config.model",
                tokenizer_key: str = "config.data.tokenizer") -> None:
    """Raises UserInputError if the tokenizer has more ids than the model has embedding rows (a
    smaller tokenizer is fine: models often pad their vocabulary). `model_key` / `tokenizer_key`
    name the config entries in the message, e.g. ``model_key="config.model.path='/ckpt'"``."""
    if tokenizer_vocab_size > model_vocab_size:
        raise UserInputError(
            f"{model_key} / {tokenizer_key}: tokenizer vocabulary {tokenizer_vocab_size} is larger than the "
            f"model's vocab_size {model_vocab_size} (token ids >= {model_vocab_size} would index past the embedding)"
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads an HF tokenizer directory (``tokenizer.json`` + optional ``tokenizer_config.json``).

    ``path`` may also be the ``tokenizer.json`` file itself. Special tokens come from
    ``tokenizer_config.json`` (falling back to ``special_tokens_map.json``).
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    tokenizer_file = path if path.is_file() else path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserInputError(
            f"{path}: no tokenizer.json here (need an HF fast-tokenizer directory; "
            "sentencepiece-only tokenizers must be converted first)"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # noqa: BLE001 - the library raises a bare Exception
        raise UserInputError(f"{tokenizer_file}: not a valid tokenizer.json ({err})") from err
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later ones win
        file = directory / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserInputError(f"{file}: invalid JSON ({err.msg} at line {err.lineno})") from err
            if isinstance(data, dict):
                config.update({k: v for k, v in data.items() if v is not None})
    return Tokenizer(tok, config, name=str(path))
