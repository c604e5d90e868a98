"""Write a PEFT-format adapter from any checkpoint of a run.

    python tools/export_adapter.py --checkpoint runs/x/checkpoints/step-00000100 --output adapters/x-100
    python tools/export_adapter.py --checkpoint runs/x --output adapters/x-latest   # the run's latest

Runs in one process on CPU, whatever world size wrote the checkpoint: DCP reassembles the shards.
"""

import argparse
import sys
from pathlib import Path

from fsdp_qlora.checkpoint.manager import CheckpointManager, load_adapter_tensors
from fsdp_qlora.checkpoint.resume import resolve_resume
from fsdp_qlora.config import TrainConfig
from fsdp_qlora.errors import ConfigError
from fsdp_qlora.peft.export import export_trained_adapter
from fsdp_qlora.peft.spec import AdapterSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step-* directory, or a run's output dir (its latest)")
    parser.add_argument("--output", required=True, help="directory to write adapter_config.json + adapter_model.safetensors")
    args = parser.parse_args(argv)
    try:
        path = resolve_resume(args.checkpoint, CheckpointManager(Path(args.checkpoint), rank=0))
        state, tensors = load_adapter_tensors(path)
    except ConfigError as err:
        print(f"export_adapter.py: error: {err}", file=sys.stderr)
        return 2
    cfg = TrainConfig(**state.config)
    out = export_trained_adapter(args.output, tensors, AdapterSpec.from_config(cfg), state.base_model_path)
    print(f"adapter of step {state.step} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
