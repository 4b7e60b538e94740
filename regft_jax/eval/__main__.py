"""Evaluate one model with `main`'s evaluation (an HF directory or a regft_jax checkpoint):

    python -m regft_jax.eval --config=configs/tiny.py --config.model.source=hf --config.model.path=DIR \
        --config.data.tokenizer=DIR [--config.eval.protocols=toxigen,rtp] [--config.eval.judge=base] [--workdir=...]

held-out perplexity per domain, every eval oracle's toxicity of held-out prompts' continuations, the
protocols of config.eval.protocols and generation quality; results.json and generations.jsonl in the work
directory (the model's row is named "base"). The same as `python -m regft_jax.main --config.stage=base`
(`--config.model.source=checkpoint` for a `checkpoint.save_model` directory). lm-eval benchmarks of a
model: `python -m regft_jax.eval.harness` (regft_jax/eval/harness.py).
"""

import sys

from regft_jax.main import entry

if __name__ == "__main__":
    sys.argv.append("--config.stage=base")  # (after --config=...: absl needs the file before its keys)
    entry()
