"""Generate text with a model, optionally with a trained adapter merged in: a quick look at what
an adapter does.

    python tools/generate.py --model BASE_DIR --adapter runs/x/adapter --prompt "Name three colors."
    python tools/generate.py --model merged/ --prompt "..." --mode sample --temperature 0.8 --seed 1

The prompt is wrapped in the training template (### Instruction / ### Response), or with --chat in
the tokenizer's chat template as one user turn (what a model trained on chat data expects), or used
as is with --raw.
The adapter (LoRA or DoRA, PEFT format) is merged into the weights in memory with the same code
as tools/merge_adapter.py, so this shows what the merged/served model says. Runs on CPU or the
first GPU; prints one section per mode (greedy, then sampled).
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fsdp_qlora.data.sft import format_prompt
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model.sources import resolve_model
from fsdp_qlora.peft.merge import AdapterError, merge_into_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_model(model_dir: str, adapter_dir: str | None, dtype: torch.dtype, device: str):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if adapter_dir:
        merge_into_model(model, adapter_dir)
    return model, tokenizer


def chat_prompt(tokenizer, user_message: str) -> str:
    """One user turn in the tokenizer's chat template, ending with the assistant's generation prompt."""
    if not tokenizer.chat_template:
        raise ConfigError("--chat: this tokenizer has no chat template; use the instruction template (no --chat) or --raw")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompt: str, max_new_tokens: int, sample: bool, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, add_special_tokens: bool = True) -> str:
    """The completion only (prompt tokens cut off), special tokens removed. A chat-template prompt
    already holds its special tokens (`add_special_tokens=False`: no second bos)."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(model.device)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    torch.manual_seed(seed)  # sampling draws from the global RNG: fixed, the output repeats
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                                if tokenizer.pad_token_id is not None else tokenizer.eos_token_id, **options)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base (an alias such as tiny-llama, a hub id or a "
                        "directory, as train.py's --model) or a merged model directory")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory to merge in first")
    parser.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--raw", action="store_true", help="use the prompt as is, without the training template")
    template.add_argument("--chat", action="store_true", help="render the prompt as a user turn in the tokenizer's "
                          "chat template (for models trained on chat data)")
    parser.add_argument("--mode", choices=("greedy", "sample", "both"), default="both")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="compute dtype (fp32 default: CPUs are slow at bf16)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model_dir = resolve_model(args.model)
        model, tokenizer = load_model(str(model_dir), args.adapter, DTYPES[args.dtype], device)
        prompt = args.prompt if args.raw else chat_prompt(tokenizer, args.prompt) if args.chat \
            else format_prompt(args.prompt)
    except (AdapterError, ConfigError, FileNotFoundError, OSError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    modes = ("greedy", "sample") if args.mode == "both" else (args.mode,)
    for mode in modes:
        text = generate(model, tokenizer, prompt, args.max_new_tokens, mode == "sample", args.temperature,
                        args.top_p, args.seed, add_special_tokens=not args.chat)
        print(f"=== {mode} ===\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
