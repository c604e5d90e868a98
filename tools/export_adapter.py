"""Write a PEFT-format adapter from any checkpoint of a run (installed as `fsdp-qlora-export`).

The code is fsdp_qlora/cli/export.py; `python tools/export_adapter.py --help` lists the flags.
"""

import sys

from fsdp_qlora.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
