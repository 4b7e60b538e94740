"""Falcon-7B from a local HF checkpoint, FSDP over all devices, bf16.

    python -m regft_jax.main --config=configs/falcon.py --config.model.path=/models/falcon-7b \
        --config.data.tokenizer=/models/falcon-7b
"""

import ml_collections

from configs import llama


def get_config() -> ml_collections.ConfigDict:
    c = llama.get_config()
    c.workdir = "runs/falcon"
    c.model.path = "/models/falcon-7b"
    c.data.tokenizer = c.model.path
    return c
