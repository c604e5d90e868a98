"""The README's Quickstart: its first command trains the default on 2 ranks; CI runs the second."""

import json
import re
import subprocess

from tests.conftest import REPO, subprocess_env


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    commands = quickstart_commands()
    assert len(commands) == 2
    install, test = commands
    assert install.startswith("pip install torch==2.13.0 && pip install -e . && ")
    assert install.endswith("torchrun --nproc_per_node 2 train.py")
    assert test.startswith("pip install torch==2.13.0 && pip install -e \".[test]\" && ")
    assert "commands[1]" in (REPO / ".ci/run").read_text()  # .ci/run evaluates this very line


def test_quickstart_train_command_runs_on_a_fresh_cache(tmp_path):
    before = set((REPO / "runs").glob("tiny-llama-*")) if (REPO / "runs").exists() else set()
    env = subprocess_env(tmp_path / "cache")
    proc = subprocess.run(["bash", "-c", quickstart_commands()[0]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    new_runs = sorted(set((REPO / "runs").glob("tiny-llama-*")) - before)
    assert len(new_runs) == 1, new_runs
    run_dir = new_runs[0]
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # a whole epoch of the sample data
        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "config.yaml").is_file() and any((run_dir / "tensorboard").iterdir())
    finally:
        import shutil

        shutil.rmtree(run_dir)
