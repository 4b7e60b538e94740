"""Loaders for local jsonl / csv / json files with a configurable field mapping.

Every loader turns rows (dicts) into :class:`Example` records through one
:class:`FieldMap`; errors name the file, the line (or row) and the missing key or bad value.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from regft_jax.data.records import DataFormatError, Example

log = logging.getLogger(__name__)

# String labels `data.files` understands without a label map: ToxiGen's export (`toxiGen.json`).
LABEL_NAMES = {"hate": 1.0, "neutral": 0.0}
# Excel's escaped carriage return, left in some exported texts (e.g. ToxiGen statements).
EXCEL_CR = "_x000D_"


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """How to read an :class:`Example` out of a row dict.

    Attributes:
      text_field: key holding the text (required in every row; Excel's ``_x000D_`` becomes a newline).
      domain: domain tag given to every example.
      label_field: optional key holding the label; numbers/bools are used as floats,
        strings go through ``label_map`` (or are parsed as numbers).
      label_map: maps string labels to floats, e.g. ``{"hate": 1.0, "neutral": 0.0}``.
      prompt_field: optional key holding a prompt text.
      meta_fields: keys copied verbatim into ``Example.meta`` when present.
    """

    text_field: str = "text"
    domain: str = "default"
    label_field: str | None = None
    label_map: Mapping[str, float] | None = None
    prompt_field: str | None = None
    meta_fields: Sequence[str] = ()

    def to_example(self, row: Mapping[str, Any], where: str) -> Example:
        """Converts one row; ``where`` (e.g. ``"file.jsonl:12"``) prefixes error messages."""
        if not isinstance(row, Mapping):
            raise DataFormatError(f"{where}: expected an object/dict row, got {type(row).__name__}")
        text = _required_str(row, self.text_field, where).replace(EXCEL_CR, "\n")
        label = None
        if self.label_field is not None:
            if self.label_field not in row:
                raise _missing_key(row, self.label_field, where)
            label = parse_label(row[self.label_field], self.label_map, where)
        prompt = None
        if self.prompt_field is not None:
            prompt = _required_str(row, self.prompt_field, where)
        meta = {key: row[key] for key in self.meta_fields if key in row}
        meta["source"] = where
        return Example(text=text, domain=self.domain, label=label, prompt=prompt, meta=meta)


def parse_label(value: Any, label_map: Mapping[str, float] | None, where: str) -> float | None:
    """Turns a raw label (bool, number, numeric string or mapped string) into a float."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if label_map is not None and value in label_map:
            return float(label_map[value])
        try:
            number = float(value)
        except ValueError:
            known = sorted(label_map) if label_map else []
            raise DataFormatError(
                f"{where}: label {value!r} is neither a number nor one of {known}"
            ) from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise DataFormatError(f"{where}: unsupported label type {type(value).__name__}: {value!r}")
    if not math.isfinite(number):
        raise DataFormatError(f"{where}: label {value!r} is not a finite number")
    return number


def _missing_key(row: Mapping[str, Any], key: str, where: str) -> DataFormatError:
    return DataFormatError(f"{where}: missing key {key!r} (row has keys {sorted(row)})")


def _required_str(row: Mapping[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise _missing_key(row, key, where)
    value = row[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def iter_jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yields ``("path:line", row)`` for each non-blank line of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg})") from err


def iter_csv_rows(path: str | os.PathLike, delimiter: str = ",") -> Iterator[tuple[str, dict]]:
    """Yields ``("path:line", row)`` for each data row of a csv file with a header line."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataFormatError(f"{path}: empty csv file (no header line)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataFormatError(f"{where}: more fields than the header has")
            if None in row.values():
                raise DataFormatError(f"{where}: fewer fields than the header's {reader.fieldnames}")
            yield where, row


def iter_json_rows(
    path: str | os.PathLike, records_key: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Yields ``("path[i]", row)`` for a json file holding a list of objects.

    With ``records_key``, the file is an object whose ``records_key`` entry is that list.
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err
    if records_key is not None:
        if not isinstance(data, Mapping) or records_key not in data:
            raise DataFormatError(f"{path}: expected a top-level object with key {records_key!r}")
        data = data[records_key]
    if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: expected a top-level list of records, got {type(data).__name__}"
            + ("" if records_key else " (pass records_key= if the list is nested)")
        )
    for index, row in enumerate(data):
        yield f"{path}[{index}]", row


def rows_to_examples(rows: Iterable[tuple[str, Any]], fields: FieldMap) -> list[Example]:
    """Applies ``fields`` to every ``(where, row)`` pair."""
    return [fields.to_example(row, where) for where, row in rows]


def load_jsonl(path: str | os.PathLike, fields: FieldMap = FieldMap()) -> list[Example]:
    """Loads a jsonl file (one JSON object per line)."""
    return rows_to_examples(iter_jsonl_rows(path), fields)


def load_csv(
    path: str | os.PathLike, fields: FieldMap = FieldMap(), delimiter: str = ","
) -> list[Example]:
    """Loads a csv (or, with ``delimiter="\\t"``, tsv) file with a header line."""
    return rows_to_examples(iter_csv_rows(path, delimiter), fields)


def load_json(
    path: str | os.PathLike, fields: FieldMap = FieldMap(), records_key: str | None = None
) -> list[Example]:
    """Loads a json file holding a list of objects (optionally nested under ``records_key``)."""
    return rows_to_examples(iter_json_rows(path, records_key), fields)


def load_local(path: str | os.PathLike, fields: FieldMap = FieldMap(), **kwargs) -> list[Example]:
    """Loads a local file, choosing the reader from its suffix (.jsonl/.ndjson/.csv/.tsv/.json)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        examples = load_jsonl(path, fields, **kwargs)
    elif suffix == ".csv":
        examples = load_csv(path, fields, **kwargs)
    elif suffix == ".tsv":
        examples = load_csv(path, fields, delimiter="\t", **kwargs)
    elif suffix == ".json":
        examples = load_json(path, fields, **kwargs)
    else:
        raise DataFormatError(f"{path}: unknown data file type {suffix!r} (use jsonl, csv, tsv or json)")
    log.info("Loaded %d examples (domain %r) from %s", len(examples), fields.domain, path)
    return examples
