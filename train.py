"""Fine-tune a model with QLoRA on FSDP2.

    torchrun --nproc_per_node 2 train.py [flags]      # one process per GPU (or CPU rank)
    python train.py [flags]                           # a single process, same flags

`python train.py --help` lists every flag; docs/configuration.md explains them. The code is
fsdp_qlora/cli/train.py (also installed as the `fsdp-qlora-train` command).
"""

import sys

from fsdp_qlora.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
