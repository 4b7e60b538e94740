"""The corpus record type shared by every loader, plus a jsonl round trip for caches."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from regft_jax.errors import UserInputError


class DataFormatError(UserInputError):
    """Raised when an input file or dataset row does not have the expected shape.

    The message always names the file (or dataset) and the offending line/row/key.
    """


@dataclasses.dataclass(frozen=True)
class Example:
    """One corpus example.

    Attributes:
      text: the document text (what the LM is trained on).
      domain: a domain tag such as ``"toxic"`` or ``"general"``; selects the regularizer.
      label: optional attribute label in [0, 1] (e.g. 1.0 = insult / hateful / toxic).
      prompt: optional prompt text for sampling/evaluation (e.g. a RealToxicityPrompts
        prompt); when absent, prompts are derived from ``text``.
      meta: free-form provenance (source file, row id, raw scores); not part of equality.
    """

    text: str
    domain: str
    label: float | None = None
    prompt: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )

    def to_json(self) -> dict[str, Any]:
        """Returns a JSON-serializable dict (inverse of :meth:`from_json`)."""
        return {
            "text": self.text,
            "domain": self.domain,
            "label": self.label,
            "prompt": self.prompt,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Example":
        """Builds an example from a dict written by :meth:`to_json`."""
        return cls(
            text=obj["text"],
            domain=obj["domain"],
            label=obj.get("label"),
            prompt=obj.get("prompt"),
            meta=obj.get("meta") or {},
        )


def write_examples_jsonl(path: str | os.PathLike, examples: Iterable[Example]) -> Path:
    """Writes examples to ``path`` atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_examples_jsonl(path: str | os.PathLike) -> list[Example]:
    """Reads examples written by :func:`write_examples_jsonl`."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                examples.append(Example.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataFormatError(f"{path}:{line_no}: not an Example record ({err})") from err
    return examples
