"""Loaders for the real datasets, by Hugging Face name (``datasets.load_dataset``) or local copy.

Each dataset has a pure row mapper (``*_example``) that knows its column names, and a
``load_*`` function that fetches rows and applies it. The mappers are what the tests pin
down; the ``load_*`` functions pass names/configs/splits straight to ``datasets``, so a
local directory or any ``load_dataset`` keyword (``data_files=``, ``revision=``...) works.

Column layouts (as published on the hub):
  * ToxiGen ``skg/toxigen-data`` (config ``annotated``): ``text``, ``target_group``,
    ``toxicity_human`` (1..5, mean of annotators), ``toxicity_ai``, ... The local
    ``toxiGen.json`` export instead has ``text``, ``toxicity_score``, ``label``
    (``hate``/``neutral``; ``hate`` iff score > 3), ``target_groups``. Both are accepted.
  * Wikitext ``wikitext`` / ``wikitext-103-raw-v1``: one ``text`` column holding lines;
    `` = Title = `` lines start articles, `` = = Section = = `` lines are headings.
  * Civil comments ``google/civil_comments``: ``text``, ``toxicity`` (0..1), ``insult``, ...
  * RealToxicityPrompts ``allenai/real-toxicity-prompts``: ``prompt`` and ``continuation``
    (dicts with ``text`` and Perspective scores such as ``toxicity``), ``challenging``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from regft_jax.data.files import EXCEL_CR, LABEL_NAMES, iter_csv_rows, iter_json_rows, iter_jsonl_rows, parse_label
from regft_jax.data.records import DataFormatError, Example
from regft_jax.errors import UserInputError

log = logging.getLogger(__name__)

TOXIGEN_NAME = "skg/toxigen-data"
TOXIGEN_CONFIG = "annotated"
WIKITEXT_NAME = "wikitext"
WIKITEXT_CONFIG = "wikitext-103-raw-v1"
CIVIL_COMMENTS_NAME = "google/civil_comments"
RTP_NAME = "allenai/real-toxicity-prompts"

# ToxiGen's human score is a 1..5 mean; the released export labels "hate" iff score > 3.
TOXIGEN_HATE_THRESHOLD = 3.0
RowMapper = Callable[[Mapping[str, Any], str], Example]


class DatasetLoadError(UserInputError):
    """``datasets.load_dataset`` failed; the message says what was asked for and how to go offline."""


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DataFormatError(f"{where}: missing key {key!r} (row has keys {sorted(row)})")
    return row[key]


def _text_field(row: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(row, key, where)
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- row mappers


def toxigen_example(
    row: Mapping[str, Any],
    where: str,
    domain: str = "toxic",
    threshold: float = TOXIGEN_HATE_THRESHOLD,
) -> Example:
    """Maps a ToxiGen row (hub ``annotated`` layout or the ``toxiGen.json`` export).

    ``label`` is 1.0 for hateful statements: the export's ``label == "hate"``, or for hub
    rows ``toxicity_human > threshold``. ``meta`` keeps the 1..5 score and target groups.
    """
    text = _text_field(row, "text", where).replace(EXCEL_CR, "\n").strip()
    if "label" in row and row["label"] is not None:
        label = parse_label(row["label"], LABEL_NAMES, where)
        score = row.get("toxicity_score", row.get("toxicity_human"))
    elif "toxicity_human" in row:
        score = row["toxicity_human"]
        if not isinstance(score, (int, float)):
            raise DataFormatError(f"{where}: 'toxicity_human' must be a number, got {score!r}")
        label = float(score > threshold)
    else:
        raise DataFormatError(
            f"{where}: ToxiGen row needs 'label' (hate/neutral) or 'toxicity_human' "
            f"(row has keys {sorted(row)})"
        )
    groups = row.get("target_groups")
    if groups is None and row.get("target_group") is not None:
        groups = [row["target_group"]]
    meta = {"source": where, "toxicity_score": score, "target_groups": list(groups or [])}
    if "id" in row:
        meta["id"] = row["id"]
    return Example(text=text, domain=domain, label=label, meta=meta)


def civil_comments_example(
    row: Mapping[str, Any],
    where: str,
    domain: str = "toxic",
    binarize_at: float | None = 0.5,
) -> Example:
    """Maps a civil-comments (Jigsaw) row; ``label`` = ``toxicity >= binarize_at`` (or the raw score)."""
    text = _text_field(row, "text", where)
    toxicity = _field(row, "toxicity", where)
    if not isinstance(toxicity, (int, float)):
        raise DataFormatError(f"{where}: 'toxicity' must be a number, got {toxicity!r}")
    label = float(toxicity) if binarize_at is None else float(toxicity >= binarize_at)
    meta = {"source": where, "toxicity": float(toxicity)}
    for key in ("severe_toxicity", "obscene", "threat", "insult", "identity_attack", "sexual_explicit"):
        if key in row:
            meta[key] = row[key]
    return Example(text=text, domain=domain, label=label, meta=meta)


def real_toxicity_prompts_example(
    row: Mapping[str, Any], where: str, domain: str = "toxic"
) -> Example:
    """Maps a RealToxicityPrompts row: ``prompt`` = prompt text, ``text`` = prompt + continuation.

    ``label`` is the prompt's Perspective toxicity (None where unscored).
    """
    prompt = _field(row, "prompt", where)
    continuation = _field(row, "continuation", where)
    for key, part in (("prompt", prompt), ("continuation", continuation)):
        if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
            raise DataFormatError(f"{where}: {key!r} must be a dict with a 'text' string")
    meta = {
        "source": where,
        "challenging": bool(row.get("challenging", False)),
        "continuation_toxicity": continuation.get("toxicity"),
    }
    score = prompt.get("toxicity")
    return Example(
        text=prompt["text"] + continuation["text"],
        domain=domain,
        label=None if score is None else float(score),
        prompt=prompt["text"],
        meta=meta,
    )


def _is_wikitext_heading(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 2 and stripped.startswith("=") and stripped.endswith("=")


def _is_wikitext_title(line: str) -> bool:
    stripped = line.strip()
    return _is_wikitext_heading(line) and not stripped.startswith("= =")


def wikitext_examples(
    lines: Iterable[tuple[str, Mapping[str, Any]]],
    domain: str = "general",
    unit: str = "paragraph",
) -> list[Example]:
    """Groups wikitext line rows into examples.

    Args:
      lines: ``(where, row)`` pairs whose rows have a ``text`` line.
      unit: ``"paragraph"`` (one example per non-empty, non-heading line) or ``"article"``
        (paragraphs joined by newlines, split at `` = Title = `` lines; title in ``meta``).
    Blank and heading lines are structure, not text, and are not emitted.
    """
    if unit not in ("paragraph", "article"):
        raise UserInputError(f"unit must be 'paragraph' or 'article', got {unit!r}")
    examples: list[Example] = []
    title, paragraphs, first_where = "", [], ""

    def flush() -> None:
        if paragraphs:
            meta = {"source": first_where, "title": title}
            examples.append(Example(text="\n".join(paragraphs), domain=domain, meta=meta))
        paragraphs.clear()

    for where, row in lines:
        line = _text_field(row, "text", where)
        if _is_wikitext_heading(line):
            if _is_wikitext_title(line):
                flush()
                title = line.strip().strip("=").strip()
            continue
        paragraph = line.strip()
        if not paragraph:
            continue
        if unit == "paragraph":
            examples.append(Example(text=paragraph, domain=domain, meta={"source": where, "title": title}))
        else:
            if not paragraphs:
                first_where = where
            paragraphs.append(paragraph)
    flush()
    return examples


# ----------------------------------------------------------------------------- loading


def load_hf_dataset(
    name: str, config: str | None = None, split: str = "train", **load_kwargs: Any
):
    """Calls ``datasets.load_dataset(name, config, split=split, **load_kwargs)``.

    ``name`` may be a hub id or a local directory/builder (``"json"`` with ``data_files=``).
    Raises :class:`DatasetLoadError` naming the request when loading fails.
    """
    import datasets  # Imported lazily: heavy, and only this path needs it.

    log.info("Loading dataset %s (config=%s, split=%s)", name, config, split)
    try:
        return datasets.load_dataset(name, config, split=split, **load_kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise DatasetLoadError(
            f"could not load dataset {name!r} (config={config!r}, split={split!r}): {err}. "
            "Without hub access, pass a local file/directory instead of the hub name, or "
            "pre-populate the datasets cache and set HF_DATASETS_OFFLINE=1."
        ) from err


def iter_dataset_rows(dataset, label: str, limit: int | None = None) -> Iterator[tuple[str, dict]]:
    """Yields ``("label[i]", row_dict)`` from a ``datasets.Dataset`` (column-batched, fast)."""
    total = len(dataset) if limit is None else min(limit, len(dataset))
    index = 0
    for batch in dataset.iter(batch_size=4096):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            if index >= total:
                return
            yield f"{label}[{index}]", {key: batch[key][i] for key in columns}
            index += 1


def _map_rows(rows: Iterable[tuple[str, Mapping[str, Any]]], mapper: RowMapper) -> list[Example]:
    return [mapper(row, where) for where, row in rows]


def _local_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return iter_jsonl_rows(path)
    if suffix == ".json":
        return iter_json_rows(path)
    if suffix == ".csv":
        return iter_csv_rows(path)
    raise DataFormatError(f"{path}: unknown data file type {suffix!r} (use json, jsonl or csv)")


def load_toxigen(
    source: str | os.PathLike = TOXIGEN_NAME,
    *,
    config: str | None = TOXIGEN_CONFIG,
    split: str = "test",
    domain: str = "toxic",
    threshold: float = TOXIGEN_HATE_THRESHOLD,
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Loads ToxiGen statements from a local file (e.g. ``toxiGen.json``) or a hub name.

    A path to an existing file is read directly (json list, jsonl or csv, either layout);
    anything else goes to ``datasets.load_dataset(source, config, split=split)``.
    """
    mapper = lambda row, where: toxigen_example(row, where, domain, threshold)  # noqa: E731
    path = Path(source)
    if path.is_file():
        examples = _map_rows(_local_rows(path), mapper)
        examples = examples if limit is None else examples[:limit]
    else:
        dataset = load_hf_dataset(str(source), config, split, **load_kwargs)
        examples = _map_rows(iter_dataset_rows(dataset, f"{source}[{split}]", limit), mapper)
    log.info("ToxiGen: %d statements (%d hateful) from %s",
             len(examples), sum(e.label == 1.0 for e in examples), source)
    return examples


def load_wikitext(
    name: str = WIKITEXT_NAME,
    *,
    config: str | None = WIKITEXT_CONFIG,
    split: str = "train",
    domain: str = "general",
    unit: str = "paragraph",
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Loads Wikitext (default ``wikitext-103-raw-v1``) as paragraph or article examples.

    ``limit`` caps the number of *lines* read.
    """
    dataset = load_hf_dataset(name, config, split, **load_kwargs)
    return wikitext_examples(iter_dataset_rows(dataset, f"{name}[{split}]", limit), domain, unit)


def load_civil_comments(
    name: str = CIVIL_COMMENTS_NAME,
    *,
    split: str = "train",
    domain: str = "toxic",
    binarize_at: float | None = 0.5,
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Loads civil comments (the Jigsaw unintended-bias data) with toxicity labels."""
    dataset = load_hf_dataset(name, None, split, **load_kwargs)
    mapper = lambda row, where: civil_comments_example(row, where, domain, binarize_at)  # noqa: E731
    return _map_rows(iter_dataset_rows(dataset, f"{name}[{split}]", limit), mapper)


def load_real_toxicity_prompts(
    name: str = RTP_NAME,
    *,
    split: str = "train",
    domain: str = "toxic",
    challenging_only: bool = False,
    limit: int | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Loads RealToxicityPrompts; ``challenging_only`` keeps the "challenging" subset."""
    dataset = load_hf_dataset(name, None, split, **load_kwargs)
    mapper = lambda row, where: real_toxicity_prompts_example(row, where, domain)  # noqa: E731
    examples = _map_rows(iter_dataset_rows(dataset, f"{name}[{split}]", limit), mapper)
    if challenging_only:
        examples = [e for e in examples if e.meta["challenging"]]
    return examples


# ----------------------------------------------------------------------------- config-driven (data.source="hub")

# `data.hub.<domain>.loader` -> (load function, whether it takes a dataset config name).
HUB_LOADERS: dict[str, tuple[Callable[..., list[Example]], bool]] = {
    "toxigen": (load_toxigen, True),
    "wikitext": (load_wikitext, True),
    "civil_comments": (load_civil_comments, False),
    "real_toxicity_prompts": (load_real_toxicity_prompts, False),
}
_SPEC_KEYS = ("loader", "name", "config", "split", "limit")


def load_hub_domains(specs: Mapping[str, Mapping[str, Any]]) -> list[Example]:
    """Every domain of ``specs`` (the ``data.hub`` config section) loaded by name.

    ``specs``: domain -> {"loader": one of ``HUB_LOADERS``, "name": hub id, local dataset
    directory or (ToxiGen) local file, "config": dataset config ("" = none), "split", "limit":
    rows/lines to read (0 = all), any other key: passed to the loader, e.g. ``unit`` (wikitext),
    ``threshold`` (ToxiGen), ``revision`` (``datasets.load_dataset``)}. Errors name the key.
    """
    if not specs:
        raise UserInputError("config.data.hub is empty: give at least one domain, e.g. "
                             "{'toxic': {'loader': 'toxigen', 'name': 'skg/toxigen-data', ...}}")
    examples: list[Example] = []
    for domain, spec in specs.items():
        key = f"config.data.hub.{domain}"
        spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        loader = spec.get("loader")
        if loader not in HUB_LOADERS:
            raise UserInputError(f"{key}.loader={loader!r}: expected one of {sorted(HUB_LOADERS)}")
        if not spec.get("name"):
            raise UserInputError(f"{key}.name is empty: give a hub dataset id or a local path")
        load, takes_config = HUB_LOADERS[loader]
        extra = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
        if takes_config:
            extra["config"] = spec.get("config") or None
        elif spec.get("config"):
            raise UserInputError(f"{key}.config={spec['config']!r}: the {loader} loader takes no dataset config")
        limit = spec.get("limit") or None
        try:
            loaded = load(spec["name"], split=spec.get("split") or "train", domain=domain, limit=limit, **extra)
        except TypeError as err:  # an unknown loader argument
            raise UserInputError(f"{key}: {err}") from err
        except UserInputError as err:
            raise type(err)(f"{key} ({loader}): {err}") from err
        if not loaded:
            raise UserInputError(f"{key}: {spec['name']!r} gave no examples")
        log.info("%s: %d examples from %s", key, len(loaded), spec["name"])
        examples += loaded
    return examples
