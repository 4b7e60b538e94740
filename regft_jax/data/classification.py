"""Prompted classification of the toxic domain's comments (the `classify` stage; the paper's Jigsaw experiment).

One example is the comment, a template and a label word, tokenized piece by piece and concatenated:

    [bos] comment-ids  template-ids  label-ids  [eos]        e.g. "you idiot" + "\\nInsult:" + " yes"

    fmt = PromptFormat(tokenizer, template="\\nInsult:", labels=(" no", " yes"))
    rows = fmt.rows(corpus.train["toxic"], seq_len + 1, loss_on="all")   # PackedRows, one example per row
    ids = fmt.prompt_ids(texts, fmt.prompt_room(seq_len + 1))            # what the label word is scored after

A comment too long for its row keeps its LAST tokens (the template, the label and EOS always fit), the same
way in training rows and in scored prompts (`prompt_room`). `loss_on="all"` trains every token (the paper's "LLM loss":
the model also learns the comments' text); `"label"` only the label word (a classification objective
through the LM head).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from regft_jax.data.packing import PackedRows, segment_positions
from regft_jax.data.records import Example
from regft_jax.data.tokenizer import Tokenizer
from regft_jax.errors import UserInputError

LOSS_ON = ("all", "label")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    tokenizer: Tokenizer
    template: str
    labels: tuple[str, str]  # (negative, positive) label words

    def __post_init__(self):
        if not self.template:
            raise UserInputError("config.classify.template is empty: give the text between a comment and its "
                                 "label word, e.g. '\\nInsult:'")
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            raise UserInputError(f"config.classify.labels={tuple(self.labels)!r}: expected two different label "
                                 "words (negative, positive), e.g. (' no', ' yes')")
        for word, ids in zip(self.labels, self.label_ids):
            if not ids:
                raise UserInputError(f"config.classify.labels: {word!r} encodes to no token")

    @functools.cached_property  # (tokenized once: a frozen dataclass's __dict__ still takes it)
    def template_ids(self) -> list[int]:
        return self.tokenizer.encode_batch([self.template])[0]

    @functools.cached_property
    def label_ids(self) -> tuple[list[int], list[int]]:
        neg, pos = self.tokenizer.encode_batch(list(self.labels))
        return neg, pos

    def _bos(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def prompt_room(self, row_len: int) -> int:
        """The most tokens of a prompt in a row of `row_len` tokens: what the longest label word and EOS leave."""
        eos = 0 if self.tokenizer.eos_id is None else 1
        return row_len - max(len(ids) for ids in self.label_ids) - eos

    def prompt_ids(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        """[bos] + each text's last tokens + the template: at most `max_len` tokens (a text that encodes to
        tokens keeps at least one)."""
        head, tail = self._bos(), self.template_ids
        room = max_len - len(head) - len(tail)
        if room < 1:
            raise UserInputError(f"config.classify.template {self.template!r} ({len(tail)} tokens) leaves no room "
                                 f"for a comment in {max_len} tokens: shorten it or raise config.data.seq_len")
        return [head + ids[-room:] + tail for ids in self.tokenizer.encode_batch(list(texts))]

    def rows(self, examples: Sequence[Example], row_len: int, loss_on: str = "all") -> PackedRows:
        """One right-padded row of `row_len` tokens per labeled example ([bos] comment template label [eos];
        label = positive when Example.label >= 0.5). loss_mask: every real token but BOS (`loss_on="all"`) or
        the label word's tokens only (`"label"`). Unlabeled examples are an error."""
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}: expected one of {LOSS_ON}")
        unlabeled = [i for i, e in enumerate(examples) if e.label is None]
        if unlabeled:
            raise UserInputError(f"classification: {len(unlabeled)} of {len(examples)} examples have no label "
                                 f"(the first: {examples[unlabeled[0]].text[:60]!r})")
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        neg, pos = self.label_ids
        prompts = self.prompt_ids([e.text for e in examples], self.prompt_room(row_len))
        tokens = np.full((len(examples), row_len), self.tokenizer.pad_id or 0, np.int32)
        loss_mask = np.zeros_like(tokens)
        segment_ids = np.zeros_like(tokens)
        for r, (e, prompt) in enumerate(zip(examples, prompts)):
            label = pos if e.label >= 0.5 else neg
            ids = prompt + label + eos
            tokens[r, :len(ids)] = ids
            segment_ids[r, :len(ids)] = 1
            if loss_on == "all":
                loss_mask[r, len(self._bos()):len(ids)] = 1
            else:
                loss_mask[r, len(prompt):len(prompt) + len(label)] = 1
        return PackedRows(tokens, loss_mask, segment_ids, segment_positions(segment_ids))
