"""Merge a PEFT LoRA/DoRA adapter into its base model and write a plain Hugging Face model (installed as `fsdp-qlora-merge`).

The code is fsdp_qlora/cli/merge.py; `python tools/merge_adapter.py --help` lists the flags.
"""

import sys

from fsdp_qlora.cli.merge import main

if __name__ == "__main__":
    sys.exit(main())
