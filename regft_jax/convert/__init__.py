"""Checkpoint conversion between HF safetensors and regft_jax (orbax) checkpoints.

    python -m regft_jax.convert hf-to-flax --hf_dir DIR --out CKPT
    python -m regft_jax.convert flax-to-hf --ckpt CKPT --out DIR
"""

from regft_jax.convert.cli import flax_to_hf, hf_to_flax, main

__all__ = ["flax_to_hf", "hf_to_flax", "main"]
