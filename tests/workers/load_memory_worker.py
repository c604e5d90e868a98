"""Peak host-memory growth of loading a model (run in its own process; see test_loader_memory).

argv: <model dir> <result json>. Under torchrun each rank reports its own figures.
"""

import json
import sys
from pathlib import Path

import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not load cost)

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.distributed.env import init_distributed, shutdown
from fsdp_qlora.distributed.sharding import build_mesh
from fsdp_qlora.metrics.system import peak_rss, reset_peak_rss
from fsdp_qlora.model.loader import build_qlora_model, local_weight_bytes


def main() -> None:
    model_dir, result = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed()
    mesh = build_mesh(env)
    baseline = reset_peak_rss()
    model = build_qlora_model(model_dir, TrainConfig(model=str(model_dir)), env, mesh)
    figures = {"baseline": baseline, "peak_growth": peak_rss() - baseline, "held": local_weight_bytes(model)}
    Path(f"{result}.rank{env.rank}").write_text(json.dumps(figures))
    shutdown()


if __name__ == "__main__":
    main()
