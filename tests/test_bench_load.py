"""tools/bench_load.py: its bookkeeping on the tiny model (timings are the tool's own business)."""

import json

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.train.planner import Geometry, Options, static_bytes
from tests.conftest import REPO, run_python, subprocess_env


def test_every_row_is_read_once_across_ranks(tmp_path):
    from safetensors import safe_open

    from fsdp_qlora.model.tiny_llama import ensure_tiny_llama

    model = ensure_tiny_llama(tmp_path / "cache")
    tensor_bytes = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as reader:
            tensor_bytes += sum(reader.get_tensor(k).numel() * 2 for k in reader.keys())  # all bf16
    proc = run_python(str(REPO / "tools/bench_load.py"), "--model", str(model), "--ranks", "2", "--workers", "3",
                      "--json", str(tmp_path / "load.json"), env=subprocess_env(tmp_path / "cache"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    figures = json.loads((tmp_path / "load.json").read_text())
    run = figures["runs"]["3"]
    assert run["read_bytes"] == tensor_bytes  # the ranks' row ranges tile every tensor exactly
    # What each rank keeps: exactly the planner's static weight + adapter bytes for 2 ranks.
    static = static_bytes(Geometry.from_config(json.loads((model / "config.json").read_text())),
                          Options(TrainConfig(fsdp_units="layer"), world_size=2))
    kept = sum(static[k] for k in ("nf4_weights", "quant_constants", "frozen_bf16", "adapter_params"))
    assert [r["held"] for r in run["ranks"]] == [kept, kept]
    assert "\n| 3 | " in proc.stdout  # the markdown table row for --workers 3
