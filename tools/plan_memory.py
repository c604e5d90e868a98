"""Per-GPU memory plan of a QLoRA run, from a model config alone (no weights, no GPU) (installed as `fsdp-qlora-plan`).

The code is fsdp_qlora/cli/plan.py; `python tools/plan_memory.py --help` lists the flags.
"""

import sys

from fsdp_qlora.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
