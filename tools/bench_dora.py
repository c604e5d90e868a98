"""Step time and peak memory of DoRA vs LoRA, ours vs PEFT's, on the same model and batch.

    python tools/bench_dora.py                      # every variant, a markdown table
    python tools/bench_dora.py --hidden 2048 --steps 10

Step time is the best of --steps (the least disturbed by other load on a shared machine).
One forward + backward (adapters only train) per step on a randomly initialized Llama, in the
chosen dtype with fp32 adapters (PEFT's default), all linear layers adapted. Each variant runs in
a fresh process so that memory figures do not mix: peak GPU memory allocated on CUDA, peak RSS
growth over the model's own footprint on CPU (coarser: it includes allocator slack).
Variants: ours-lora, ours-dora (fsdp_qlora.peft), peft-lora, peft-dora (peft, if installed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fsdp_qlora.peft.apply import apply_lora
from fsdp_qlora.peft.spec import AdapterSpec

VARIANTS = ("ours-lora", "ours-dora", "peft-lora", "peft-dora")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(variant: str, args, device: str) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, vocab_size=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, DTYPES[args.dtype])
    use_dora = variant.endswith("dora")
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                target_modules="all-linear", use_dora=use_dora))
    apply_lora(model, AdapterSpec(r=args.rank, alpha=2 * args.rank, dropout=0.0, use_dora=use_dora))
    return model


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(variant, args, device).train()
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = 0 if device == "cuda" else _peak_bytes(device)  # CPU: RSS high-water mark of the built model
    times = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    peak = _peak_bytes(device) - before
    return {"variant": variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "step_s": min(times[args.warmup:]), "peak_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here and print JSON (used internally)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, *passthrough], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(f"{variant}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = {row["variant"]: row for row in rows}.get("ours-lora")
    print(f"hidden {args.hidden}, {args.layers} layers, r {args.rank}, batch {args.batch}x{args.seq}, {args.dtype} "
          f"base, fp32 adapters, device {rows[0]['device'] if rows else '?'}\n")
    print("| variant | step time (s) | vs ours-lora | peak memory (MiB) | vs ours-lora |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        time_ratio = row["step_s"] / base["step_s"] if base else float("nan")
        mem_ratio = row["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] else float("nan")
        print(f"| {row['variant']} | {row['step_s']:.3f} | {time_ratio:.2f}x | {row['peak_mib']:.0f} | {mem_ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
