"""Llama-2/3 7-8B from a local HF checkpoint, FSDP over all devices, bf16.

    python -m regft_jax.main --config=configs/llama.py --config.model.path=/models/Llama-2-7b-hf \
        --config.data.tokenizer=/models/Llama-2-7b-hf

Runs the `detox` stage (base vs SFT vs ours) on the embedded offline corpus with the model's own
tokenizer; point `data.source=files` / `data.files` at ToxiGen etc. for the paper's setting.
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
    c.data.tokenizer = c.model.path  # the model's own tokenizer (override with the model path)
    c.data.seq_len = 1024
    # The method at 7B scale: auxiliary model = the LLM's first 8 of 32 layers (1/4 of the depth),
    # fine-tuning learning rates, longer samples.
    c.method.update({"aux_layers": 8, "learning_rate": 1e-5, "aux_learning_rate": 1e-4, "batch_size": 32,
                     "sample_tokens": 64, "samples_per_iteration": 512, "sample_batch_size": 16,
                     "iterations": 10, "llm_steps": 100, "checkpoint_every": 100})
    # Oracles (keys as in configs/tiny.py): method.oracle labels the method's samples; every model is judged
    # by each of eval.oracles. A local ToxiGen RoBERTa (the paper's judge) as an extra eval oracle:
    #   --config.eval.oracles=profanity,insult_classifier,hf_classifier \
    #   "--config.eval.oracle_args={'hf_classifier': {'model_dir': '/models/toxigen_roberta'}}"
    # or as the training oracle: --config.method.oracle=hf_classifier "--config.method.oracle_args={'model_dir': ...}".
    c.method.oracle = "profanity"
    c.eval.oracles = "profanity,insult_classifier"
    c.eval.batch_size = 128
    c.optim.learning_rate = 1e-5
    c.train = ml_collections.ConfigDict({"steps": 100, "batch_size": 32, "seq_len": 1024})
    return c
