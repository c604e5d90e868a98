"""tools/generate.py: with an adapter merged in memory it says what PEFT-with-adapter says.

In fp32 the merged weights equal PEFT's unmerged computation to rounding (~1e-6 of the logits), so
greedy decoding and seeded sampling (same RNG draws over near-identical probabilities) must
produce the same tokens as PEFT's own `generate`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fsdp_qlora.model.tiny_llama import generate_llama
from tests.test_merge import SMALL, load_tool, peft_adapter

PROMPT = "### Instruction:\nName three colors.\n\n### Response:\n"


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    """generate.py's CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = load_tool("generate").main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def sections(stdout: str) -> dict[str, str]:
    parts = stdout.split("=== ")[1:]
    return {part.split(" ===\n", 1)[0]: part.split(" ===\n", 1)[1].rstrip("\n") for part in parts}


@pytest.mark.parametrize("use_dora", [False, True])
def test_generate_with_adapter_matches_peft(tmp_path, capsys, use_dora):
    base_dir = generate_llama(tmp_path / "base", SMALL, seed=5)
    # alpha 64: a strong adapter, so that its effect shows in the generated tokens.
    peft_model = peft_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=64, use_dora=use_dora)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = {}
    for mode, options in (("greedy", {"do_sample": False}),
                          ("sample", {"do_sample": True, "temperature": 0.8, "top_p": 0.95})):
        torch.manual_seed(3)
        with torch.no_grad():
            tokens = peft_model.generate(**inputs, max_new_tokens=12, pad_token_id=tokenizer.eos_token_id, **options)
        expected[mode] = tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    code, out, err = run_generate(capsys, "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                  "--prompt", PROMPT, "--raw", "--max-new-tokens", "12", "--seed", "3")
    assert code == 0, err
    assert sections(out) == expected

    # Without --raw the instruction is wrapped in the training template: the same prompt as above.
    code, out, _ = run_generate(capsys, "--model", str(base_dir), "--prompt", "Name three colors.", "--mode", "greedy",
                                "--max-new-tokens", "12")
    assert code == 0 and sections(out)["greedy"] != expected["greedy"]  # the adapter acts


def test_generate_refuses_an_incomplete_adapter(tmp_path, capsys):
    base_dir = generate_llama(tmp_path / "base", SMALL, seed=5)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    code, _, err = run_generate(capsys, "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                                "--prompt", "hi")
    assert code == 2 and "missing ['adapter_model.safetensors']" in err, err
