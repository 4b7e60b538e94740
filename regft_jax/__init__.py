"""regft_jax: attribute-controlled (regularized) fine-tuning of LLMs in JAX/Flax."""

__version__ = "0.1.0"
