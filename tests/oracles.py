"""The oracles: transformers + bitsandbytes 4-bit, as a QLoRA user of PEFT loads it, and PEFT itself."""

from __future__ import annotations

from pathlib import Path

import torch

from fsdp_qlora.train.precision import resolve_compute_dtype

QUANT_PARTS = ("packed", "absmax_q", "nested_absmax", "offset")
# What our runs compute in by default here (--compute-dtype auto: bf16 on a CPU with native bf16, fp32
# without), so that the oracles compute like-for-like on any machine the suite runs on.
COMPUTE_DTYPE = resolve_compute_dtype("auto", torch.device("cpu"))


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in row-major order (any dtype, any shape, 0-dim included). Hashes a
    copy: numpy would pin the storage, which FSDP2 must be able to free on reshard."""
    import hashlib

    data = tensor.detach().reshape(-1).view(torch.uint8).clone()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def bnb_4bit_model(model_dir: Path, dtype: torch.dtype = COMPUTE_DTYPE):
    """transformers' own class with bitsandbytes NF4 + double quantization, computing in `dtype`.

    The model loads in `dtype` (bf16 checkpoints upcast exactly for fp32), which bitsandbytes then
    quantizes: the NF4 bytes of an fp32 upcast of bf16 weights are those of the bf16 weights
    (checked by the byte comparisons), so the oracle's base is ours at every compute dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype).eval()


def bnb_nf4_digests(model) -> dict[str, str]:
    """Digests of every decoder layer's 4-bit weights as bitsandbytes holds them, keyed as
    tests/workers/arch_layout_worker.py keys ours."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from fsdp_qlora.model.structure import decoder_layers

    tensors = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state
                key = f"layers.{index}.{name}"
                parts = (module.weight.data, state.absmax, state.state2.absmax, state.offset)
                tensors.update({f"{key}.{part}": tensor_digest(t) for part, t in zip(QUANT_PARTS, parts)})
                tensors[f"{key}.dequantized"] = tensor_digest(bnbf.dequantize_4bit(module.weight.data, state))
    return tensors


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits, computed with autograd on: bitsandbytes' training path (what QLoRA training runs).

    Under no_grad in eval mode, on a CPU with AVX512-BF16, bitsandbytes instead repacks the weights
    for a fused inference kernel that rounds the absmax to bf16: another computation, not the oracle.
    """
    with torch.enable_grad():
        return model(input_ids=input_ids).logits.float().detach()



def bnb_moe_reference(model_dir: Path, dtype: torch.dtype = COMPUTE_DTYPE):
    """The MoE oracle: transformers' own class with its other linears in bitsandbytes 4-bit (as
    `bnb_4bit_model`; routers excluded, as we keep them), computing experts with transformers' eager
    loop, and each expert's 2-D weight replaced by bitsandbytes' ``dequantize_4bit(quantize_4bit(w))``
    (NF4, double quantization): what a bitsandbytes user would get if bitsandbytes quantized experts.
    Returns (model, digests of every expert's NF4 bytes keyed as arch_layout_worker keys ours)."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from fsdp_qlora.model.experts import expert_params
    from fsdp_qlora.model.registry import ARCHITECTURES
    from fsdp_qlora.model.structure import decoder_layers

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=["lm_head", *ARCHITECTURES[model_type].router_modules])
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype,
                                                 experts_implementation="eager").eval()
    digests = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            for param in expert_params(module):
                weights = getattr(module, param)
                assert weights.dtype == dtype, "bitsandbytes left the experts unquantized, in the model's dtype"
                with torch.no_grad():
                    for expert in range(weights.shape[0]):
                        packed, state = bnbf.quantize_4bit(weights[expert].contiguous(), blocksize=64,
                                                           compress_statistics=True, quant_type="nf4")
                        dense = bnbf.dequantize_4bit(packed, state)
                        key = f"layers.{index}.{name}.{param}.{expert}"
                        parts = (packed, state.absmax, state.state2.absmax, state.offset, dense)
                        digests.update({f"{key}.{part}": tensor_digest(t)
                                        for part, t in zip((*QUANT_PARTS, "dequantized"), parts)})
                        weights[expert].copy_(dense)
    return model, digests
