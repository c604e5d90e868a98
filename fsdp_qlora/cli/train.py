"""Fine-tune a model with QLoRA on FSDP2 (train.py, or the installed `fsdp-qlora-train`).

    torchrun --nproc_per_node 2 train.py [flags]      # one process per GPU (or CPU rank)
    python train.py [flags]                           # a single process, same flags

`python train.py --help` lists every flag; docs/configuration.md explains them.
"""

import gc
import os
import sys

from fsdp_qlora.config import parse_config
from fsdp_qlora.errors import CheckpointWriteError, ConfigError
from fsdp_qlora.train.signals import TrainingInterrupted


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    # Free the (cyclic) FSDP2 model while the interpreter is fully alive: left to the collection at
    # interpreter exit, tensors that gloo's work objects still reference are destroyed from a thread
    # that can no longer take the GIL, and the rank aborts ("terminate called without an active
    # exception", a few runs in a hundred on a loaded 2-core machine; pytorch/pytorch#179291).
    gc.collect()
    return code


def _run(argv: list[str] | None) -> int:
    try:
        cfg = parse_config(argv, prog="train.py")
        if cfg.plan:  # a dry run: the memory plan from the model config alone, no weights loaded
            from fsdp_qlora.train.plan_advice import report_plan

            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            return report_plan(cfg, world_size) if os.environ.get("RANK", "0") == "0" else 0
        from fsdp_qlora.train.loop import train  # heavy imports only once the flags are valid

        run_dir = train(cfg)
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank
            print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except (TrainingInterrupted, CheckpointWriteError) as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: {stop}", file=sys.stderr)
        return stop.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(f"done: adapter in {run_dir / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
