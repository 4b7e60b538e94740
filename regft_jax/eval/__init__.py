"""Evaluations: held-out perplexity and oracle toxicity of generated continuations."""

from regft_jax.eval.perplexity import perplexity
from regft_jax.eval.report import evaluate_model, results_table
from regft_jax.eval.toxicity import toxicity_eval

__all__ = ["evaluate_model", "perplexity", "results_table", "toxicity_eval"]
