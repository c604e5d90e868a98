"""The embedded tiny Llama: deterministic, HF-format, loadable, safe to generate concurrently."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fsdp_qlora.model import tiny_llama
from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG, ensure_tiny_llama, generate_llama
from tests.conftest import REPO, subprocess_env


def _file_hashes(model_dir: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(model_dir.iterdir()) if path.suffix in (".safetensors", ".json")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_tiny_llama(tmp_path_factory.mktemp("cache"))


def test_generation_is_deterministic(tmp_path):
    first = _file_hashes(generate_llama(tmp_path / "a"))
    second = _file_hashes(generate_llama(tmp_path / "b"))
    assert first == second
    assert any(name.endswith(".safetensors") for name in first)


def test_index_maps_every_tensor_across_shards(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shard_files = sorted(set(weight_map.values()))
    assert len(shard_files) >= 2
    assert shard_files == [f"model-{i:05d}-of-{len(shard_files):05d}.safetensors" for i in range(1, len(shard_files) + 1)]
    stored: dict[str, str] = {}
    total_size = 0
    for filename in shard_files:
        with safe_open(model_dir / filename, framework="pt") as shard:
            for name in shard.keys():
                tensor = shard.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                stored[name] = filename
                total_size += tensor.numel() * tensor.element_size()
    assert stored == weight_map
    assert index["metadata"]["total_size"] == total_size
    layers = TINY_LLAMA_CONFIG["num_hidden_layers"]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            f"model.layers.{layers - 1}.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= set(stored)


def test_matrix_dims_are_multiples_of_64(model_dir):
    shapes = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as shard:
            shapes.update({name: shard.get_slice(name).get_shape() for name in shard.keys()})
    matrices = {name: shape for name, shape in shapes.items() if len(shape) == 2}
    assert len(matrices) == 7 * TINY_LLAMA_CONFIG["num_hidden_layers"] + 2  # + embeddings and lm_head
    assert all(dim % 64 == 0 for shape in matrices.values() for dim in shape), matrices


def test_loads_with_transformers_and_runs_forward(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tokenizer) <= model.config.vocab_size == TINY_LLAMA_CONFIG["vocab_size"]
    input_ids = tokenizer("Reverse the order of these words.", return_tensors="pt").input_ids
    assert input_ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_num_shards_gives_that_many_files(tmp_path):
    model_dir = generate_llama(tmp_path / "m", config_overrides={"num_hidden_layers": 8}, num_shards=4)
    assert len(list(model_dir.glob("model-*-of-00004.safetensors"))) == 4


def test_crash_leaves_no_partial_directory(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_llama, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        generate_llama(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_ensure_reuses_the_cached_directory(tmp_path):
    first = ensure_tiny_llama(tmp_path)
    marker = first / "marker"
    marker.touch()
    assert ensure_tiny_llama(tmp_path) == first and marker.exists()


def test_concurrent_ensure_from_two_processes_yields_one_valid_dir(tmp_path):
    code = "import sys; from pathlib import Path; from fsdp_qlora.model.tiny_llama import ensure_tiny_llama; " \
           "print(ensure_tiny_llama(Path(sys.argv[1])))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    paths = {stdout.strip() for stdout, _ in outputs}
    assert len(paths) == 1
    model_dir = Path(paths.pop())
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [model_dir.name]  # no temp dirs left
    AutoTokenizer.from_pretrained(model_dir)
    AutoModelForCausalLM.from_pretrained(model_dir)
