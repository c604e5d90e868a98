"""The embedded default model: a tiny random-init Llama with a BPE tokenizer trained on the bundled data.

It is generated deterministically on first use (no download), in the same Hugging Face layout as
a real checkpoint (config.json, sharded safetensors + index, tokenizer files), so the whole
loading path is exercised. The generator also builds larger variants for loader memory tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fsdp_qlora.data.make_sample_data import SAMPLE_DATASET_PATH
from fsdp_qlora.data.sft import format_prompt
from fsdp_qlora.model.cache import default_cache_dir, make_once

# Bump whenever the generator's output changes for the same config and data: it is part of
# the cache key, so cached models regenerate instead of silently going stale.
GENERATOR_VERSION = 1

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))

# The bundled corpus supports fewer BPE merges than 1024 tokens (~680), so the embedding keeps
# unused rows; vocab_size stays a multiple of 64 like every linear dim,
# which the NF4 blocks (64 values) need.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    # LoRA leaves lm_head frozen at its random init; at the usual std 0.02 its logits stay too
    # small to ever be confident (LoRA plateaus near uniform). 0.05 lets the loss visibly fall
    # within ~30 steps; 0.2 makes the random model too chaotic to adapt.
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",  # transformers 5 name of torch_dtype
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

# Role-tagged turns ending in eos, so a chat-tuned model learns where its turn stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULT_MAX_SHARD_BYTES = 1 << 20  # the default tiny model (~1.8 MB) comes out in 2 shards


def training_texts() -> list[str]:
    """The bundled examples as the model sees them, the tokenizer's training corpus."""
    rows = [json.loads(line) for line in SAMPLE_DATASET_PATH.read_text().splitlines() if line.strip()]
    return [format_prompt(row["instruction"], row["input"]) + row["output"] for row in rows]


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no <unk> in practice) that adds bos like Llama's."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def generate_llama(output_dir: Path, config_overrides: dict[str, Any] | None = None, seed: int = 0,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, num_shards: int | None = None) -> Path:
    """Write a random-init bf16 Llama + tokenizer to output_dir in Hugging Face layout.

    Deterministic for the same arguments. Shards hold at most max_shard_bytes each, unless
    num_shards asks for that many equal-sized ones. Everything is written into a temp dir
    next to output_dir and renamed at the end, so a crash never leaves a half-written model.
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists: remove it or choose another output_dir")
    config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **(config_overrides or {})})
    tokenizer = train_tokenizer(training_texts(), TINY_LLAMA_CONFIG["vocab_size"], config.max_position_embeddings)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # fp32 init; each shard is cast to bf16 as it is written
    state = model.state_dict()
    shards = _shard_names(state, max_shard_bytes, num_shards)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the renamed model dir
    try:
        config.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: state[name].to(torch.bfloat16).contiguous() for name in names},
                      tmp_dir / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, filename))
        total_size = sum(t.numel() * torch.bfloat16.itemsize for t in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.rename(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a no-op once renamed
    return output_dir


def _shard_names(state: dict[str, torch.Tensor], max_shard_bytes: int, num_shards: int | None) -> list[list[str]]:
    """Group tensor names, in model order (so a layer stays in one or two files), into shards."""
    sizes = {name: tensor.numel() * torch.bfloat16.itemsize for name, tensor in state.items()}
    if num_shards:
        return _split_evenly(sizes, num_shards)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, size in sizes.items():
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


def _split_evenly(sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """num_shards groups of about equal bytes: each tensor goes where its midpoint falls.

    Fewer groups only when single tensors outweigh a whole share.
    """
    total = sum(sizes.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    offset = 0
    for name, size in sizes.items():
        shards[min(num_shards - 1, (2 * offset + size) * num_shards // (2 * total))].append(name)
        offset += size
    return [names for names in shards if names]


def tiny_llama_key(seed: int = 0) -> str:
    """Short hash of everything the default model depends on: config, data, generator."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"config": TINY_LLAMA_CONFIG, "generator": GENERATOR_VERSION, "seed": seed},
                             sort_keys=True).encode())
    digest.update("\0".join(training_texts()).encode())
    return digest.hexdigest()[:12]


def ensure_tiny_llama(cache_dir: Path | None = None) -> Path:
    """The cached default tiny model's directory, generated on first use.

    Concurrent callers (every torchrun rank resolves the model) serialize on a file lock:
    one generates, the others find the finished directory.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return make_once(cache_dir / f"tiny-llama-{tiny_llama_key()}", generate_llama)
