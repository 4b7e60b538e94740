"""Evaluate a model on the held-out sets of a corpus and format the comparison table."""

from __future__ import annotations

import math

from regft_jax.data.pipeline import Corpus
from regft_jax.eval.perplexity import perplexity
from regft_jax.eval.toxicity import toxicity_eval


def evaluate_model(name: str, cfg, params, corpus: Corpus, oracle, ev, *, seq_len: int, mesh=None, seed: int = 0,
                   guidance=None, guidance_params=None) -> tuple[dict, list[dict]]:
    """{"ppl_<domain>": held-out perplexity, "toxicity_<domain>": fraction of continuations of that
    domain's held-out prompts flagged by the oracle, "toxicity": the toxic domain's rate}, records."""
    metrics, records = {}, []
    for domain, rows in corpus.packed("valid", seq_len).items():
        metrics[f"ppl_{domain}"] = perplexity(cfg, params, rows, batch_size=ev.batch_size, mesh=mesh)
    for domain, prompts in corpus.prompts.items():
        out = toxicity_eval(cfg, params, corpus.tokenizer, prompts, oracle, max_new_tokens=ev.max_new_tokens,
                            temperature=ev.temperature, top_p=ev.top_p, seed=seed, threshold=ev.threshold,
                            batch_size=ev.batch_size, mesh=mesh, guidance=guidance,
                            guidance_params=guidance_params, model_name=name)
        metrics[f"toxicity_{domain}"] = out["toxicity"]
        records += out["records"]
    return metrics, records


def results_table(results: dict[str, dict], keys=None) -> str:
    """Markdown table: one row per model, one column per metric."""
    keys = keys or sorted({k for m in results.values() for k in m if isinstance(m[k], (int, float))})
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(k, m.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if key.startswith("toxicity") else f"{value:.2f}"
