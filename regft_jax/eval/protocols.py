"""The paper's toxicity protocols (DESIGN.md section 4), on any prompt set, per eval oracle.

    toxigen  continue each prompt once, temperature 0.1, top-p 0.9, 32 new tokens;
             report the % of continuations each oracle flags
    rtp      RealToxicityPrompts: k = 25 continuations per prompt, T = 1, top-p 0.9, 20 new tokens;
             report the expected maximum toxicity and the toxicity probability (`toxicity.rtp_metrics`)

Prompts (`config.eval.protocol_prompts`): "" = the corpus's held-out prompts of the toxic domain; a
`toxiGen.json`-style file (a JSON list of {"text": ...}; ../shared/data/toxigen/), a JSON Lines file
({"text": ...} or RealToxicityPrompts' {"prompt": {"text": ...}}) or a directory holding toxiGen.json;
or an HF dataset `NAME[:CONFIG][@SPLIT]` (split "train" by default), e.g. "allenai/real-toxicity-prompts".
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from regft_jax.data.records import Example
from regft_jax.errors import UserInputError
from regft_jax.eval.toxicity import toxicity_eval


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    temperature: float
    top_p: float
    max_new_tokens: int
    samples: int  # continuations per prompt


PROTOCOLS = {p.name: p for p in (Protocol("toxigen", 0.1, 0.9, 32, 1), Protocol("rtp", 1.0, 0.9, 20, 25))}


# (metric key prefix, column label) of each protocol's table columns, per eval oracle: "<prefix>_<oracle>_<protocol>"
COLUMNS = {"toxigen": (("toxicity", "ToxiGen % flagged"),),
           "rtp": (("toxicity", "RTP toxicity prob."), ("emt", "RTP exp. max toxicity"))}


def protocol_columns(protocols, oracles) -> list[tuple[str, str]]:
    """[(metric key, column label "<label> (<oracle>)")] of the protocols' results, in table order."""
    return [(f"{prefix}_{o}_{p}", f"{label} ({o})") for p in protocols for o in oracles for prefix, label in COLUMNS[p]]


def protocol_names(config) -> tuple[str, ...]:
    """`config.eval.protocols` ("" = none, "toxigen,rtp") as a tuple of known names."""
    value = config.eval.get("protocols", "") or ""
    names = tuple(n.strip() for n in value.split(",") if n.strip()) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise UserInputError(f"config.eval.protocols={value!r}: unknown protocol(s) {unknown}; "
                             f"known: {sorted(PROTOCOLS)}")
    return names


def _prompt_text(row: Any, where: str) -> str:
    if isinstance(row, dict):
        text = row.get("text", row.get("prompt"))
        if isinstance(text, dict):
            text = text.get("text")
        if isinstance(text, str):
            return text
    raise UserInputError(f"{where}: expected an object with a string 'text' (or 'prompt', or 'prompt': "
                         f"{{'text': ...}}), got {str(row)[:120]!r}")


def load_prompts(source: str, limit: int = 0, domain: str = "toxic") -> list[Example]:
    """Prompts from a toxiGen.json-style file, a JSON Lines file, a directory holding toxiGen.json, or
    an HF dataset `NAME[:CONFIG][@SPLIT]`; the first `limit` (0 = all), empty texts skipped."""
    if os.path.isdir(source):
        path = os.path.join(source, "toxiGen.json")
        if not os.path.exists(path):
            raise UserInputError(f"prompt directory {source!r} has no toxiGen.json")
        source = path
    if os.path.exists(source):
        with open(source, encoding="utf-8") as f:
            raw = f.read()
        try:
            rows = None if source.endswith(".jsonl") else json.loads(raw)
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            where = [f"{source} item {i}" for i in range(len(rows))]
        else:  # JSON Lines (a one-line file parses as one object)
            lines = [(i + 1, line) for i, line in enumerate(raw.splitlines()) if line.strip()]
            try:
                rows = [json.loads(line) for _, line in lines]
            except json.JSONDecodeError as e:
                raise UserInputError(f"prompt file {source!r} is neither a JSON list nor JSON Lines: {e}") from None
            where = [f"{source} line {n}" for n, _ in lines]
    else:
        import datasets

        name, _, split = source.partition("@")
        name, _, subset = name.partition(":")
        try:
            data = datasets.load_dataset(name, subset or None, split=split or "train")
        except Exception as e:  # noqa: BLE001 - name the source in the error
            raise UserInputError(f"prompt source {source!r}: no such file or directory, and loading it as an HF "
                                 f"dataset failed: "
                                 f"{type(e).__name__}: {e}") from None
        rows = data.select(range(min(limit, len(data)))) if limit else data
        where = [f"{source} row {i}" for i in range(len(rows))]
    prompts = []
    for row, w in zip(rows, where):
        text = _prompt_text(row, w).strip()
        if text:
            prompts.append(Example(text=text, domain=domain, prompt=text))
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise UserInputError(f"prompt source {source!r} holds no non-empty prompt")
    return prompts


def run_protocols(names: Sequence[str], cfg, params, tokenizer, prompts: Sequence[Example], oracles, *,
                  threshold: float, batch_size: int, seed: int = 0, mesh=None, guidance=None,
                  guidance_params: Any = None, model_name: Optional[str] = None,
                  stop: Optional[str] = None) -> tuple[dict, list[dict]]:
    """Every named protocol on `prompts`, every oracle: ({"toxicity_<oracle>_toxigen": % flagged,
    "toxicity_<oracle>_rtp": toxicity probability, "emt_<oracle>_rtp": expected maximum toxicity,
    "scored_<oracle>_<protocol>": scored continuations}, records tagged with their protocol); stop: see
    `toxicity_eval`."""
    metrics, records = {}, []
    for name in names:
        p = PROTOCOLS[name]
        out = toxicity_eval(cfg, params, tokenizer, prompts, oracles, max_new_tokens=p.max_new_tokens,
                            temperature=p.temperature, top_p=p.top_p, seed=seed, threshold=threshold,
                            batch_size=batch_size, mesh=mesh, guidance=guidance, guidance_params=guidance_params,
                            model_name=model_name, samples=p.samples, stop=stop)
        for oracle, o in out["oracles"].items():
            if p.samples == 1:
                metrics[f"toxicity_{oracle}_{name}"] = o["toxicity"]
            else:
                metrics[f"toxicity_{oracle}_{name}"] = o["toxicity_probability"]
                metrics[f"emt_{oracle}_{name}"] = o["expected_max_toxicity"]
            metrics[f"scored_{oracle}_{name}"] = o["scored"]
        records += [{**r, "protocol": name} for r in out["records"]]
    return metrics, records
