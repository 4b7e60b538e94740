"""Evaluate a model on the held-out sets of a corpus and format the comparison table."""

from __future__ import annotations

import math
from typing import Optional
from collections.abc import Mapping, Sequence

from regft_jax.data.pipeline import Corpus
from regft_jax.data.records import Example
from regft_jax.errors import UserInputError
from regft_jax.eval.perplexity import perplexity
from regft_jax.eval.protocols import run_protocols
from regft_jax.eval.toxicity import toxicity_eval


class EvalError(UserInputError):
    """An evaluation that cannot be trusted (e.g. an eval oracle failed on too many texts)."""


def evaluate_model(name: str, cfg, params, corpus: Corpus, oracles, ev, *, seq_len: int, mesh=None, seed: int = 0,
                   guidance=None, guidance_params=None, document_attention: bool = True, protocols: Sequence[str] = (),
                   protocol_prompts: Sequence[Example] = (), stop: Optional[str] = None) -> tuple[dict, list[dict]]:
    """Perplexity per domain, and every eval oracle's toxicity of the same continuations.

    `oracles`: a mapping name -> Oracle (or one Oracle, named by its `.name`). Continuations of
    each domain's held-out prompts are generated once and scored by every oracle. Returns
    ({"ppl_<domain>": held-out perplexity, "toxicity_<oracle>_<domain>": fraction of continuations
    the oracle flags (score > ev.threshold) among those it scored, "scored_<oracle>_<domain>": how
    many it scored}, records). Perplexity scores each packed document on its own unless
    `document_attention` is False (`config.data.document_attention`). With a `guidance` (nado_decoding's
    `AuxGuidance`), continuations are drawn from q = p · R and perplexity is q's too. An oracle that
    scored fewer than `ev.min_scored_fraction` of a domain's continuations raises EvalError (no silent
    fallback to the texts that did score). `protocols` (names in `eval.protocols.PROTOCOLS`) run on
    `protocol_prompts` and add their metrics (`run_protocols`). stop: continuations are cut before it
    (`toxicity_eval`); then "stopped_<domain>" is the fraction cut.
    """
    named = dict(oracles) if isinstance(oracles, Mapping) else {oracles.name: oracles}
    min_fraction = float(ev.get("min_scored_fraction", 0.9))
    metrics, records = {}, []
    for domain, rows in corpus.packed("valid", seq_len).items():
        metrics[f"ppl_{domain}"] = perplexity(cfg, params, rows, batch_size=ev.batch_size, mesh=mesh,
                                               document_attention=document_attention, guidance=guidance,
                                               guidance_params=guidance_params)
    for domain, prompts in corpus.prompts.items():
        out = toxicity_eval(cfg, params, corpus.tokenizer, prompts, named, max_new_tokens=ev.max_new_tokens,
                            temperature=ev.temperature, top_p=ev.top_p, seed=seed, threshold=ev.threshold,
                            batch_size=ev.batch_size, mesh=mesh, guidance=guidance,
                            guidance_params=guidance_params, model_name=name, stop=stop)
        if stop:
            metrics[f"stopped_{domain}"] = out["stopped"]
        for oracle_name, o in out["oracles"].items():
            if o["scored"] < min_fraction * len(prompts):
                raise EvalError(f"eval oracle {oracle_name!r} scored only {o['scored']}/{len(prompts)} continuations "
                                f"of model {name!r} on the {domain!r} prompts, below "
                                f"config.eval.min_scored_fraction={min_fraction:g}")
            metrics[f"toxicity_{oracle_name}_{domain}"] = o["toxicity"]
            metrics[f"scored_{oracle_name}_{domain}"] = o["scored"]
        records += out["records"]
    if protocols:
        more, more_records = run_protocols(protocols, cfg, params, corpus.tokenizer, protocol_prompts, named,
                                           threshold=ev.threshold, batch_size=ev.batch_size, seed=seed, mesh=mesh,
                                           guidance=guidance, guidance_params=guidance_params, model_name=name,
                                           stop=stop)
        metrics.update(more)
        records += more_records
    return metrics, records


def results_table(results: dict[str, dict], keys=None, labels: Mapping[str, str] | None = None) -> str:
    """Markdown table: one row per model, one column per metric (`labels`: column headers by key)."""
    keys = keys or sorted({k for m in results.values() for k in m if isinstance(m[k], (int, float))})
    labels = labels or {}
    lines = ["| model | " + " | ".join(labels.get(k, k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(k, m.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key.startswith("toxicity"):
        return f"{100 * value:.1f}%"
    if key.startswith("auc"):
        return f"{value:.3f}"
    return str(value) if isinstance(value, int) else f"{value:.2f}"
