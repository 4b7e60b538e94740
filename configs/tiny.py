"""The embedded default: a tiny Llama-architecture model on CPU, minutes, no network.

    python -m regft_jax.main --config=configs/tiny.py
"""

import ml_collections

from regft_jax.config_utils import arch_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "smoke"
    c.seed = 0
    c.workdir = "runs/tiny"
    c.distributed = False  # jax.distributed.initialize() (multi-host launches set this)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.model = ml_collections.ConfigDict()
    c.model.source = "random"  # random | hf | checkpoint
    c.model.path = ""
    c.model.arch = arch_config(family="llama", vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4,
                               num_kv_heads=4, head_dim=32, mlp_dim=512, max_seq_len=512)
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.scan_layers = True
    c.model.remat = "none"

    c.optim = ml_collections.ConfigDict(
        {"learning_rate": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 5})
    c.train = ml_collections.ConfigDict({"steps": 30, "batch_size": 8, "seq_len": 64})
    return c
