"""Deterministic splits, prompt sets disjoint from training, and per-batch mixture quotas.

Splits are decided by a keyed hash of each example's group key (its text by default), so
they depend only on (seed, content): not on input order, not on the number of processes,
and exact duplicates always land in the same split (no train/eval leakage through copies).
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

from regft_jax.data.records import Example
from regft_jax.errors import UserInputError

log = logging.getLogger(__name__)

GroupKey = Callable[[Example], str]
Predicate = Callable[[Example], bool]


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
    order = sorted(groups, key=lambda k: _hash_key(seed, k))
    part_of_group: dict[str, str] = {}
    for name, size in sizes.items():
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
        prompt = example.prompt
        if prompt is None:
            words = example.text.split()
            prompt = " ".join(words if num_words is None else words[:num_words])
        prompts.append(
            Example(example.text, example.domain, example.label, prompt, dict(example.meta))
        )
    return prompts


def check_disjoint(train: Iterable[Example], **held_out: Iterable[Example]) -> None:
    """Raises UserInputError if any held-out set shares a source text with ``train`` or another set."""
    seen: dict[str, str] = {e.text: "train" for e in train}
    for name, examples in held_out.items():
        own = set()
        for example in examples:
            other = seen.get(example.text)
            if other is not None and other != name:
                raise UserInputError(
                    f"{name!r} and {other!r} share the example {example.text[:80]!r}"
                )
            own.add(example.text)
        seen.update({text: name for text in own})


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
