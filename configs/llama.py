"""Llama-2/3 7-8B from a local HF checkpoint, FSDP over all devices, bf16.

    python -m regft_jax.main --config=configs/llama.py --config.model.path=/models/Llama-2-7b-hf
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.workdir = "runs/llama"
    c.model.source = "hf"
    c.model.path = "/models/Llama-2-7b-hf"  # a local HF directory (config.json + safetensors)
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.optim.learning_rate = 1e-5
    c.train = ml_collections.ConfigDict({"steps": 100, "batch_size": 32, "seq_len": 1024})
    return c
