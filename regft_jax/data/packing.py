"""Packing / truncation of token sequences into fixed [rows, seq_len] int32 arrays.

Conventions for a row of ``PackedRows`` (all arrays int32, shape [num_rows, seq_len]):
  * ``tokens``: token ids; padding uses ``pad_id`` and only ever follows the real tokens.
  * ``loss_mask``: 1 where ``tokens[b, t]`` is a real prediction target: every real token
    except BOS and padding. An LM loss predicting ``tokens[:, 1:]`` from prefixes weighs
    position ``t`` with ``loss_mask[:, 1:]``.
  * ``segment_ids``: 0 on padding, else 1, 2, ... numbering the documents inside the row
    (for per-document attention masks; a document cut by a row boundary continues as
    segment 1 of the next row).
  * ``positions``: position of each token inside its segment of the row (0-based).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from regft_jax.errors import UserInputError

log = logging.getLogger(__name__)

TokenDocs = Sequence[Sequence[int] | np.ndarray]


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Fixed-length rows of one domain (see the module docstring for the conventions)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Returns the arrays of the given row indices as a dict."""
        return {field.name: getattr(self, field.name)[rows] for field in dataclasses.fields(self)}


def _with_specials(doc: Sequence[int] | np.ndarray, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    parts = []
    if bos_id is not None:
        parts.append(np.array([bos_id], np.int32))
    parts.append(np.asarray(doc, dtype=np.int32).reshape(-1))
    if eos_id is not None:
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts)


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position of each token within its (row, segment) run; 0 on padding."""
    num_rows, seq_len = segment_ids.shape
    columns = np.broadcast_to(np.arange(seq_len, dtype=np.int32), segment_ids.shape)
    starts = np.ones(segment_ids.shape, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    return np.where(segment_ids > 0, columns - run_start, 0).astype(np.int32)


def _rows_from_flat(
    tokens: np.ndarray, doc_ids: np.ndarray, targets: np.ndarray, seq_len: int, pad_id: int
) -> PackedRows:
    num_rows = -(-tokens.size // seq_len)
    pad = num_rows * seq_len - tokens.size
    tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int32)]).reshape(num_rows, seq_len)
    doc_ids = np.concatenate([doc_ids, np.zeros(pad, np.int32)]).reshape(num_rows, seq_len)
    targets = np.concatenate([targets, np.zeros(pad, np.int32)]).reshape(num_rows, seq_len)
    # Renumber documents per row: the row's first token belongs to its lowest document id.
    segment_ids = np.where(doc_ids > 0, doc_ids - doc_ids[:, :1] + 1, 0).astype(np.int32)
    return PackedRows(tokens, targets, segment_ids, segment_positions(segment_ids))


def _empty_rows(seq_len: int) -> PackedRows:
    empty = np.zeros((0, seq_len), np.int32)
    return PackedRows(empty, empty, empty, empty)


def pack_documents(
    docs: TokenDocs,
    seq_len: int,
    *,
    pad_id: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> PackedRows:
    """Concatenates ``[bos] + doc + [eos]`` for every doc and cuts the stream into rows.

    Every token is kept, in order; only the last row is padded. Documents may span rows.
    """
    if seq_len < 2:
        raise UserInputError(f"seq_len must be >= 2, got {seq_len}")
    pieces = [p for p in (_with_specials(doc, bos_id, eos_id) for doc in docs) if p.size]
    if not pieces:
        return _empty_rows(seq_len)
    lengths = np.array([p.size for p in pieces], dtype=np.int64)
    tokens = np.concatenate(pieces)
    doc_ids = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    targets = np.ones(tokens.size, np.int32)
    if bos_id is not None:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        targets[starts] = 0
    return _rows_from_flat(tokens, doc_ids, targets, seq_len, pad_id)


def truncate_documents(
    docs: TokenDocs,
    seq_len: int,
    *,
    pad_id: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> PackedRows:
    """One row per document: ``([bos] + doc + [eos])[:seq_len]``, right-padded.

    Tokens past ``seq_len`` are cut (that is what truncation means); the number of
    truncated documents is logged.
    """
    if seq_len < 2:
        raise UserInputError(f"seq_len must be >= 2, got {seq_len}")
    if not len(docs):
        return _empty_rows(seq_len)
    tokens = np.full((len(docs), seq_len), pad_id, np.int32)
    segment_ids = np.zeros((len(docs), seq_len), np.int32)
    truncated = 0
    for row, doc in enumerate(docs):
        piece = _with_specials(doc, bos_id, eos_id)
        truncated += piece.size > seq_len
        piece = piece[:seq_len]
        tokens[row, : piece.size] = piece
        segment_ids[row, : piece.size] = 1
    loss_mask = segment_ids.copy()
    if bos_id is not None:
        loss_mask[:, 0] = 0
    if truncated:
        log.info("Truncated %d of %d documents to %d tokens", truncated, len(docs), seq_len)
    return PackedRows(tokens, loss_mask, segment_ids, segment_positions(segment_ids))


def left_pad(
    prompts: TokenDocs,
    *,
    pad_id: int,
    length: int | None = None,
    truncate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token prompts to a common length for generation.

    Args:
      prompts: token id sequences (each non-empty).
      pad_id: padding id (masked out by ``attention_mask``).
      length: output length; default the longest prompt. A fixed length keeps jitted
        samplers from recompiling.
      truncate: if a prompt is longer than ``length``, keep its last ``length`` tokens;
        when False (default) such a prompt raises UserInputError instead.

    Returns:
      ``(input_ids, attention_mask)``, both int32 [len(prompts), length]; the real tokens
      are right-aligned so generation continues every row at the same position.
    """
    arrays = [np.asarray(p, dtype=np.int32).reshape(-1) for p in prompts]
    for index, array in enumerate(arrays):
        if array.size == 0:
            raise UserInputError(f"prompt {index} is empty (add a BOS token or drop it)")
    if length is None:
        length = max((a.size for a in arrays), default=1)
    input_ids = np.full((len(arrays), length), pad_id, np.int32)
    attention_mask = np.zeros((len(arrays), length), np.int32)
    for row, array in enumerate(arrays):
        if array.size > length:
            if not truncate:
                raise UserInputError(
                    f"prompt {row} has {array.size} tokens, more than length={length} "
                    "(pass truncate=True to keep its last tokens)"
                )
            array = array[-length:]
        input_ids[row, length - array.size:] = array
        attention_mask[row, length - array.size:] = 1
    return input_ids, attention_mask
