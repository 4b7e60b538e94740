"""Tiny random HF PyTorch models (the independent reference) saved with save_pretrained."""

import numpy as np
import torch
import transformers

VOCAB = 97

VARIANTS = {
    # Llama with grouped-query attention, untied head.
    "llama_gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # Llama with tied embeddings, attention/MLP biases and Llama-3 rope scaling.
    "llama_tied_llama3rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})),
    # Falcon-7B style: parallel block, one LayerNorm, multi-query attention.
    "falcon_7b_mqa": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False)),
    # Falcon-40B style: new_decoder_architecture, two LayerNorms, grouped KV, biases.
    "falcon_40b_grouped": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, bias=True, tie_word_embeddings=False)),
    # Falcon-RW style: sequential block, multi-head (interleaved fused qkv).
    "falcon_sequential_mha": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        multi_query=False, parallel_attn=False, bias=True)),
}


def make_hf_model(variant: str, seed: int = 0):
    """A float32 HF model with every parameter (norms and biases too) randomized."""
    torch.manual_seed(seed)
    model = VARIANTS[variant]().float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln_f.weight", "ln_attn.weight", "ln_mlp.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(attention_mask)
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(attention_mask, -1) - 1, 0))
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()
