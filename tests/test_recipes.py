"""Every recipe in configs/ loads and validates; the CPU one trains a few steps."""

import json
from pathlib import Path

import pytest

from fsdp_qlora.config import parse_config
from tests.conftest import REPO, run_torchrun, subprocess_env

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_loads_and_validates(recipe):
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.model and cfg.lora_rank > 0


def test_cpu_recipe_trains(tmp_path):
    run_dir = tmp_path / "run"
    run_torchrun(REPO / "train.py", 2, "--config", str(REPO / "configs/tiny-llama-cpu.yaml"), "--max-steps", "4",
                 "--output-dir", str(run_dir), env=subprocess_env(tmp_path / "cache"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
