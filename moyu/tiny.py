"""Small randomly initialised models of every supported architecture, built locally.

Used by the tests (no download) and handy for trying a method on an architecture
without its weights. Sizes are tiny but keep each family's structure: GQA where the
family has it, gated or plain MLPs, fused projections, biases.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import ARCHITECTURES

_COMMON = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, head_dim=16)
_OVERRIDES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=192, n_positions=256, vocab_size=256),
    "opt": dict(hidden_size=64, ffn_dim=192, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, vocab_size=256, max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=256, max_position_embeddings=256),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(sliding_window=32, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=32, query_pre_attn_scalar=16),
}
TINY_TYPES = tuple(t for t in ARCHITECTURES if t != "gemma3")  # gemma3 is multimodal; gemma3_text is the LM


def tiny_model(model_type: str, seed: int = 0, layers: int = 2) -> nn.Module:
    """A randomly initialised causal LM of ``model_type`` small enough for unit tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    values = {**_COMMON, **_OVERRIDES.get(model_type, {})}
    for key, val in values.items():
        if key in ("bos_token_id", "eos_token_id", "pad_token_id") or hasattr(cfg, key):
            setattr(cfg, key, val)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, layers)
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = [cfg.layer_types[i % len(cfg.layer_types)] for i in range(layers)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.moyu_name = f"tiny-{model_type}"
    return model
