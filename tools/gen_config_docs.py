"""Regenerate docs/configuration.md (the typed config) and docs/models.md (the model registry);
tests fail when either is stale.

    python tools/gen_config_docs.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsdp_qlora.config import config_reference_markdown  # noqa: E402
from fsdp_qlora.model.registry import models_reference_markdown  # noqa: E402

DOCS = {REPO / "docs" / "configuration.md": config_reference_markdown,
        REPO / "docs" / "models.md": models_reference_markdown}

if __name__ == "__main__":
    for doc, generate in DOCS.items():
        doc.write_text(generate())
        print(f"wrote {doc}")
