"""The paper's setting with a Falcon model: ToxiGen + Wikitext-103, ToxiGen RoBERTa oracle (configs/presets.py).

    python -m regft_jax.main --config=configs/falcon.py:falcon-7b,8xh100 --config.model.path=/models/falcon-7b \
        --config.data.tokenizer=/models/falcon-7b --config.method.oracle_args.model_dir=/models/toxigen_roberta

Argument `MODEL[,HARDWARE]`: MODEL one of falcon-7b (default), falcon-40b; HARDWARE one of v4-32, v5e-64,
8xh100, auto (default). falcon-40b's training state fits only v5e-64 (and auto, unchecked).
"""

import ml_collections

from configs import presets


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return presets.paper_config("falcon", arg)
