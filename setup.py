"""regft_jax: attribute-controlled (regularized) fine-tuning of LLMs in JAX/Flax.

Pinned stack: these versions install cleanly together on Python 3.11 (CPU) and are what the
tests run against. torch is only needed by the tests (HF PyTorch reference logits).
"""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "transformers==5.24.0",
    "datasets==5.2.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "absl-py",
    "tqdm",
]

DEMO = [
    # The offline default toxicity oracle (a linear SVM; pins its scikit-learn).
    "alt-profanity-check==1.9.1",
    "scikit-learn==1.9.1",
]

EVAL = [
    # lm-evaluation-harness: utility benchmarks through the "regft_jax" backend (regft_jax/eval/harness.py);
    # matplotlib: the report's plots (python -m regft_jax.report --out).
    "lm-eval==0.4.13",
    "matplotlib==3.10.8",
]

EXTRAS = {
    # The embedded offline default (tiny model on a local corpus with an offline oracle).
    "demo": DEMO,
    "eval": EVAL,
    # torch provides the HF PyTorch reference the tests compare against; the tests also run
    # the offline oracle. tensorboard's reader checks the dependency-free event writer; lm-eval's
    # own `hf` backend (with accelerate) is the reference of the regft_jax lm-eval backend.
    "test": ["torch==2.13.0", "pytest", "tensorboard==2.21.0", "accelerate==1.16.0"] + DEMO + EVAL,
}

setup(
    name="regft_jax",
    version="0.1.0",
    description="Regularized, attribute-controlled fine-tuning of Llama/Falcon models in JAX/Flax",
    packages=find_packages(include=["regft_jax", "regft_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
