"""Every recipe in configs/ loads and validates, fits the hardware it names (memory planner), and
the CPU one trains a few steps."""

import json

import pytest

from fsdp_qlora.config import parse_config
from fsdp_qlora.train.plan_advice import plan_train_config
from fsdp_qlora.train.planner import GIB
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
# The hardware each recipe is written for: (ranks, nodes, GiB per GPU); None = CPU.
HARDWARE = {"tiny-llama-cpu": None, "llama-70b-2x24gb": (2, 1, 24), "llama-3-8b-1x24gb": (1, 1, 24),
            "llama-3-70b-2x8x80gb": (16, 2, 80)}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_fits_its_hardware(recipe):
    assert recipe.stem in HARDWARE, f"declare the hardware {recipe.name} is for in HARDWARE"
    cfg = parse_config(["--config", str(recipe)])
    usage = recipe.read_text().split("\n", 3)[1]  # the second comment line is the command to run
    assert f"--config configs/{recipe.name}" in usage, usage
    if HARDWARE[recipe.stem] is None:
        return
    ranks, nodes, gib = HARDWARE[recipe.stem]
    _, plan = plan_train_config(cfg, ranks, nodes)
    assert plan.fits(gib * GIB), f"{recipe.name}: needs {plan.needed() / GIB:.1f} GiB per GPU"
    assert not plan.options.cpu_offload  # the recipes keep the weights on the GPUs


def test_recipe_flags_override_and_bad_combinations_are_refused(tmp_path):
    recipe = REPO / "configs/llama-70b-2x24gb.yaml"
    assert parse_config(["--config", str(recipe), "--context-length", "4096"]).context_length == 4096
    proc = run_python(str(REPO / "tools/plan_memory.py"), "--config", str(recipe), "--world-size", "2",
                      "--context-length", "8192", "--gpu-memory-gib", "24", "--auto", env=subprocess_env(tmp_path))
    assert proc.returncode == 0 and "does NOT fit" in proc.stdout and "--cpu-offload" in proc.stdout, proc.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(recipe.read_text().replace("activation_checkpointing: true", "activation_checkpointing: false")
                      + "activation_checkpointing_every: 2\n")
    proc = run_python(str(REPO / "train.py"), "--config", str(broken), "--plan", env=subprocess_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("train.py: error: --activation-checkpointing-every 2 does nothing without "
                                   "--activation-checkpointing: add it, or drop the option")


def test_cpu_recipe_trains(tmp_path):
    run_dir = tmp_path / "run"
    run_torchrun(REPO / "train.py", 2, "--config", str(REPO / "configs/tiny-llama-cpu.yaml"), "--max-steps", "4",
                 "--output-dir", str(run_dir), env=subprocess_env(tmp_path / "cache"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
