"""Per-GPU memory plan of a QLoRA run, from a model config alone (no weights, no GPU).

    python tools/plan_memory.py --model llama-70b --world-size 2 --context-length 2048 --batch-size 1 \
        --activation-checkpointing --gpu-memory-gib 24
    python tools/plan_memory.py --config configs/llama-70b-2x24gb.yaml --world-size 2 --auto
    python tools/plan_memory.py --model path/to/config.json --world-size 16 --nodes 2 --auto

Takes every train.py flag and --config recipe (the same typed config, fsdp_qlora/config.py), plus
--world-size, --nodes and --auto. --model: a known alias (llama-70b, llama-3-70b, llama-3-8b, ...),
tiny-llama, a config.json or a directory holding one. See docs/memory.md.
"""

from __future__ import annotations

import argparse
import sys

from fsdp_qlora.config import parse_config
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.train.plan_advice import report_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plan_memory.py", description=__doc__.split("\n")[0],
                                     epilog="every train.py flag is accepted too (python train.py --help)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks in the job (GPUs over all nodes)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (--sharding auto/hsdp "
                        "shards within a node)")
    parser.add_argument("--auto", action="store_true", help="also print the options with the least slowdown "
                        "that fit (exit code 1 when none does)")
    args, train_flags = parser.parse_known_args(argv)
    try:
        if args.world_size < 1 or args.nodes < 1 or args.world_size % args.nodes:
            raise ConfigError(f"--world-size {args.world_size} must be a positive multiple of --nodes {args.nodes}")
        return report_plan(parse_config(train_flags, prog="plan_memory.py"), args.world_size, args.nodes, args.auto)
    except ConfigError as err:
        print(f"plan_memory.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
