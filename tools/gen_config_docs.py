"""Regenerate docs/configuration.md (the typed config) and docs/models.md (the model registry);
tests fail when either is stale.

    python tools/gen_config_docs.py
"""

from pathlib import Path

from fsdp_qlora.config import config_reference_markdown
from fsdp_qlora.model.registry import models_reference_markdown

REPO = Path(__file__).resolve().parents[1]

DOCS = {REPO / "docs" / "configuration.md": config_reference_markdown,
        REPO / "docs" / "models.md": models_reference_markdown}

if __name__ == "__main__":
    for doc, generate in DOCS.items():
        doc.write_text(generate())
        print(f"wrote {doc}")
