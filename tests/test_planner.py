"""The memory planner: static parts equal a real sharded model's bytes (dense and mixture-of-experts);
the whole plan near a tracked peak; the CLI and --plan dry run."""

import dataclasses
import json

import pytest

from fsdp_qlora.config import TrainConfig
from fsdp_qlora.model.tiny_llama import TINY_LLAMA_CONFIG, generate_llama
from fsdp_qlora.train.plan_advice import auto_plan, describe_options
from fsdp_qlora.train.planner import (
    GIB,
    KNOWN_CONFIGS,
    Geometry,
    Options,
    choose_speed_options,
    plan_memory,
    static_bytes,
)
from tests.conftest import REPO, run_python, run_torchrun, subprocess_env


def options(**settings) -> Options:
    """The planner's view of TrainConfig(**settings) on 2 ranks (or world_size=N), at context 2048
    and batch 1 unless given: the 70B-scale figures below are about that shape of run. The speed
    options default to the plain schedule (a unit per layer, dequantizing twice), not auto: each
    test below is about one part of the plan (`test_speed_options_auto_*` is about auto)."""
    return Options.of(**{"world_size": 2, "context_length": 2048, "batch_size": 1, "fsdp_units": "layer",
                         "dequantize_once": False, **settings})


WIDER = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 1536}
# (model, world size): cases "optimizer,LoRA rank,min_8bit_size,train type", one torchrun per row
CASES = {("tiny", 1): ["adamw,8,4096,qlora"],
         ("tiny", 2): ["adamw8bit,8,1,qlora", "adamw,8,4096,lora", "adamw,8,4096,qlora,model"],
         ("wider", 2): ["adamw,16,4096,qlora", "adamw8bit,8,1,qdora"],
         ("wider", 4): ["adamw8bit,16,1,qlora"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner")
    return {"tiny": generate_llama(root / "tiny"), "wider": generate_llama(root / "wider", WIDER)}


@pytest.mark.parametrize("model,world", CASES)
def test_static_parts_equal_a_real_sharded_model(models, tmp_path, model, world):
    out = tmp_path / "bytes"
    run_torchrun(REPO / "tests/workers/planner_bytes_worker.py", world, str(models[model]), str(out),
                 *CASES[model, world], timeout=300)
    real = json.loads((tmp_path / "bytes.rank0").read_text())  # rank 0 holds the largest shards
    for case, held in real.items():
        optimizer, rank, min_8bit, train_type, *units = case.split(",")
        opt = options(world_size=world, lora_rank=int(rank), optimizer=optimizer, min_8bit_size=int(min_8bit),
                      train_type=train_type, fsdp_units=units[0] if units else "layer")
        planned = static_bytes(Geometry.from_config({**TINY_LLAMA_CONFIG, **(WIDER if model == "wider" else {})}), opt)
        for part, value in held.items():
            assert planned[part] == pytest.approx(value, rel=0.02), (case, part, planned[part], value)


# Peak memory of real steps (FSDP2's memory tracker: every tensor storage, on CPU as on GPU)
# against the planner's whole prediction, on 2 ranks: "batch,context,checkpointing,train type,dropout".
PEAK_CASES = ["1,1024,0,qlora,0.05", "1,1024,1,qdora,0.05", "2,512,0,qdora,0.0", "2,512,1,qlora,0.0"]


def test_whole_plan_within_10_percent_of_the_tracked_peak(models, tmp_path):
    """The dynamic parts too (layer buffers, activations with and without checkpointing, DoRA's,
    the loss): the tracker sees what `max_memory_allocated` would, minus the CUDA allocator's
    rounding and kernels' workspaces (the planner's overhead term, not checked here). On this
    model activations and logits are most of the peak, as they are for a 70B at long context.
    Measured: -4% to +8% here (and on a hidden-512 model). It found DoRA's saved adapter outputs and
    fp32 products, uncounted before (-20%)."""
    run_torchrun(REPO / "tests/workers/planner_peak_worker.py", 2, str(models["tiny"]), str(tmp_path / "peak.json"),
                 *PEAK_CASES, timeout=300)
    for case, figures in json.loads((tmp_path / "peak.json").read_text()).items():
        assert figures["planned"] == pytest.approx(figures["tracked"], rel=0.10), (case, figures)


def test_known_70b_configs_and_the_issue_figures():
    # NF4 + double quantization ~4.13 bits per weight: the 70B decoder linears are ~35.3 GB.
    opt = options(world_size=1)
    static = static_bytes(Geometry.from_config(KNOWN_CONFIGS["llama-70b"]), opt)
    linear_bytes = static["nf4_weights"] + static["quant_constants"]
    assert linear_bytes / 1e9 == pytest.approx(35.3, rel=0.02)
    assert static["frozen_bf16"] / 1e9 == pytest.approx(1.05, rel=0.02)  # embeddings + lm_head (+ norms)


def test_options_lower_the_plan_and_auto_picks_a_fitting_one():
    config = KNOWN_CONFIGS["llama-3-70b"]
    base = options(world_size=2, context_length=4096, batch_size=1)
    plain = plan_memory(config, base)
    ac = plan_memory(config, base.replace(activation_checkpointing=True))
    offload = plan_memory(config, base.replace(activation_checkpointing=True, cpu_offload=True))
    unchunked = plan_memory(config, base.replace(loss_chunk_tokens=0))
    assert ac.peak < plain.peak and offload.peak < ac.peak and unchunked.peak > plain.peak
    assert "nf4_weights" in offload.host and "nf4_weights" not in offload.parts
    best, slowdown = auto_plan(config, base, 24 * GIB)
    assert best is not None and best.fits(24 * GIB) and slowdown > 1


def test_plan_cli_and_train_dry_run(tmp_path):
    env = subprocess_env(tmp_path / "cache")
    proc = run_python(str(REPO / "tools/plan_memory.py"), "--model", "llama-70b", "--world-size", "2",
                      "--context-length", "2048", "--gpu-memory-gib", "24", "--auto", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nf4_weights" in proc.stdout and "does NOT fit" in proc.stdout and "auto: cheapest" in proc.stdout
    config = tmp_path / "config.json"
    config.write_text(json.dumps(KNOWN_CONFIGS["llama-3-8b"]))
    proc = run_python(str(REPO / "train.py"), "--plan", "--model", str(config), "--gpu-memory-gib", "80",
                      env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fits in 80.0 GiB" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_70b_at_context_2048_fits_two_24gb_cards_without_cpu_offload():
    """The issue's target: NF4 weights stay on the GPUs (~17.7 GB each), checkpoint boundaries go to
    the host (train/memory.py); checkpointing alone leaves ~2.5 GiB of boundaries per GPU, too many."""
    base = options(world_size=2, context_length=2048, batch_size=1, activation_checkpointing=True)
    weights = static_bytes(Geometry.from_config(KNOWN_CONFIGS["llama-70b"]), base)
    assert (weights["nf4_weights"] + weights["quant_constants"] + weights["frozen_bf16"]) / 1e9 == pytest.approx(
        18.2, rel=0.02)
    assert not plan_memory(KNOWN_CONFIGS["llama-70b"], base).fits(24 * GIB)
    offloaded = plan_memory(KNOWN_CONFIGS["llama-70b"], base.replace(activation_offload=True))
    assert offloaded.fits(24 * GIB) and "nf4_weights" in offloaded.parts
    assert offloaded.host["activations"] == pytest.approx(78 * 2048 * 8192 * 2)  # all but 2 boundaries


def test_every_model_alias_has_a_plan():
    from fsdp_qlora.model.registry import MODELS
    from fsdp_qlora.train.planner import load_model_config

    for alias in MODELS:
        assert plan_memory(load_model_config(alias), options()).peak > 0, alias


def test_auto_replicates_a_model_that_fits_one_gpu():
    """--auto prefers --sharding ddp (no all-gathers) when the whole 4-bit base fits one GPU."""
    config = KNOWN_CONFIGS["llama-3-8b"]
    best, slowdown = auto_plan(config, options(world_size=8, context_length=2048), 80 * GIB)
    assert best.options.sharding == "ddp" and best.options.world_size == 1 and slowdown < 1
    assert describe_options(best.options).startswith("--sharding ddp")
    best, _ = auto_plan(KNOWN_CONFIGS["llama-70b"], options(world_size=2, context_length=2048), 24 * GIB)
    assert best.options.sharding == "fsdp" and best.options.world_size == 2  # 35 GB of NF4 fits no 24 GB card


def test_sharding_auto_replicates_what_fits_each_gpu():
    """--sharding auto's rule (plan_advice.replication_fits): the plan of --sharding ddp (the whole model on
    each rank) must fit; not for one rank, an explicit layout, --cpu-offload or replica groups."""
    from fsdp_qlora.train.plan_advice import replication_fits

    eight_b, seventy_b = KNOWN_CONFIGS["llama-3-8b"], KNOWN_CONFIGS["llama-70b"]
    cfg = TrainConfig(context_length=2048, batch_size=1, activation_checkpointing=True)  # 9.3 / 42.8 GiB
    assert replication_fits(cfg, eight_b, 8, 24 * GIB)
    assert not replication_fits(cfg, seventy_b, 2, 24 * GIB)  # 35 GB of NF4
    assert replication_fits(cfg, seventy_b, 2, 80 * GIB)
    assert not replication_fits(dataclasses.replace(cfg, activation_checkpointing=False), eight_b, 8, 24 * GIB)
    assert not replication_fits(cfg, eight_b, 1, 24 * GIB)
    for other in ({"sharding": "fsdp"}, {"cpu_offload": True}, {"replicate_groups": 2}):
        assert not replication_fits(dataclasses.replace(cfg, **other), eight_b, 8, 24 * GIB), other


def test_only_lm_head_stays_gathered_and_the_embedding_gather_can_set_the_peak():
    """The embeddings are their own FSDP unit (tests/test_sharding.py checks it on a real model):
    the root keeps lm_head + the final norm gathered; a tied weight is counted once."""
    config = KNOWN_CONFIGS["llama-3-70b"]
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    long = plan_memory(config, options(context_length=8192, activation_checkpointing=True))
    assert long.parts["root_unsharded"] == vocab * hidden * 2 + hidden * 2
    assert "embeddings_at_forward_start" not in long.parts  # activations + logits are the higher moment
    # At a short context with CPU offload the 2 GiB embedding gather is the peak moment.
    short = plan_memory(config, options(context_length=64, activation_checkpointing=True, cpu_offload=True))
    assert short.parts["embeddings_at_forward_start"] >= vocab * hidden * 2
    assert short.parts["activations"] == 0 and short.peak == sum(short.parts.values())
    tied = plan_memory({**config, "tie_word_embeddings": True}, options(context_length=64, cpu_offload=True))
    assert "embeddings_at_forward_start" not in tied.parts and tied.parts["root_unsharded"] == vocab * hidden * 2 + hidden * 2


def test_speed_options_auto_take_the_fastest_schedule_that_fits():
    """--fsdp-units auto / unset --dequantize-once: the model unit and dequantizing once where the plan
    fits with them (small models), per-layer units and dequantizing twice where it does not (70B on
    two 24 GB cards); a setting the user gave is kept, and the plan reports what it decided."""
    auto = {"fsdp_units": "auto", "dequantize_once": None}
    small = plan_memory(KNOWN_CONFIGS["smollm2-135m"], options(**auto))
    assert (small.options.fsdp_units, small.options.dequantize_once) == ("model", True)
    assert "--fsdp-units model --dequantize-once" in describe_options(small.options)
    big = options(**auto, activation_checkpointing=True, cpu_offload=True)
    chosen = choose_speed_options(KNOWN_CONFIGS["llama-70b"], big, 24 * GIB)
    assert chosen.fsdp_units == "layer"  # the gathered 35 GB of NF4 fits no 24 GB card
    whole = plan_memory(KNOWN_CONFIGS["llama-70b"], big.replace(fsdp_units="model", dequantize_once=False))
    assert not whole.fits(24 * GIB) and plan_memory(KNOWN_CONFIGS["llama-70b"], chosen).fits(24 * GIB)
    no_ac = options(**auto, context_length=4096, batch_size=2)  # 8B, every layer's dense weights kept: 15 GB
    assert choose_speed_options(KNOWN_CONFIGS["llama-3-8b"], no_ac, 24 * GIB).dequantize_once is False
    kept = choose_speed_options(KNOWN_CONFIGS["smollm2-135m"], options(fsdp_units="layer", dequantize_once=None))
    assert (kept.fsdp_units, kept.dequantize_once) == ("layer", True)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_static_parts_equal_a_real_sharded_model_of_another_architecture(tmp_path, arch):
    """The planner reads the architecture from transformers' class (model/structure.py): Qwen 2's
    q/k/v biases, Gemma 2's tied embeddings, four norms per layer and head_dim != hidden / heads."""
    from tests.architectures import make_checkpoint

    model_dir = make_checkpoint(arch, tmp_path / arch)
    run_torchrun(REPO / "tests/workers/planner_bytes_worker.py", 2, str(model_dir), str(tmp_path / "bytes"),
                 "adamw,8,4096,qlora", timeout=300)
    held = json.loads((tmp_path / "bytes.rank0").read_text())["adamw,8,4096,qlora"]
    planned = static_bytes(Geometry.from_config(json.loads((model_dir / "config.json").read_text())),
                           options(world_size=2))
    assert planned == held


# ---- mixture of experts ------------------------------------------------------------------------
# Tiny checkpoints (tests/architectures.py: 4 experts, top-2) by name: (model_type, overrides). The wide
# one has 8 experts whose activations outweigh the loss; no sliding window, which on CPU would add a
# T x T attention mask per layer that a GPU's flash attention does not make.
MOE_CHECKPOINTS = {"mixtral": ("mixtral", {}), "gpt_oss": ("gpt_oss", {}), "qwen2_moe": ("qwen2_moe", {}),
                   "mixtral-wide": ("mixtral", {"hidden_size": 256, "intermediate_size": 512, "num_local_experts": 8,
                                                "num_attention_heads": 8, "num_key_value_heads": 4,
                                                "sliding_window": None})}
# (checkpoint, world size): cases as in CASES. gpt-oss: transposed experts with biases, a biased router;
# Qwen2-MoE: a shared expert and shared_expert_gate, a router linear that stays bf16 without an adapter.
MOE_CASES = {("mixtral", 1): ["adamw,8,4096,qlora", "adamw,8,4096,lora"],
             ("mixtral", 2): ["adamw,8,4096,qlora", "adamw8bit,8,1,qlora", "adamw,8,4096,lora"],
             ("gpt_oss", 2): ["adamw,8,4096,qlora", "adamw8bit,8,1,qdora"],
             ("qwen2_moe", 2): ["adamw,8,4096,qlora"]}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """name -> checkpoint directory, each made on first use."""
    from tests.architectures import make_checkpoint

    root, made = tmp_path_factory.mktemp("moe"), {}

    def checkpoint(name: str):
        if name not in made:
            model_type, overrides = MOE_CHECKPOINTS[name]
            made[name] = make_checkpoint(model_type, root / name, **overrides)
        return made[name]

    return checkpoint


@pytest.mark.parametrize("name,world", MOE_CASES)
def test_static_parts_equal_a_real_sharded_mixture_of_experts(moe_checkpoints, tmp_path, name, world):
    """NF4 experts (whole experts per rank, one quantization unit each), bf16 experts under lora,
    expert adapters in PEFT's layout (lora_A (r * experts, in), lora_B (out, r * experts)), none with
    DoRA, routers and expert biases in bf16: equal to what the loader builds, byte for byte."""
    model_dir = moe_checkpoints(name)
    run_torchrun(REPO / "tests/workers/planner_bytes_worker.py", world, str(model_dir), str(tmp_path / "bytes"),
                 *MOE_CASES[name, world], timeout=300)
    real = json.loads((tmp_path / "bytes.rank0").read_text())
    geo = Geometry.from_config(json.loads((model_dir / "config.json").read_text()))
    for case, held in real.items():
        optimizer, rank, min_8bit, train_type, *units = case.split(",")
        opt = options(world_size=world, lora_rank=int(rank), optimizer=optimizer, min_8bit_size=int(min_8bit),
                      train_type=train_type, fsdp_units=units[0] if units else "layer")
        assert static_bytes(geo, opt) == held, case


def test_whole_plan_of_a_mixture_of_experts_within_10_percent_of_the_tracked_peak(moe_checkpoints, tmp_path):
    """The routed activations (each token's top-k experts), the experts' backward and one expert
    dequantized at a time, as `test_whole_plan_within_10_percent_of_the_tracked_peak` checks a dense
    model. Measured -6% to +5% on this model (and -3% to -1% on a Qwen3-MoE one with top-4 of 8)."""
    run_torchrun(REPO / "tests/workers/planner_peak_worker.py", 2, str(moe_checkpoints("mixtral-wide")),
                 str(tmp_path / "peak.json"), "1,1024,0,qlora,0.05", "1,1024,1,qlora,0.0", "2,512,1,qdora,0.0",
                 timeout=300)
    for case, figures in json.loads((tmp_path / "peak.json").read_text()).items():
        assert figures["planned"] == pytest.approx(figures["tracked"], rel=0.10), (case, figures)


# Published totals (model cards) of the mixture-of-experts aliases, in billions of parameters.
PUBLISHED_SIZES = {"mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "olmoe-1b-7b": 6.9, "gpt-oss-20b": 20.9}


@pytest.mark.parametrize("alias", PUBLISHED_SIZES)
def test_moe_alias_configs_give_the_published_sizes(alias):
    """The aliases' config.json values build transformers' class with the published parameter count."""
    from fsdp_qlora.model.structure import config_from_dict, meta_model

    model = meta_model(config_from_dict(KNOWN_CONFIGS[alias]))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_SIZES[alias], rel=0.01)


def test_mixtral_8x7b_experts_are_counted_in_nf4():
    """45 B expert weights at ~4.13 bits (NF4 + double quantization per expert) plus the attention:
    ~24 GB on one GPU; the routers and embeddings stay bf16; 8 experts split over 2 ranks, not 3."""
    geo = Geometry.from_config(KNOWN_CONFIGS["mixtral-8x7b"])
    static = static_bytes(geo, options(world_size=1))
    assert (static["nf4_weights"] + static["quant_constants"]) / 1e9 == pytest.approx(24.0, rel=0.02)
    assert static["frozen_bf16"] / 1e9 == pytest.approx(0.527, rel=0.01)  # embeddings, lm_head, routers, norms
    halves = static_bytes(geo, options(world_size=2))
    assert halves["nf4_weights"] * 2 == static["nf4_weights"]
    from fsdp_qlora.errors import ConfigError

    with pytest.raises(ConfigError, match="8 experts cannot be split evenly over 3 ranks"):
        static_bytes(geo, options(world_size=3))


def test_moe_layers_must_be_alike_and_routers_stay_out_of_all_linear():
    from fsdp_qlora.errors import ConfigError
    from tests.architectures import COMMON, MOE_OVERRIDES

    qwen2_moe = {"model_type": "qwen2_moe", **COMMON, **MOE_OVERRIDES["qwen2_moe"]}
    with pytest.raises(ConfigError, match="mixes dense layers and mixture-of-experts layers"):
        Geometry.from_config({**qwen2_moe, "mlp_only_layers": [0]})
    geo = Geometry.from_config(qwen2_moe)
    assert "mlp.shared_expert_gate" not in geo.targets(["all-linear"])
    assert geo.targets(["shared_expert_gate"]) == ["mlp.shared_expert_gate"]  # named: adapted, as the loader does
    assert geo.expert_targets(options().adapter) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert geo.expert_targets(options(train_type="qdora").adapter) == []
