"""Deterministic splits, prompt sets disjoint from training, and per-batch mixture quotas.

Splits are decided by a keyed hash of each example's group key (its text by default), so
they depend only on (seed, content): not on input order, not on the number of processes,
and exact duplicates always land in the same split (no train/eval leakage through copies).

Near-duplicates (same text up to case, whitespace and punctuation) are removed before splitting
with `dedup_examples`; `check_disjoint` compares `normalize_text` forms.
Training examples that start with an evaluation prompt (as their own prompt, or as whole leading
words of their text) are removed with `drop_prompt_overlaps`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import unicodedata
from typing import Callable, Iterable, Mapping, Sequence

from regft_jax.data.records import Example
from regft_jax.errors import UserInputError

log = logging.getLogger(__name__)

GroupKey = Callable[[Example], str]
Predicate = Callable[[Example], bool]


class _KeepWordChars(dict):
    """str.translate table: letters, digits and combining marks (categories L*, N*, M*) map to
    themselves, everything else (punctuation, symbols, separators, controls, "_") to a space."""

    def __missing__(self, codepoint: int) -> int | str:
        value = codepoint if unicodedata.category(chr(codepoint))[0] in "LNM" else " "
        self[codepoint] = value
        return value


_WORD_CHARS = _KeepWordChars()


def normalize_text(text: str) -> str:
    """The form texts are compared in for duplicates and leakage: NFKC, casefolded, every
    non-letter/digit/mark character replaced by a space, whitespace collapsed to single spaces.

    ``"Hello,  WORLD!"`` and ``"hello world"`` both give ``"hello world"``; works for any script.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_WORD_CHARS).split())


def prompt_of(text: str, num_words: int | None) -> str:
    """The first ``num_words`` whitespace-separated words of ``text`` (all of them when None):
    how evaluation prompts (`make_prompts`) and the method's sampling prompts are made."""
    words = text.split()
    return " ".join(words if num_words is None else words[:num_words])


DEDUP_COUNTS = ("duplicates", "cross_domain")


def dedup_examples(
    examples: Sequence[Example], *, prefer_domain: str | None = None
) -> tuple[list[Example], dict[str, dict[str, int]]]:
    """Keeps one example per `normalize_text` form, within and across domains.

    Rule (deterministic, independent of the order of the domains): a normalized text that
    occurs in several domains is kept only in ``prefer_domain`` (the toxic domain) when it is one
    of them, else in the alphabetically first of them; within that domain the first copy in
    input order is kept.

    Returns:
      (the kept examples in input order, domain -> {"duplicates": copies dropped that were
      duplicates within the domain, "cross_domain": copies dropped because the text is kept in
      another domain}), with an entry for every domain.
    """
    rank = lambda domain: (domain != prefer_domain, domain)
    keys = [normalize_text(e.text) for e in examples]
    best: dict[str, tuple[tuple[bool, str], int]] = {}
    for index, (example, key) in enumerate(zip(examples, keys)):
        candidate = (rank(example.domain), index)
        if key not in best or candidate < best[key]:
            best[key] = candidate
    dropped = {e.domain: dict.fromkeys(DEDUP_COUNTS, 0) for e in examples}
    kept = []
    for index, (example, key) in enumerate(zip(examples, keys)):
        keeper = best[key][1]
        if keeper == index:
            kept.append(example)
        else:
            same = examples[keeper].domain == example.domain
            dropped[example.domain]["duplicates" if same else "cross_domain"] += 1
    log.info("Dedup: dropped %s", dropped)
    return kept, dropped


def _hash_key(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=16).digest()


def _resolve_size(name: str, size: int | float, num_groups: int) -> int:
    if isinstance(size, bool) or size < 0:
        raise UserInputError(f"split {name!r}: size must be a non-negative int or a fraction, got {size!r}")
    if isinstance(size, float):
        if size > 1.0:
            raise UserInputError(f"split {name!r}: fraction {size} is above 1")
        return int(round(size * num_groups))
    return int(size)


SPLIT_VERSION = 2  # 2: each part draws in its own order (in the run checkpoints' fingerprints; base models:
#                    train/base_model.py CACHE_VERSION)


def partition_examples(
    examples: Sequence[Example],
    sizes: Mapping[str, int | float],
    *,
    seed: int,
    rest: str = "train",
    group_by: GroupKey | None = None,
    eligible: Mapping[str, Predicate] | None = None,
) -> dict[str, list[Example]]:
    """Splits ``examples`` into disjoint named parts, deterministically by ``seed``.

    Args:
      examples: the examples to split.
      sizes: part name -> number of groups (int) or fraction of all groups (float). Parts
        are filled in this order; whatever is left goes to ``rest``.
      seed: split seed.
      rest: name of the part that receives the remaining examples.
      group_by: key of the unit that is never split across parts (default: the text, so
        duplicates stay together; e.g. ``lambda e: e.meta["title"]`` keeps articles whole).
      eligible: optional part name -> predicate; a part only takes groups whose first
        example satisfies it (e.g. insult-labelled examples for insult prompts).

    Returns:
      part name -> examples, each list in input order. Every example is in exactly one part.

    Raises:
      UserInputError: if a part cannot be filled with the requested number of groups.
    """
    if rest in sizes:
        raise UserInputError(f"{rest!r} is the rest part; do not give it a size")
    key_of = group_by or (lambda e: e.text)
    eligible = eligible or {}
    unknown = set(eligible) - set(sizes)
    if unknown:
        raise UserInputError(f"eligible= names unknown parts {sorted(unknown)}")
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(key_of(example), []).append(index)
    part_of_group: dict[str, str] = {}
    for name, size in sizes.items():
        # each part draws its groups in an order of its own: a part after one restricted to eligible groups
        # is still a uniform sample of what is left (in a shared order it would take the groups that the
        # restricted part skipped first, e.g. a validation split with no insult after the insult prompts)
        order = sorted(groups, key=lambda k: _hash_key(seed, f"{name}\0{k}"))
        wanted = _resolve_size(name, size, len(order))
        accept = eligible.get(name, lambda e: True)
        taken = 0
        for key in order:
            if taken == wanted:
                break
            if key not in part_of_group and accept(examples[groups[key][0]]):
                part_of_group[key] = name
                taken += 1
        if taken < wanted:
            raise UserInputError(
                f"split {name!r}: asked for {wanted} groups but only {taken} eligible, "
                f"unassigned ones remain (of {len(order)} groups)"
            )
    parts: dict[str, list[Example]] = {name: [] for name in sizes}
    parts[rest] = []
    for example in examples:
        parts[part_of_group.get(key_of(example), rest)].append(example)
    log.info("Split %d examples: %s", len(examples), {k: len(v) for k, v in parts.items()})
    return parts


def make_prompts(
    examples: Iterable[Example], num_words: int | None = None
) -> list[Example]:
    """Returns copies of ``examples`` whose ``prompt`` is set.

    An existing ``prompt`` is kept; otherwise the prompt is the first ``num_words``
    whitespace-separated words of the text (the whole text when ``num_words`` is None).
    ``text`` stays the source text, so disjointness from training can be checked.
    """
    if num_words is not None and num_words < 1:
        raise UserInputError(f"num_words must be >= 1, got {num_words}")
    prompts = []
    for example in examples:
        prompt = example.prompt if example.prompt is not None else prompt_of(example.text, num_words)
        prompts.append(
            Example(example.text, example.domain, example.label, prompt, dict(example.meta))
        )
    return prompts


def check_disjoint(train: Iterable[Example], **held_out: Iterable[Example]) -> None:
    """Raises UserInputError if any held-out set shares a source text with ``train`` or another set.

    Texts are compared in `normalize_text` form, so copies differing only in case, whitespace
    or punctuation count as shared.
    """
    seen: dict[str, str] = {normalize_text(e.text): "train" for e in train}
    for name, examples in held_out.items():
        own = set()
        for example in examples:
            key = normalize_text(example.text)
            other = seen.get(key)
            if other is not None and other != name:
                raise UserInputError(
                    f"{name!r} and {other!r} share the example {example.text[:80]!r} "
                    f"(compared as normalized text {key[:80]!r})"
                )
            own.add(key)
        seen.update({key: name for key in own})


def _eval_prompt_index(prompts: Iterable[Example], num_words: int | None) -> dict[str, Example]:
    """normalized evaluation prompt -> (the first) prompt Example having it."""
    held: dict[str, Example] = {}
    for p in prompts:
        held.setdefault(normalize_text(p.prompt if p.prompt is not None else prompt_of(p.text, num_words)), p)
    return held


def _leaks(example: Example, held: Mapping[str, Example], lengths: Sequence[int], num_words: int | None) -> bool:
    """Whether ``example`` leaks an evaluation prompt: its own prompt equals one, or its text starts
    with one as whole words (both normalized)."""
    if normalize_text(prompt_of(example.text, num_words)) in held:
        return True
    words = normalize_text(example.text).split()
    return any(" ".join(words[:length]) in held for length in lengths if length <= len(words))


def _prefix_lengths(held: Mapping[str, Example]) -> list[int]:
    return sorted({len(key.split()) for key in held if key})  # an empty prompt is a prefix of nothing


def drop_prompt_overlaps(
    train: Sequence[Example], prompts: Iterable[Example], num_words: int | None
) -> tuple[list[Example], int]:
    """Drops the training examples that would leak an evaluation prompt, both compared in
    `normalize_text` form:

    - their own prompt (`prompt_of(text, num_words)`, what the method samples continuations of)
      equals an evaluation prompt, or
    - their text starts with an evaluation prompt as whole words (the prompt "retard" matches
      "Retard, you are" but not "retardation"), whatever ``num_words`` is.

    Returns (the kept examples in input order, the number dropped).
    """
    held = _eval_prompt_index(prompts, num_words)
    lengths = _prefix_lengths(held)
    kept = [e for e in train if not _leaks(e, held, lengths, num_words)]
    return kept, len(train) - len(kept)


def batch_quotas(proportions: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """Rows of each domain in every batch: ``proportions`` scaled to ``batch_size``.

    Largest-remainder rounding, so the quotas sum to ``batch_size`` and each is within 1
    of its exact share. Raises UserInputError if a domain with a positive proportion would get
    no rows at all (it would silently vanish from training).
    """
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    if not proportions or any(p < 0 or not math.isfinite(p) for p in proportions.values()):
        raise UserInputError(f"proportions must be non-negative and finite, got {dict(proportions)}")
    total = sum(proportions.values())
    if total <= 0:
        raise UserInputError(f"proportions must not all be zero, got {dict(proportions)}")
    exact = {d: batch_size * p / total for d, p in proportions.items()}
    quotas = {d: int(math.floor(x)) for d, x in exact.items()}
    leftover = batch_size - sum(quotas.values())
    by_remainder = sorted(exact, key=lambda d: (-(exact[d] - quotas[d]), list(exact).index(d)))
    for domain in by_remainder[:leftover]:
        quotas[domain] += 1
    starved = [d for d, p in proportions.items() if p > 0 and quotas[d] == 0]
    if starved:
        raise UserInputError(
            f"batch size {batch_size} gives no rows to domains {starved} at proportions "
            f"{dict(proportions)}; raise the batch size or the proportions"
        )
    return quotas
