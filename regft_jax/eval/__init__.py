"""Evaluations: held-out perplexity, toxicity of generated continuations per eval oracle, judge quality."""

from regft_jax.eval.judges import eval_oracles, judge_label, judge_quality, judges_report, training_oracle
from regft_jax.eval.perplexity import perplexity
from regft_jax.eval.report import EvalError, evaluate_model, results_table
from regft_jax.eval.toxicity import toxicity_eval

__all__ = ["EvalError", "eval_oracles", "evaluate_model", "judge_label", "judge_quality", "judges_report",
           "perplexity", "results_table", "toxicity_eval", "training_oracle"]
