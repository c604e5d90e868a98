"""Peak host-memory growth of tools/merge_adapter.py (in its own process; see test_merge).

argv: <base dir> <adapter dir> <output dir> <result json>.
"""

import importlib.util
import json
import sys
from pathlib import Path

from tests.workers.load_memory_worker import peak_rss, reset_peak_rss

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    base, adapter, output, result = sys.argv[1:5]
    spec = importlib.util.spec_from_file_location("merge_adapter", REPO / "tools" / "merge_adapter.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # imports torch, safetensors, ...: not part of the merge's cost
    baseline = reset_peak_rss()
    code = tool.main(["--base", base, "--adapter", adapter, "--output", output])
    Path(result).write_text(json.dumps({"code": code, "peak_growth": peak_rss() - baseline}))


if __name__ == "__main__":
    main()
