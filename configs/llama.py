"""The paper's setting with a Llama model: ToxiGen + Wikitext-103, ToxiGen RoBERTa oracle (configs/presets.py).

    python -m regft_jax.main --config=configs/llama.py:llama2-7b,v4-32 --config.model.path=/models/Llama-2-7b-hf \
        --config.data.tokenizer=/models/Llama-2-7b-hf --config.method.oracle_args.model_dir=/models/toxigen_roberta

Argument `MODEL[,HARDWARE]`: MODEL one of llama1-7b, llama2-7b (default), llama3-8b; HARDWARE one of
v4-32, v5e-64, 8xh100, auto (default: FSDP over all devices).
"""

import ml_collections

from configs import presets


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return presets.paper_config("llama", arg)
