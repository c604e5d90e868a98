"""Generate text with a model, optionally with a trained adapter merged in (installed as `fsdp-qlora-generate`).

The code is fsdp_qlora/cli/generate.py; `python tools/generate.py --help` lists the flags.
"""

import sys

from fsdp_qlora.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
