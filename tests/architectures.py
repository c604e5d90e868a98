"""Tiny random checkpoints of every supported architecture, made by transformers' own classes.

Each is what `save_pretrained` writes for a real checkpoint of that model type (its real key names,
sharded safetensors with an index), at a size that runs in seconds on CPU: 2 decoder layers, hidden
128, 4 heads of 32 (2 KV heads), vocabulary 1024 with the tiny Llama's tokenizer (ids 1/2/3 =
bos/eos/pad). Every linear's rows split into whole 64-element NF4 blocks on 2 ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fsdp_qlora.model.registry import ARCHITECTURES
from fsdp_qlora.model.tiny_llama import BOS_ID, EOS_ID, PAD_ID, TINY_LLAMA_CONFIG, train_tokenizer, training_texts

COMMON = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 256,
          "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "initializer_range": 0.05}
# What each model type needs on top (its own defaults otherwise): the features that make it differ.
OVERRIDES: dict[str, dict] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {"sliding_window": 8},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"tie_word_embeddings": True},
    "gemma2": {"query_pre_attn_scalar": 32, "sliding_window": 8, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3_text": {"query_pre_attn_scalar": 32, "sliding_window": 8, "final_logit_softcapping": 30.0,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"tie_word_embeddings": False},
    "starcoder2": {"tie_word_embeddings": False},
    "olmo2": {"tie_word_embeddings": False},
}
assert set(OVERRIDES) == set(ARCHITECTURES), "every registered architecture has a tiny checkpoint"


def make_checkpoint(model_type: str, output_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random-init bf16 checkpoint of `model_type`, sharded as `save_pretrained` shards a real one."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **OVERRIDES.get(model_type, {}), **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases (init leaves them at 1 / 0), so that loading them shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(torch.bfloat16).save_pretrained(output_dir, max_shard_size="300KB")
    train_tokenizer(training_texts(), TINY_LLAMA_CONFIG["vocab_size"], COMMON["max_position_embeddings"]
                    ).save_pretrained(output_dir)
    return output_dir
