"""tools/merge_adapter.py against PEFT's merge_and_unload() (the oracle), on a multi-shard base.

Adapters are written by PEFT itself (random A, B and magnitudes, so every term counts), which also
checks that we read PEFT's format, not only our own.
Tolerances: merged in fp32, our weights must equal PEFT's to fp32 rounding (rtol 1e-5: the two
compute the same sums in a different order). Written in bf16 (the base's dtype), each weight is one
rounding of that value: within bf16's half-ulp (2^-8 relative) of PEFT's fp32 merge; the logits of
the reloaded bf16 model are compared with PEFT-with-adapter logits (fp32) at 2% of their scale,
the error of running a 2-layer model with bf16 weights.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fsdp_qlora.model.tiny_llama import generate_llama
from tests.conftest import REPO, run_python

SMALL = {"num_hidden_layers": 2}
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "rslora_patterns": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 2},
                            alpha_pattern={"q_proj": 3.0}),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return generate_llama(tmp_path_factory.mktemp("models") / "base", SMALL, seed=3, num_shards=3)


def peft_adapter(base_dir: Path, out_dir: Path, **config) -> PeftModel:
    """A PEFT model (fp32 base) with random nonzero adapter weights, saved to out_dir."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(param * (1 + 0.1 * noise) if "magnitude" in name else 0.1 * noise)
    model.save_pretrained(out_dir)
    return model.eval()


def load_tool(name: str) -> ModuleType:
    """A tools/ script as a module, to call its main() in-process (no interpreter start per call)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merge(capsys, base_dir: Path, adapter_dir: Path, output: Path, *extra: str) -> tuple[int, str]:
    """Run merge_adapter.py's CLI; returns (exit code, stderr)."""
    capsys.readouterr()
    code = load_tool("merge_adapter").main(["--base", str(base_dir), "--adapter", str(adapter_dir),
                                            "--output", str(output), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_equals_peft_merge_and_unload(base_dir, tmp_path, capsys, variant):
    peft_model = peft_adapter(base_dir, tmp_path / "adapter", **VARIANTS[variant])
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    reference = peft_model.merge_and_unload().state_dict()

    for dtype_flag, out in (("fp32", tmp_path / "merged32"), (None, tmp_path / "merged")):
        code, err = merge(capsys, base_dir, tmp_path / "adapter", out, *(["--dtype", dtype_flag] if dtype_flag else []))
        assert code == 0, err
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base_dir.glob("*.safetensors"))
        assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
        merged = {}
        for file in out.glob("*.safetensors"):
            merged.update(load_file(str(file)))
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(merged)
        changed = 0
        for key, tensor in merged.items():
            if key not in reference:  # tied lm_head
                continue
            expected = reference[key]
            if dtype_flag == "fp32":
                assert tensor.dtype == torch.float32
                torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert tensor.dtype == torch.bfloat16
                torch.testing.assert_close(tensor.float(), expected, rtol=2 ** -8, atol=1e-6, msg=key)
            changed += any(name in key for name in ("q_proj", "v_proj", "down_proj"))
        assert changed == 3 * SMALL["num_hidden_layers"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = reloaded(ids).logits
    scale = peft_logits.abs().max()
    assert (ours - peft_logits).abs().max() < 0.02 * scale
    assert (ours.argmax(-1) == peft_logits.argmax(-1)).float().mean() > 0.95


def test_refuses_bad_adapters(base_dir, tmp_path, capsys):
    peft_adapter(base_dir, tmp_path / "good", r=4, lora_alpha=8, use_dora=True)

    def broken(name: str, edit) -> Path:
        target = tmp_path / name
        shutil.copytree(tmp_path / "good", target)
        edit(target)
        return target

    def drop_magnitudes(path: Path) -> None:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, str(path / "adapter_model.safetensors"))

    def widen(path: Path) -> None:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in tensors.items()},
                  str(path / "adapter_model.safetensors"))

    cases = {
        "missing_weights": (lambda p: (p / "adapter_model.safetensors").unlink(),
                            r"is not a PEFT adapter: missing \['adapter_model.safetensors'\]"),
        "missing_config": (lambda p: (p / "adapter_config.json").unlink(), r"missing \['adapter_config.json'\]"),
        "no_magnitudes": (drop_magnitudes, r"expected \['lora_A', 'lora_B', 'lora_magnitude_vector'\].*incomplete"),
        "other_base": (widen, r"down_proj is 128x512 but the base weight is 128x256: the adapter was trained on another base"),
    }
    for name, (edit, message) in cases.items():
        code, err = merge(capsys, base_dir, broken(name, edit), tmp_path / f"out-{name}")
        assert code == 2 and err.count("\n") == 1, (name, err)  # one line naming problem and fix
        assert re.search(message, err), (name, err)
        assert not (tmp_path / f"out-{name}").exists() and not list(tmp_path.glob(f".out-{name}.tmp-*"))

    other = generate_llama(tmp_path / "other", {**SMALL, "num_hidden_layers": 1}, seed=0)
    code, err = merge(capsys, other, tmp_path / "good", tmp_path / "out-layers")
    assert code == 2 and "targets model.layers.1." in err and "lacks" in err, err


# ~390 MB in bf16 over 8 shards of ~49 MB (the loader memory test's model).
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
       "num_key_value_heads": 8}
# On top of the shard being merged and its serialized copy: one weight's fp32 merge temporaries
# (<= 12 MB here), the adapter (~3 MB) and heap slack; a merge holding every shard would exceed it.
MERGE_MARGIN = 96 * 2**20


def test_merge_host_memory_stays_near_one_shard(tmp_path):
    base = generate_llama(tmp_path / "big", BIG, num_shards=8)
    shards = sorted(base.glob("*.safetensors"))
    peft_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16)
    proc = run_python(str(REPO / "tests/workers/merge_memory_worker.py"), str(base), str(tmp_path / "adapter"),
                      str(tmp_path / "merged"), str(tmp_path / "mem.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "mem.json").read_text())
    bound = 2 * max(p.stat().st_size for p in shards) + MERGE_MARGIN
    assert figures["code"] == 0 and len(list((tmp_path / "merged").glob("*.safetensors"))) == len(shards)
    assert bound < sum(p.stat().st_size for p in shards)  # the test tells a streaming merge from a full one
    assert figures["peak_growth"] < bound, (figures, bound)
