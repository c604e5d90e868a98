"""Regenerate docs/configuration.md from the typed config (tests fail when it is stale).

    python tools/gen_config_docs.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsdp_qlora.config import config_reference_markdown  # noqa: E402

DOC = REPO / "docs" / "configuration.md"

if __name__ == "__main__":
    DOC.write_text(config_reference_markdown())
    print(f"wrote {DOC}")
